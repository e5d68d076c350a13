"""How the next token is picked: the settings (`SamplingParams`) and pure functions from logits to ids.

`generate` (Meta's loop, one setting for the whole batch) and the engine (settings per request) both
sample with `sample` and score with `chosen_logprobs` / `top_logprobs`, so there is one copy of each.
"""

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_whole, is_whole


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(temperature, top_p, top_k) -> None:
    """Raise ValueError for sampling settings that mean nothing, before any work is done."""
    if not _is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if top_k is not None:
        check_whole("top_k", top_k, 1, hint=", or None for no limit;")


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings, checked when made (a bad value is a ValueError naming the field).

    temperature 0 is greedy; top_k then top_p cut the candidates; max_tokens None runs to the KV
    cache's end; stop: strings that end the text before them (a str or a list of them); seed: the
    request samples from its own generator, so its tokens depend on nothing else in the batch;
    logprobs: the log-probability of each token (temperature-free model distribution), and
    top_logprobs the likeliest 0-20 alternatives too; echo: the prompt comes first in the output;
    presence_penalty / frequency_penalty (OpenAI's, -2..2): logits of tokens already generated are
    lowered by the first once and by the second per time they occurred; cache_salt: the request shares
    cached prompt K/V only with requests of the same salt (a tenant's secret keeps others from timing
    its prompts).

    Structured output (at most one; constraints.py): json_schema, a dict or its JSON text, makes the
    output an instance of that schema; json_object any JSON object; regex a full match of it; grammar
    a match of that Lark grammar (llguidance's syntax). One that cannot be enforced is a ValueError
    naming what is unsupported, here, before any token.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: "int | None" = None
    max_tokens: "int | None" = None
    stop: tuple = ()
    seed: "int | None" = None
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cache_salt: "str | None" = None
    json_schema: "dict | None" = None
    json_object: bool = False
    regex: "str | None" = None
    grammar: "str | None" = None

    def __post_init__(self):
        def field(name, ok, allowed):
            if not ok(getattr(self, name)):
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        field("temperature", lambda x: _is_number(x) and x >= 0, "a finite number >= 0 (0 is greedy)")
        field("top_p", lambda x: _is_number(x) and 0 < x <= 1, "in (0, 1] (1 keeps every token)")
        field("top_k", lambda x: x is None or is_whole(x) and x >= 1, "a whole number >= 1, or None for no limit")
        field("max_tokens", lambda x: x is None or is_whole(x) and x >= 1, "a whole number >= 1, or None to fill the context")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"SamplingParams.stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        field("seed", lambda x: x is None or is_whole(x) and -(2**63) <= x < 2**64, "a whole number (64-bit) or None")
        field("logprobs", lambda x: isinstance(x, bool), "True or False")
        field("top_logprobs", lambda x: is_whole(x) and 0 <= x <= 20, "a whole number in 0..20")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("SamplingParams.top_logprobs needs logprobs=True")
        field("echo", lambda x: isinstance(x, bool), "True or False")
        for name in ("presence_penalty", "frequency_penalty"):
            field(name, lambda x: _is_number(x) and -2 <= x <= 2, "a number in [-2, 2] (0 is off)")
        field("cache_salt", lambda x: x is None or isinstance(x, str) and x, "a non-empty string or None")
        self._check_constraint()

    def _check_constraint(self):
        from . import constraints

        if isinstance(self.json_schema, str):
            try:
                object.__setattr__(self, "json_schema", json.loads(self.json_schema))
            except ValueError as e:
                raise ValueError(f"SamplingParams.json_schema is not valid JSON ({e}); pass a dict or JSON text") from None
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise ValueError("SamplingParams.json_schema must be a JSON Schema (a dict or its JSON text), "
                             f"got {self.json_schema!r}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"SamplingParams.json_object must be True or False, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"SamplingParams.{name} must be a non-empty string or None, got {value!r}")
        given = [k for k in constraints.KINDS if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"SamplingParams takes one constraint; got {' and '.join(given)}")
        constraints.grammar_of(self)  # a ValueError if it cannot be enforced

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


SEED_RANGE = 2**64  # torch's generators take seeds in [-2**63, 2**64); -1 and 2**64 - 1 are the same seed


def request_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th request of a job seeded with `seed`: seed + index (mod 2**64), as
    vLLM seeds the n choices of a request. Each prompt (and each choice) of a job samples from its own
    generator, so its text depends only on the job's seed and its place in the job, never on the batch
    size, the other prompts or where a resumed job restarted (a job resumed at prompt K passes
    request_seed(seed, K) as its seed)."""
    return (seed + index) % SEED_RANGE


def draw_seed(generator: torch.Generator) -> int:
    """A fresh seed from `generator` (the Llama's, seeded by Llama.build(seed=...)), for a job that
    brings none: a seeded Llama's calls repeat in the order they are made."""
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


# Top-p first looks among this many likeliest tokens: finding them with topk costs ~0.6 ms for 8 rows of
# 49k, sorting the whole vocabulary ~14 ms (on 2 cores), and a nucleus rarely reaches past a few hundred.
TOP_P_CANDIDATES = 256


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k=None, generator=None) -> torch.Tensor:
    """One token id per row of `logits` (bsz, vocab): greedy at temperature 0, else from
    softmax(logits / temperature) cut to the `top_k` likeliest, then to the smallest set of them
    whose probability reaches `top_p` (the likeliest token is always kept)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    k = vocab if top_k is None else min(top_k, vocab)
    if top_p >= 1 and k == vocab:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    # On a CPU, rank only the likeliest candidates first, and all k only when their mass falls short
    # (a flat distribution). Elsewhere sorting is cheap, and that check would be a host sync.
    few = top_p < 1 and probs.device.type == "cpu"
    probs_sorted, order = torch.topk(probs, min(k, TOP_P_CANDIDATES) if few else k, dim=-1)  # likeliest first
    if probs_sorted.shape[-1] < k and not bool((probs_sorted.sum(-1) >= top_p).all()):
        probs_sorted, order = torch.topk(probs, k, dim=-1)
    if top_p < 1:
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)  # renormalises itself
    return torch.gather(order, -1, choice).squeeze(-1)


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * count - presence * (count > 0), per token generated so far.
    logits, counts: (vocab,) or broadcastable."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def chosen_logprobs(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the chosen ids: (..., vocab), (...) -> (...)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, chosen[..., None]).squeeze(-1)


def top_logprobs(logits: torch.Tensor, n: int):
    """The n likeliest ids and their log-probabilities: (..., vocab) -> two (..., n)."""
    values, ids = torch.topk(F.log_softmax(logits.float(), dim=-1), n, dim=-1)
    return ids, values
