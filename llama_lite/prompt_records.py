"""A prompt file's record as the token ids the model runs, checked, and its result line, in input
order: what `complete` does and what each worker of a batch job (cluster/) does, written once."""

import json


def record_tokens(llm, record: dict, chat: bool) -> list:
    """The ids of a record: its "prompt" as text, or with `chat` its "messages" (or its prompt as one
    user turn) through the checkpoint's chat template."""
    if not chat:
        return llm.tokenizer.encode(record["prompt"], bos=llm.tokenizer.add_bos, eos=False)
    if not llm.tokenizer.chat_template:
        raise ValueError("this checkpoint has no chat template; run without --chat")
    return llm.chat_prompt_tokens(record.get("messages") or [{"role": "user", "content": record["prompt"]}])


def checked_tokens(llm, record: dict, chat: bool, max_gen_len: int) -> list:
    """record_tokens, with ValueError when the prompt is empty or leaves no room for max_gen_len."""
    ids, limit = record_tokens(llm, record, chat), llm.model.params.max_seq_len
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give it some text")
    if len(ids) + max_gen_len > limit:
        raise ValueError(f"the prompt has {len(ids)} tokens, and with --max_gen_len {max_gen_len} it exceeds "
                         f"--max_seq_len {limit}; shorten it or raise --max_seq_len")
    return ids


def result_line(record: dict, generation: str, error: "str | None" = None) -> str:
    """A record's line of complete's output: the record with its generation (and the error that kept
    a batch job's row from running, if any), as one JSON line."""
    extra = {} if error is None else {"error": error}
    return json.dumps({**record, "generation": generation, **extra}, ensure_ascii=False) + "\n"


def in_order(pairs, start: int = 0):
    """(index, item) pairs that come in any order, yielded as (index, item) from index `start` up, each
    as soon as every one before it has come: results are written in input order while later ones run."""
    waiting, next_index = {}, start
    for index, item in pairs:
        waiting[index] = item
        while next_index in waiting:
            yield next_index, waiting.pop(next_index)
            next_index += 1
