"""One request on the engine: its state from `Engine.add` to its last output, and what a step hands back."""

from dataclasses import dataclass

import torch

from ..text.detokenizer import Detokenizer
from .sampling import SamplingParams, chosen_logprobs, top_logprobs


@dataclass
class RequestOutput:
    """What one step did for one request: its new ids and text (the prompt's first, with echo)."""

    request_id: int
    token_ids: list
    text: str
    finished: bool
    finish_reason: "str | None" = None  # "stop" (a stop id or string), "length" (max_tokens), "abort"
    logprobs: "list | None" = None  # per id of token_ids, when asked (the first prompt id: 0.0)
    top_logprobs: "list | None" = None  # per id: [(id, logprob), ...] likeliest first, when asked
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache instead of a prefill


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One request's two successive outputs of a step as one (several tokens arrive together)."""
    def join(a, b):
        return None if a is None else a + b
    return RequestOutput(first.request_id, first.token_ids + then.token_ids, first.text + then.text, then.finished,
                         then.finish_reason, join(first.logprobs, then.logprobs), join(first.top_logprobs, then.top_logprobs),
                         then.cached_tokens)


class Request:
    """One request's state from `add` to its last output."""

    def __init__(self, request_id: int, prompt: list, params: SamplingParams, max_tokens: int, tokenizer, vocab_size, device):
        self.id, self.prompt, self.params, self.max_tokens = request_id, prompt, params, max_tokens
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.output_ids = []
        self.row = None  # its KV-cache row once admitted
        self.n_cached = 0  # how many of its tokens have their K/V in the cache
        self.cached_tokens = 0  # how many of those the prefix cache gave it
        self.detokenizer = Detokenizer(tokenizer, params.stop, prompt if params.echo else ())
        # (vocab,): how often each id was generated, for the penalties
        self.counts = torch.zeros(vocab_size, device=device) if params.penalized else None
        # With echo and logprobs the prompt's own scores go out with the first new token (the first has none).
        self.prompt_logprobs = [0.0] if params.echo and params.logprobs else None
        self.prompt_top_logprobs = [[]] if params.echo and params.top_logprobs else None
        self.matcher = None  # its constraint's llguidance matcher (constraints.py), if it has one
        self.drafter = None  # its prompt-lookup guesses (speculation.py), if it guesses

    @property
    def decoding(self) -> bool:
        return self.n_cached >= len(self.prompt)

    @property
    def scores_prompt(self) -> bool:
        """Echo with logprobs: every prompt position's logits are needed, so none may be reused."""
        return self.prompt_logprobs is not None

    def score_prompt(self, logits, targets) -> None:
        """Echoed prompt logprobs: the logits at position p score the prompt token at p + 1."""
        if not targets:
            return
        targets_t = torch.tensor(targets, device=logits.device)
        self.prompt_logprobs += chosen_logprobs(logits, targets_t).tolist()
        if self.prompt_top_logprobs is not None:
            ids, values = top_logprobs(logits, self.params.top_logprobs)
            self.prompt_top_logprobs += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def asked(self, lps, tops) -> tuple:
        """(logprobs, top_logprobs) for its output: each None unless its params ask for it."""
        p = self.params
        return (lps if p.logprobs else None), (tops if p.top_logprobs else None)
