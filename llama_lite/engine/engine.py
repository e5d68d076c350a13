"""The engine: requests join and leave a running batch; each step is one forward call over all of them.

`add` queues a request; `step` admits waiting requests first come, first served into free KV-cache
rows, feeds every decoding request its last token and as many prompt tokens as the step's token
budget leaves (a long prompt is prefilled in chunks over several steps, so running requests keep
decoding meanwhile), samples each request's next token with its own settings, and reports what
changed; `abort` ends a request and frees its row for the next step. A request with structured
output (a JSON Schema, regex or grammar) has its row of logits masked by its matcher before
sampling (constraints.py: `Grammars`); the others are untouched. Everything else
(`text_completion`, `chat_completion`, `stream`, the scripts, the server) drives this loop.
With the prefix cache (prefix_cache.py) an admitted request first reuses the K/V of the longest
beginning of its prompt that a row holds; with speculative decoding (speculation.py) a decoding
request may feed guesses after its last token and keep those its own draws agree with (`_verify`).
In float32 (eager) a request's tokens never depend on what else runs, when it arrived, or which row
it holds: docs/design/batch-invariance.md.
"""

from collections import deque

import torch

from ..checks import check_whole, is_whole
from .constraints import Grammars
from .prefix_cache import PrefixCache, Reuse
from .prompts import check_prompt
from .request import Request, RequestOutput, merge_outputs
from .request_sampling import requests_logprobs, sample_requests
from .sampling import SamplingParams
from .speculation import Acceptance, Drafter, check_speculative, plan_drafts


def prompt_chunk(remaining: int, budget: int, least: int = 2) -> int:
    """How many of a prompt's remaining tokens to feed this step: all that fit the budget, but never a
    piece of fewer than `least` tokens, now or left for later. Batch invariance needs every token of a
    prompt computed the same way however the prompt was cut, and a one-token segment is computed as
    decoding is; on the compiled int4 path, chunks of the model's tiled_chunks or more are computed in
    tiles, shorter ones not (Engine._least_chunk)."""
    n = min(remaining, budget)
    if n < remaining:
        n = min(n, remaining - least)  # leave `least` or more for later
        if n < least:
            return 0
    return n


class Engine:
    def __init__(self, model, tokenizer, generator: torch.Generator, max_step_tokens: int = 512, prefix_cache=True,
                 speculative="auto"):
        """`generator` serves requests without a seed. `max_step_tokens`: the tokens one forward call
        may feed (decoding rows first, then prompt chunks); it bounds how long a step takes.
        `prefix_cache`: reuse the K/V of prompt beginnings the cache's rows still hold.
        `speculative`: "auto" guesses tokens by prompt lookup where that pays, "ngram" always
        (speculation.py), "off" never."""
        check_whole("max_step_tokens", max_step_tokens, 1)
        check_speculative(speculative)
        self.speculative = speculative
        self.acceptance = Acceptance()  # how many guesses were accepted, for reports
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.max_step_tokens = max_step_tokens
        self.device = next(model.parameters()).device
        self.free_rows = list(range(model.params.max_batch_size))
        kv_cache = getattr(model, "cache", None)  # (a test's scripted model has none)
        self.prefix = PrefixCache(kv_cache) if prefix_cache and kv_cache is not None else None
        self.requests = {}  # request id -> Request, until its last output
        self.waiting = deque()  # not yet admitted, oldest first
        self.running = []  # admitted (holding a row), oldest first
        self.aborted = []  # outputs of requests aborted since the last step
        self.next_id = 0  # the id the next request gets: ids below it were given
        self.grammars = Grammars(tokenizer, model.params.vocab_size)  # structured output's masks

    # --- requests in and out ------------------------------------------------------------------------

    def add(self, prompt_ids, params: "SamplingParams | None" = None) -> int:
        """Queue a request; its id. Raises ValueError for an empty or too long prompt, ids outside the
        vocabulary, or max_tokens beyond the KV cache's end."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        p = self.model.params
        check_prompt(prompt_ids, p, max(params.max_tokens or 0, 1), ("max_tokens", params.max_tokens))
        matcher = self.grammars.matcher(params)
        max_tokens = params.max_tokens or p.max_seq_len - len(prompt_ids)  # None: up to the cache's end
        request = Request(self.next_id, list(prompt_ids), params, max_tokens, self.tokenizer, p.vocab_size, self.device)
        self.next_id += 1
        request.matcher = matcher
        if self.speculative != "off" and matcher is None:  # (a constrained request's matcher advances one token at a time)
            request.drafter = Drafter(request.prompt)
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> None:
        """End a request (finish reason "abort", reported by the next step); its row is free at once. A finished
        request is left alone (servers abort those routinely); an id this engine never gave is a ValueError."""
        if not (is_whole(request_id) and 0 <= request_id < self.next_id):
            raise ValueError(f"request id {request_id!r} was never given by this engine; pass an id engine.add returned")
        request = self.requests.get(request_id)
        if request is None:
            return
        if request.row is None:
            self.waiting.remove(request)
        self.aborted.append(self._finish(request, "abort", [], ""))

    def has_unfinished(self) -> bool:
        """Whether any request has yet to report its end (an aborted one reports at the next step)."""
        return bool(self.requests or self.aborted)

    # --- one step ------------------------------------------------------------------------------------

    def _schedule(self):
        """(request, ids to feed) for this step: every decoding request's last token, then prompt
        chunks of admitted requests, then newly admitted ones, while the token budget lasts."""
        if self.prefix:
            self.prefix.drop_if_overwritten()
        budget = self.max_step_tokens
        decoding = [r for r in self.running if r.decoding]
        limits = [r.max_tokens - len(r.output_ids) - 1 for r in decoding]  # a guess never passes max_tokens
        # "auto": what the model says pays; "ngram": no bound, every request pausing after misses
        most, free = self.model.draft_budget(len(decoding)) if self.speculative == "auto" else (None, False)
        drafts = plan_drafts([r.drafter for r in decoding], limits, most, pausing=not free)
        work = [(r, r.output_ids[-1:] + guess) for r, guess in zip(decoding, drafts)]
        budget -= sum(len(ids) for _, ids in work)
        for request in self.running:
            n = 0 if request.decoding else prompt_chunk(len(request.prompt) - request.n_cached, budget,
                                                        self._least_chunk(request))
            if n:
                work.append((request, request.prompt[request.n_cached : request.n_cached + n]))
                budget -= n
        while self.waiting and self.free_rows:
            request = self.waiting[0]
            reuse = self._place(request)
            n = reuse and prompt_chunk(len(request.prompt) - reuse.length, budget, self._least_chunk(request))
            if not n:  # it waits for its shared beginning (see PrefixCache.plan) or for budget
                break
            self.waiting.popleft()
            self.free_rows.remove(reuse.row)
            request.row = reuse.row
            self.running.append(request)
            if self.prefix:
                self.prefix.take(reuse, request.prompt, self._cache_key(request), not request.scores_prompt,
                                 self._least_chunk(request))
            request.n_cached = request.cached_tokens = reuse.length
            work.append((request, request.prompt[reuse.length : reuse.length + n]))
            budget -= n
        return work

    def _place(self, request) -> "Reuse | None":
        """The free row a waiting request takes, the lowest (decoding attends over rows 0.. up to the
        highest decoding one, so busy rows stay together), and with the prefix cache the K/V it
        reuses; None: it waits."""
        if self.prefix is None:
            return Reuse(min(self.free_rows), min(self.free_rows), 0)
        return self.prefix.plan(request.prompt, self._cache_key(request), self.free_rows, not request.scores_prompt,
                                self._least_chunk(request))

    def _least_chunk(self, request) -> int:
        """The fewest tokens a piece of this request's prompt may have (prompt_chunk): the model's
        tiled_chunks for a prompt at least that long (each piece is then computed in tiles), else 2
        (each piece, shorter, is not). Where the step budget cannot hold such a piece, none is tiled."""
        tiled = getattr(self.model, "tiled_chunks", None)
        return tiled if tiled and tiled <= self.max_step_tokens and len(request.prompt) >= tiled else 2

    def _cache_key(self, request) -> tuple:
        """What the prefix cache keeps a request's K/V under: its cache_salt, and whether its prompt is
        computed in tiles (_least_chunk), whose K/V are not the bits the other kind's would be."""
        return request.params.cache_salt, self._least_chunk(request)

    @torch.inference_mode()
    def step(self) -> list:
        """Run one step; a RequestOutput for each request that got a token, finished or was aborted."""
        outputs, self.aborted = self.aborted, []
        if not self.running:  # between requests: the one place the decode path may change
            self.model.adopt_compiled_step()
        work = self._schedule()
        if not work:
            return outputs
        tokens, segments, logits_at, samplers, scored = [], [], [], [], []
        for request, ids in work:
            first, end = len(tokens), request.n_cached + len(ids)  # end: its cached tokens after this step
            tokens += ids
            if request.decoding:  # its last token and its guesses, each a one-token segment (decoded as alone)
                segments += [(request.row, request.n_cached + i, 1) for i in range(len(ids))]
                logits_at += range(first, first + len(ids))
                samplers.append((request, len(logits_at) - len(ids), ids[1:]))
            elif request.prompt_logprobs is not None:  # echo: score the prompt's own tokens
                segments.append((request.row, request.n_cached, len(ids)))
                scored.append((request, len(logits_at), request.prompt[request.n_cached + 1 : end + 1]))
                logits_at += range(first, first + len(ids))
                if end >= len(request.prompt):
                    samplers.append((request, len(logits_at) - 1, []))
            else:
                segments.append((request.row, request.n_cached, len(ids)))
                if end >= len(request.prompt):  # its next token is due
                    logits_at.append(first + len(ids) - 1)
                    samplers.append((request, len(logits_at) - 1, []))
        device = self.device
        logits = self.model.forward_segments(torch.tensor(tokens, device=device), segments,
                                             torch.tensor(logits_at, dtype=torch.long, device=device))
        for request, at, targets in scored:
            request.score_prompt(logits[at : at + len(targets)], targets)
        for request, ids in work:
            request.n_cached += len(ids)
        if self.prefix:
            self.prefix.prefilled([(request.row, request.n_cached) for request, _ in work])
        if samplers:
            requests = [r for r, _, _ in samplers]
            next_logits = logits[torch.tensor([at for _, at, _ in samplers], device=device)]  # (n, vocab)
            chosen = sample_requests(requests, self.grammars.mask(requests, next_logits), self.generator)
            lps, tops = requests_logprobs(requests, next_logits, chosen)  # logprobs: the model's own
            for (request, at, guesses), token, lp, top in zip(samplers, chosen.tolist(), lps, tops):  # one host sync
                output = self._advance(request, token, lp, top)
                if guesses:
                    output = self._verify(request, output, token, guesses, logits[at + 1 : at + 1 + len(guesses)])
                outputs.append(output)
        return outputs

    def _verify(self, request, output, token, guesses, logits) -> RequestOutput:
        """Keep a request's guesses while each equals the token drawn before it, drawing each next token
        as plain decoding would from the guess's logits (len(guesses), vocab); `output`, `token`: the
        step's first. One output for all its new tokens."""
        accepted = 0
        for guess, row in zip(guesses, logits.split(1)):
            if output.finished or token != guess:
                break
            accepted += 1
            chosen = sample_requests([request], row, self.generator)
            lps, tops = requests_logprobs([request], row, chosen)
            token = chosen.item()  # a host sync per kept guess
            output = merge_outputs(output, self._advance(request, token, lps[0], tops[0]))
        request.n_cached -= len(guesses) - accepted  # rejected guesses' K/V stay behind, never seen, overwritten later
        request.drafter.update(len(guesses), accepted)
        self.acceptance.add(len(guesses), accepted)
        return output

    def _advance(self, request, token: int, logprob, top) -> RequestOutput:
        """Record a request's new token; finish it on a stop id, a stop string, a complete constrained
        text or max_tokens."""
        ids, lps, tops = [], [], []
        if request.params.echo and not request.output_ids:
            ids = list(request.prompt)
            lps, tops = request.prompt_logprobs or [], request.prompt_top_logprobs or []
        if token in self.tokenizer.stop_ids:
            return self._finish(request, "stop", ids, "", lps, tops)
        request.output_ids.append(token)
        ids, lps, tops = ids + [token], lps + [logprob], tops + [top]
        if request.counts is not None:
            request.counts[token] += 1
        if request.drafter is not None:
            request.drafter.extend([token])
        text = request.detokenizer.add([token])
        if request.detokenizer.stopped or self.grammars.advance(request, token):
            return self._finish(request, "stop", ids, text, lps, tops)
        if len(request.output_ids) >= request.max_tokens:
            return self._finish(request, "length", ids, text, lps, tops)
        return RequestOutput(request.id, ids, text, False, None, *request.asked(lps, tops), request.cached_tokens)

    def _finish(self, request, reason, ids, text, lps=(), tops=()) -> RequestOutput:
        """Take a request out (its row back to the free rows); its last output."""
        del self.requests[request.id]
        if request.row is not None:
            self.running.remove(request)
            self.free_rows.append(request.row)
            if self.prefix:
                self.prefix.release(request.row)
            request.row = None
        text += request.detokenizer.finish()
        return RequestOutput(request.id, ids, text, True, reason, *request.asked(list(lps), list(tops)),
                             request.cached_tokens)
