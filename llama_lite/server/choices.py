"""A request's choices as its outputs arrive, in OpenAI's shapes: each streamed chunk's choice, the
whole response's choices, the usage, and the logprobs of both endpoints."""

import codecs
import math
import uuid

from .generic_tools import reply_parser

CUT = ("length", "abort")  # finish reasons that can end a reply mid-call


class ChoiceAccumulator:
    """Each choice's text, logprobs, tool calls and finish reason as outputs arrive. `choices`: (choice
    index, prompt ids) pairs, n per prompt. `call_parsing`: (call format, function names, forced) when the chat
    offers tools: each reply's text is then read for calls as it streams (tool_calls.CallParser)."""

    def __init__(self, tokenizer, choices, n, chat, sampling, call_parsing=None):
        self.tokenizer, self.choices, self.n, self.chat = tokenizer, choices, n, chat
        self.parsers = {index: reply_parser(*call_parsing) for index, _ in choices} if call_parsing else None
        self.calls = {index: [] for index, _ in choices}
        self.logprobs, self.echo = sampling["logprobs"], sampling["echo"]
        self.prompt_len = {index: len(prompt) for index, prompt in choices}
        self.text = {index: [] for index, _ in choices}
        self.lp = {index: [] for index, _ in choices}
        self.finish = {index: None for index, _ in choices}
        self.generated = {index: 0 for index, _ in choices}
        self.cached = {index: 0 for index, _ in choices}  # prompt tokens the prefix cache gave each choice
        self.offset = {index: 0 for index, _ in choices}  # characters of text before the next token
        self.utf8 = {index: codecs.getincrementaldecoder("utf-8")("replace") for index, _ in choices}

    def add(self, index, out) -> dict:
        """Record one output; returns the choice as a streamed chunk shows it."""
        first = not self.text[index]
        self.cached[index] = out.cached_tokens
        self.generated[index] += len(out.token_ids) - (self.prompt_len[index] if self.echo and first else 0)
        text = out.text
        if self.parsers:
            text = self._read_calls(index, out, text)
        self.text[index].append(text)
        piece_lp = self._logprobs(index, out) if self.logprobs else None
        if out.finished:
            # a call cut by max_tokens ends "length", as OpenAI's partial calls do
            whole = self.calls[index] and not (self.parsers and self.parsers[index].partial)
            self.finish[index] = "tool_calls" if whole and out.finish_reason == "stop" else out.finish_reason
        if self.chat:
            delta = {"content": text} if text else {}
            if out.finished and self.calls[index]:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(self.calls[index])]
            return {"index": index, "delta": delta, "logprobs": piece_lp, "finish_reason": self.finish[index]}
        return {"index": index, "text": text, "logprobs": piece_lp, "finish_reason": self.finish[index]}

    def response_choices(self) -> list:
        """The choices of a whole (not streamed) response, once every output is added."""
        result = []
        for index, _ in self.choices:
            text = "".join(self.text[index])
            lp = self._shape(self.lp[index]) if self.logprobs else None
            if self.chat:
                message = {"role": "assistant", "content": text or (None if self.calls[index] else "")}
                if self.calls[index]:
                    message["tool_calls"] = self.calls[index]
                result.append({"index": index, "message": message, "logprobs": lp, "finish_reason": self.finish[index]})
            else:
                result.append({"index": index, "text": text, "logprobs": lp, "finish_reason": self.finish[index]})
        return result

    def usage(self) -> dict:
        firsts = [index for index, _ in self.choices if index % self.n == 0]  # each prompt once
        prompt = sum(self.prompt_len[index] for index in firsts)
        completion = sum(self.generated.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached[index] for index in firsts)}}

    def _read_calls(self, index, out, text) -> str:
        """The text that stays content; a finished reply's calls are kept in OpenAI's shape."""
        text = self.parsers[index].feed(text)
        if out.finished:
            rest, calls = self.parsers[index].finish(cut=out.finish_reason in CUT)
            text += rest
            self.calls[index] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                                 for call in calls]
        return text

    def _token(self, token_id, at_start):
        """(token text, its bytes): the bytes it adds to the text (joined they rebuild the text's
        UTF-8); a token holding part of a character shows the bytes escaped, as OpenAI does: "\\xe2\\x80"
        in chat, "bytes:\\xe2\\x80" in completions."""
        raw = self.tokenizer.token_bytes(token_id, at_start)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ("" if self.chat else "bytes:") + raw.decode("utf-8", "backslashreplace")
        return text, list(raw)

    def _logprobs(self, index, out):
        entries = []
        tops = out.top_logprobs or [None] * len(out.token_ids)
        for token_id, logprob, top in zip(out.token_ids, out.logprobs, tops):
            first = not self.lp[index] and not entries  # the text's first token: SentencePiece drops its space
            text, raw = self._token(token_id, first)
            top = [(*self._token(t, first), lp) for t, lp in (top or [])]
            if first and self.echo:  # an echoed prompt's first token has no logprob
                logprob, top = None, None
            entries.append((text, raw, logprob, top, self.offset[index]))
            self.offset[index] += len(self.utf8[index].decode(bytes(raw)))  # the characters it completes
        self.lp[index] += entries
        return self._shape(entries)

    def _shape(self, entries):
        """OpenAI's logprobs object for these (text, bytes, logprob, top, text offset) entries."""
        if self.chat:
            return {"content": [{"token": text, "logprob": _finite(lp), "bytes": raw,
                                 "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": b} for t, b, v in top]}
                                for text, raw, lp, top, _ in entries]}
        return {
            "tokens": [text for text, *_ in entries],
            "token_logprobs": [_finite(lp) for _, _, lp, _, _ in entries],
            "top_logprobs": [None if top is None else {t: _finite(v) for t, _, v in top} for _, _, _, top, _ in entries],
            "text_offset": [offset for *_, offset in entries],
        }


def _finite(x):
    """JSON has no -inf: the logprob of a token ruled out is written -9999.0."""
    return x if x is None or math.isfinite(x) else -9999.0
