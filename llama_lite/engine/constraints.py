"""Structured output: a request's text held to a JSON Schema, a regex or a grammar, token by token.

llguidance (the grammar engine of llama.cpp's and vLLM's structured output; Rust, a CPU, no Python
dependencies) compiles the constraint into a matcher over our vocabulary's bytes. Before each of a
constrained request's tokens is sampled, its matcher gives the ids that keep the text a prefix of
something the constraint accepts; every other logit of that row becomes -inf. The sampled token then
advances the matcher. Stop ids are allowed only once the text is complete, and a request whose
grammar admits nothing more ends at once (finish reason "stop"). Rows without a constraint are not
touched, so they pay nothing, and a constrained row's mask depends only on its own tokens, so batch
invariance holds.

Fail closed: a constraint llguidance cannot enforce (a JSON Schema keyword it does not implement, a
regex with look-around, a grammar that does not parse) is a ValueError naming it when the
SamplingParams are made, before any token; nothing ever runs unconstrained.
"""

import functools
import json
import re
import threading
from collections import OrderedDict

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "grammar")  # the SamplingParams fields that constrain

# JSON whitespace: up to 20 characters wherever JSON allows it (llguidance's default is unbounded,
# and a small model sampling at temperature 1 can then write newlines until max_tokens). A schema's
# own top-level "x-guidance" settings override this.
JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,20}"}
ANY_OBJECT = {"type": "object"}
MATCHER_CACHE = 64  # compiled matchers kept per engine: a repeated constraint starts from a copy (~10 us)


def grammar_of(params) -> "str | None":
    """llguidance's grammar for a SamplingParams' constraint, or None when it has none."""
    if params.json_schema is not None:
        return compile_constraint("json_schema", params.json_schema)
    if params.json_object:
        return compile_constraint("json_schema", ANY_OBJECT)
    if params.regex is not None:
        return compile_constraint("regex", params.regex)
    if params.grammar is not None:
        return compile_constraint("grammar", params.grammar)
    return None


def compile_constraint(kind: str, value, name: "str | None" = None) -> str:
    """The llguidance grammar enforcing `value` (a JSON Schema dict, a regex or a Lark grammar);
    ValueError naming what cannot be enforced. `name`: how the value is called in that message."""
    text = json.dumps(value) if kind == "json_schema" else value  # keeps the properties' order
    try:
        return _compile(kind, text)
    except ValueError as e:
        raise ValueError(f"{name or 'SamplingParams.' + kind} cannot be enforced: {e}; change or remove that part") from None


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    from llguidance import LLMatcher

    if kind == "json_schema":
        try:
            grammar = LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
        except ValueError as e:  # an "x-guidance" entry of the wrong type
            raise ValueError(_one_line(str(e))) from None
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(text)
    else:
        grammar = LLMatcher.grammar_from_lark(text)
    error = LLMatcher.validate_grammar(grammar)
    if kind == "regex":  # a place in the one-line grammar wrapped around the regex would mislead
        error = re.sub(r"^at \d+\(\d+\): ", "", error)
    if error:
        raise ValueError(_one_line(error))
    return grammar


def _one_line(message: str) -> str:
    """llguidance's message in one line: its first line, and the line saying what is wrong if another."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    said = next((line for line in lines[1:] if line.startswith("error:")), None)
    return lines[0].rstrip(":") + (f" ({said})" if said else "") if lines else message


class _Vocabulary:
    """Our tokenizer as llguidance's TokenizerWrapper reads one: each id's bytes, the special ids
    (whole tokens a grammar never spells out), eos (every stop id) and an encoder."""

    def __init__(self, tokenizer, vocab_size):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        # Ids the model has beyond the tokenizer's: no bytes, never allowed.
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_words)] + [b""] * (vocab_size - tokenizer.n_words)
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, bos=False, eos=False)


class Grammars:
    """One engine's constrained requests: a matcher for each (made by `matcher`), the mask of their
    rows of logits before sampling (`mask`), and each sampled token fed back (`advance`)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltokenizer = None  # built on the first constrained request (~0.3 s for 50k tokens)
        self._compiled = OrderedDict()  # grammar -> a fresh matcher to copy, least recently used first
        self._lock = threading.Lock()  # a server may compile in another thread than the engine's

    def matcher(self, params):
        """A fresh matcher for the request's constraint (None without one); ValueError if it cannot be
        enforced. Safe to call from any thread: a server compiles here ahead of the engine thread."""
        grammar = grammar_of(params)
        if grammar is None:
            return None
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
            lltokenizer = self._llguidance_tokenizer()
        from llguidance import LLMatcher

        compiled = LLMatcher(lltokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise ValueError(f"the constraint cannot be enforced with this vocabulary: {_one_line(compiled.get_error())}")
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > MATCHER_CACHE:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def _llguidance_tokenizer(self):
        if self._lltokenizer is None:
            import llguidance

            wrapper = llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer, self.vocab_size))
            self._lltokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size,
                                                       eos_token=sorted(self.tokenizer.stop_ids))
        return self._lltokenizer

    def mask(self, requests, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (n, vocab), one row per request, with each constrained row's disallowed ids at
        -inf (a new tensor); the same tensor when no request is constrained."""
        rows = [i for i, request in enumerate(requests) if request.matcher is not None]
        if not rows:
            return logits
        words = (self.vocab_size + 31) // 32
        bitmask = np.zeros((len(rows), words), dtype=np.int32)  # (rows, words): bit j of word w allows id 32w + j
        for k, i in enumerate(rows):
            requests[i].matcher.unsafe_compute_mask_ptr(bitmask[k].ctypes.data, bitmask[k].nbytes)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[-1]]  # (rows, vocab)
        allowed = torch.from_numpy(bits.astype(bool)).to(logits.device)
        index = torch.tensor(rows, device=logits.device)
        return logits.index_put((index,), logits[index].masked_fill(~allowed, float("-inf")))

    @staticmethod
    def advance(request, token: int) -> bool:
        """Feed a constrained request its sampled token; True once its grammar admits nothing more
        (the text is complete: the request ends here)."""
        matcher = request.matcher
        if matcher is None:
            return False
        matcher.consume_token(token)
        return matcher.is_stopped()
