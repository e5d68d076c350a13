"""Text to token ids and back, behind one interface whatever the back-end.

`Tokenizer` is the interface (Meta's `encode(s, bos, eos)` / `decode(ids)` plus the ids generation
needs); each back-end is one small subclass, and `Tokenizer.from_file` picks it by the file. Back-end
libraries are imported only when used.
"""

from pathlib import Path

from .checkpoint import CheckpointError, gguf_field, open_gguf

# Text of tokens that end a turn or a document. Like llama.cpp, a checkpoint's control tokens with
# these names stop generation even when its metadata names only one eos id.
END_OF_TURN_TEXTS = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<|end|>"}
)


class Tokenizer:
    """The interface generation uses. Subclasses implement `_encode` and `_decode`.

    bos_id: id prepended by encode(bos=True) (None if the vocabulary has none).
    eos_id: end of sequence. pad_id: fills padding; always a valid embedding index.
    n_words: vocabulary size. stop_ids: ids that end generation (eos and end-of-turn tokens).
    add_bos: whether plain-text prompts get a bos, as the checkpoint says.
    chat_template: the checkpoint's jinja2 chat template, or None.
    """

    bos_id: "int | None"
    eos_id: int
    pad_id: int
    n_words: int
    stop_ids: frozenset
    add_bos: bool
    chat_template: "str | None"

    def encode(self, s: str, bos: bool, eos: bool) -> list:
        if not isinstance(s, str):
            raise ValueError(f"can only encode text (str), got {type(s).__name__}")
        ids = self._encode(s)
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no bos token; encode with bos=False")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            raise ValueError(f"token ids must lie in [0, {self.n_words}); got {min(ids)}..{max(ids)}")
        return self._decode(ids)

    def _encode(self, s: str) -> list:
        raise NotImplementedError

    def _decode(self, ids: list) -> str:
        raise NotImplementedError

    @staticmethod
    def from_file(path) -> "Tokenizer":
        """The tokenizer a file holds, its back-end chosen by the file's kind."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist; pass a .gguf file")
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) == b"GGUF":
                    return gguf_tokenizer(open_gguf(path))
        raise CheckpointError(f"{path} is not a tokenizer file llama_lite can read; pass a .gguf file")


class HFTokenizer(Tokenizer):
    """Over a Hugging Face `tokenizers.Tokenizer` (built from tokenizer.json or a GGUF vocabulary)."""

    def __init__(self, backend, *, bos_id, eos_id, pad_id, stop_ids, add_bos, chat_template):
        self.backend = backend
        self.n_words = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_ids = frozenset(stop_ids)
        self.add_bos, self.chat_template = add_bos, chat_template

    def _encode(self, s):
        return self.backend.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.backend.decode(ids, skip_special_tokens=False)


def _smollm_pre_tokenizer():
    # SmolLM's own tokenizer.json: every digit alone, then GPT-2's byte-level split.
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with. A name not here is refused:
# a wrong split gives plausible-looking but wrong ids.
GGUF_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer(reader) -> Tokenizer:
    """The tokenizer embedded in a GGUF file's metadata."""
    path = reader.data.filename
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported; llama_lite reads 'gpt2' (BPE) GGUF vocabularies")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id", None)
    pad_id = gguf_field(reader, "tokenizer.ggml.padding_token_id", eos_id)
    for name, value in (("eos", eos_id), ("bos", bos_id), ("padding", pad_id)):
        if value is not None and not 0 <= value < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{name}_token_id {value} is outside the vocabulary of {len(tokens)}")
    stop_ids = {eos_id} | {
        i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and text in END_OF_TURN_TEXTS
    }
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        declared = gguf_field(reader, key, None)
        if declared is not None and 0 <= declared < len(tokens):
            stop_ids.add(declared)
    return HFTokenizer(
        _gguf_bpe(reader, tokens, types),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        stop_ids=stop_ids,
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=gguf_field(reader, "tokenizer.chat_template", None),
    )


def _gguf_bpe(reader, tokens, types):
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF tokens, merges and token types."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    path = reader.data.filename
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})"
        )
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) and user-defined ones are matched whole in the text.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    )
    return backend
