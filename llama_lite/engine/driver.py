"""`Driver`: requests run on the engine for a caller that waits for them (`Llama`'s text_completion,
chat_completion, stream and as_completed), the engine stepped from the caller's own thread.

Several runs may be open at once (a paused stream while a batch completes): whichever has nothing to
read steps the engine, and outputs of the other runs' requests wait unread until their reader comes
back. A request whose reader stops early (a closed stream, an error, Ctrl-C) is aborted.
"""

import dataclasses
import sys
import time

from tqdm import tqdm

from ..model import parallel
from .sampling import draw_seed, request_seed

# A generation without a length limit (max_gen_len=None) that has repeated one span of at most
# LOOP_PERIOD tokens verbatim for its last LOOP_WINDOW tokens has fallen into a loop a small model
# never leaves (1 in 4 sampled runs of "Hi" on SmolLM2 did, until the context's end): it ends there.
LOOP_WINDOW, LOOP_PERIOD = 256, 64


class Driver:
    def __init__(self, engine):
        self.engine = engine
        self.unread = {}  # request id -> its outputs not yet read, for the requests of open runs

    def add_all(self, prompt_tokens, params) -> list:
        """Add each prompt as a request with its SamplingParams (params[i] for prompt i): their ids
        (nothing added if one is refused)."""
        ids = []
        try:
            for prompt, its_params in zip(prompt_tokens, params):
                ids.append(self.engine.add(prompt, its_params))
                self.unread[ids[-1]] = []
        except BaseException:
            for rid in ids:
                self.unread.pop(rid, None)
                self.engine.abort(rid)
            raise
        return ids

    def run(self, request_ids):
        """Step the engine until these requests finish, yielding their outputs as they come."""
        pending = set(request_ids)
        try:
            while pending:
                ready = [out for rid in request_ids if rid in pending for out in self._read(rid)]
                if not ready:
                    waiting = any(rid in self.engine.requests for rid in pending)
                    if not waiting and not any(out.request_id in pending for out in self.engine.aborted):
                        raise RuntimeError("the engine was stepped directly while these requests ran; their outputs are gone")
                    for out in self.engine.step():
                        if out.request_id in self.unread:
                            self.unread[out.request_id].append(out)
                for out in ready:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            for rid in request_ids:
                self.unread.pop(rid, None)
                if rid in pending:
                    self.engine.abort(rid)

    def _read(self, rid) -> list:
        """A request's unread outputs, now read."""
        box = self.unread[rid]
        read, box[:] = list(box), []
        return read

    def completions(self, request_ids, logprobs, stop_loops, progress):
        """Run the requests; yield (request id, result) as each finishes. A result: tokens, text,
        logprobs (or None) and finish_reason. `stop_loops`: a request whose text repeats itself
        verbatim (LOOP_WINDOW) ends there, finish reason "length". `progress`: a bar on stderr."""
        looped = set()
        results = {rid: {"tokens": [], "text": [], "logprobs": [] if logprobs else None} for rid in request_ids}
        bar = tqdm(total=len(request_ids), desc="completing", unit="prompt", file=sys.stderr,
                   disable=not progress or not parallel.is_main())
        started, n_new = time.perf_counter(), 0
        try:
            for out in self.run(request_ids):
                result = results[out.request_id]
                result["tokens"] += out.token_ids
                result["text"].append(out.text)
                if logprobs:
                    result["logprobs"] += out.logprobs
                n_new += len(out.token_ids)
                if stop_loops and not out.finished and repeats_itself(result["tokens"]):
                    looped.add(out.request_id)
                    self.engine.abort(out.request_id)  # its last output comes at the next step
                if out.finished:
                    bar.set_postfix_str(f"{n_new / (time.perf_counter() - started):.1f} tok/s", refresh=False)
                    bar.update(1)
                    reason = "length" if out.request_id in looped else out.finish_reason
                    yield out.request_id, {**result, "text": "".join(result["text"]), "finish_reason": reason}
        finally:
            bar.close()


def seeded_per_prompt(params, n, generator) -> list:
    """`params` for each of n prompts, prompt i seeded request_seed(seed, i); without a seed, the
    batch's seed is drawn from `generator` (Llama.build's seed)."""
    base = draw_seed(generator) if params.seed is None else params.seed
    return [dataclasses.replace(params, seed=request_seed(base, i)) for i in range(n)]


def repeats_itself(tokens) -> bool:
    """Whether the last LOOP_WINDOW tokens repeat one span of at most LOOP_PERIOD tokens verbatim."""
    if len(tokens) < LOOP_WINDOW:
        return False
    tail = tokens[-LOOP_WINDOW:]
    return any(tail[-1] == tail[-1 - p] and tail[p:] == tail[:-p] for p in range(1, LOOP_PERIOD + 1))
