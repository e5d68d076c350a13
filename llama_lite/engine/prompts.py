"""`check_prompt`: whether token ids make a prompt the model can take, for the engine and `Llama` alike."""

from ..checks import is_whole


def check_prompt(ids, model_args, n_new: int, limit: tuple, index: "int | None" = None) -> None:
    """ValueError unless `ids` is a non-empty list of ids inside the model's vocabulary that leaves
    room for `n_new` more tokens within max_seq_len. `limit`: (the name, the value) of the caller's
    length setting, for the message. `index`: the prompt's place in a caller's list of prompts (named
    in the message), or None for the engine's one prompt."""
    vocab_size, max_seq_len = model_args.vocab_size, model_args.max_seq_len
    if not isinstance(ids, (list, tuple)) or not ids:
        if index is None:
            raise ValueError("a prompt must be a non-empty list of token ids")
        raise ValueError(f"prompt {index} is empty or not a list of token ids; give every prompt at least one token")
    if not all(is_whole(t) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"{'the prompt' if index is None else f'prompt {index}'} holds a token id outside [0, {vocab_size})")
    if len(ids) + n_new > max_seq_len:
        name, value = limit
        if index is None:
            raise ValueError(f"the prompt has {len(ids)} tokens; with {name} {value} it does not fit max_seq_len "
                             f"{max_seq_len}; shorten it, lower {name} or build with a larger max_seq_len")
        raise ValueError(f"prompt {index} has {len(ids)} tokens, and with {name} {value} it exceeds max_seq_len "
                         f"{max_seq_len}; shorten it, lower {name} or build with a larger max_seq_len")
