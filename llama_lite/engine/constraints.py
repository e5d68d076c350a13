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
regex with look-around, a grammar that does not parse) or that no text satisfies (`minimum` above
`maximum`, a `$ref` cycle with no way to end) is a ValueError naming it when the SamplingParams are
made, before any token; nothing ever runs unconstrained, and nothing ends empty for want of a value.
"""

import functools
import json
import re
import threading
from collections import OrderedDict

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "grammar")  # the SamplingParams fields that constrain

# Compact JSON, as OpenAI's replies and json.dumps(separators=(",", ":")): no whitespace between
# tokens (where JSON allows it a small model writes newlines until max_tokens). A schema's top-level
# "x-guidance": {"whitespace_flexible": true} opts in to whitespace, up to 20 characters at each place
# (llguidance's own flexible whitespace is unbounded); its other "x-guidance" settings apply as given.
JSON_DEFAULTS = {"whitespace_flexible": False}
FLEXIBLE_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"
ANY_OBJECT = {"type": "object"}
TOKEN_REFERENCE = re.compile(r"<[^\s<>]+>")  # a Lark grammar's <|im_end|>, <[2]>: not in the bytes' vocabulary
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
    try:
        return _compile_schema(value) if kind == "json_schema" else _compile(kind, value)
    except ValueError as e:
        name = name or "SamplingParams." + kind
        reason = re.sub(r"^Unsatisfiable( schema)?: ", "", str(e))
        if reason != str(e):  # valid, but nothing fits it: every request would end empty
            nothing = "no value satisfies" if kind == "json_schema" else "no text matches"
            fix = "" if ";" in reason else "; change that part"
            raise ValueError(f"{nothing} {name}: {reason}{fix}") from None
        raise ValueError(f"{name} cannot be enforced: {e}; change or remove that part") from None


def _compile_schema(schema) -> str:
    """A JSON Schema's grammar; llguidance names a contradiction first, then a $ref cycle with no way
    to end (which llguidance compiles), then a grammar that stops at once for any other reason."""
    if schema is True:  # any JSON value ("x-guidance" needs an object)
        schema = {}
    if schema is False or isinstance(schema, dict) and (schema.get("not") is True or schema.get("not") == {}):
        what = "false" if schema is False else f'"not": {json.dumps(schema["not"])}'
        raise ValueError(f"Unsatisfiable schema: {what} accepts no value; pass true or {{}} for any JSON value")
    grammar = _compile("json_schema", json.dumps(_with_bounded_whitespace(schema)))  # keeps the properties' order
    if isinstance(schema, dict):
        ends = _Termination(schema)
        if ends.refs and not ends.finite(schema):
            raise ValueError(f"Unsatisfiable schema: it refers back to itself with no way to end ($ref "
                             f"{', '.join(sorted(ends.refs))}); make the recursion optional (not required, or minItems 0)")
    _check_some_text_matches(grammar)
    return grammar


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
    if kind == "regex" or kind == "grammar" and not TOKEN_REFERENCE.search(text):  # a schema: _compile_schema
        _check_some_text_matches(grammar)
    return grammar


class _Termination:
    """Which schemas some finite JSON value can satisfy, as far as their $refs go (the least fixed
    point over the local $refs); an unknown keyword or a remote $ref counts as satisfiable."""

    def __init__(self, root: dict):
        self.root, self.refs, self.ending = root, set(), set()
        self._collect(root)
        grew = True
        while grew:  # a ref ends once its target can end with what is known to end so far
            grew = False
            for ref in self.refs - self.ending:
                if self.finite(self._target(ref)):
                    self.ending.add(ref)
                    grew = True
        self.refs -= self.ending  # left: the refs that never end

    def _collect(self, node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#") and self._target(ref) is not None:
                self.refs.add(ref)
            for value in node.values():
                self._collect(value)
        elif isinstance(node, list):
            for value in node:
                self._collect(value)

    def _target(self, ref: str):
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def finite(self, node) -> bool:
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if ref in self.refs and ref not in self.ending:
            return False
        if not all(self.finite(s) for s in node.get("allOf", [])):
            return False
        branches = node.get("anyOf", node.get("oneOf"))
        if isinstance(branches, list) and branches and not any(self.finite(s) for s in branches):
            return False
        types = node.get("type", ["object", "array", "string"])
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        if "enum" in node or "const" in node or not {"object", "array"}.issuperset(types):
            return True  # a scalar can always end
        return ("object" in types and self._object_ends(node)) or ("array" in types and self._array_ends(node))

    def _object_ends(self, node) -> bool:
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        others = True if node.get("patternProperties") else node.get("additionalProperties", True)
        return all(self.finite(properties.get(name, others)) for name in node.get("required", []) if isinstance(name, str))

    def _array_ends(self, node) -> bool:
        prefix, items = node.get("prefixItems", []), node.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, node.get("additionalItems", True)
        needed = node.get("minItems", 0) if isinstance(node.get("minItems", 0), int) else 0
        return all(self.finite(prefix[i] if i < len(prefix) else items) for i in range(min(needed, len(prefix) + 1)))


def _with_bounded_whitespace(schema):
    """The schema with its "x-guidance" whitespace opt-in bounded to FLEXIBLE_WHITESPACE."""
    options = schema.get("x-guidance") if isinstance(schema, dict) else None
    if isinstance(options, dict) and options.get("whitespace_flexible") is True and "whitespace_pattern" not in options:
        return {**schema, "x-guidance": {**options, "whitespace_pattern": FLEXIBLE_WHITESPACE}}
    return schema


class _Bytes:
    """A vocabulary of the 256 bytes and an end token: enough for llguidance to say whether a grammar
    admits any text at all, before a model's vocabulary is at hand."""

    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([b]) for b in range(256)] + [b""]

    def __call__(self, text):
        return list(text.encode("utf-8") if isinstance(text, str) else text)


@functools.cache
def _byte_tokenizer():
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), n_vocab=257)


@functools.lru_cache(maxsize=256)
def _check_some_text_matches(grammar: str) -> None:
    """ValueError when the grammar admits no text: its matcher stops before the first byte (a `$ref`
    that only refers back to itself compiles to such a grammar, and would end every request empty)."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    matcher.compute_bitmask()  # the matcher learns that it is stopped only when asked for a mask
    stopped = matcher.is_stopped() or matcher.get_error().startswith("NoExtension")
    if stopped and not matcher.is_accepting():
        raise ValueError("Unsatisfiable: it admits no text at all, not even a first character")
    if matcher.is_error() and not stopped:
        raise ValueError(_one_line(matcher.get_error()))


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
