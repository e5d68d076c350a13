"""The engine in a thread of its own, for a server whose handlers run on an asyncio loop.

The engine is not thread-safe, so one thread owns it: handlers `submit` requests and `abort` them
through a queue; the thread adds them between steps, steps while anything is unfinished, and hands
each output to its request's asyncio queue on the loop that asked. An abort is applied before the
next step. Metrics (Prometheus) are kept here, where the steps happen.

`scripts/serve.py` steps the engine in the main thread instead (`run`) and serves HTTP from another:
torch's OpenMP threads run fast only for the one thread that has used them first. Once two threads
have run parallel work, libgomp manages more threads than there are cores and cuts its spin-waits
to a few hundred spins, so every parallel operation waits for sleeping threads to wake: the engine
stepped in a second thread after the model loaded in the first decoded at ~55 instead of ~105
tok/s (SmolLM2's default path, 2 cores).
"""

import queue
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily


class Ticket:
    """A handler's view of one engine request: its outputs arrive on `outputs` (an asyncio.Queue);
    an error adding it arrives there as a ValueError."""

    def __init__(self, loop, outputs, tag, echoed_ids=0):
        """`tag` comes back with every item; `echoed_ids`: prompt ids the first output repeats (echo)."""
        self.loop, self.outputs, self.tag, self.echoed_ids = loop, outputs, tag, echoed_ids
        self.request_id = None  # set by the engine thread when added
        self.submitted = time.perf_counter()
        self.last_token = None  # when its last new token came (for inter-token latency)

    def deliver(self, item):
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, (self.tag, item))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(PrefixCacheCounters(engine))
        r.register(SpeculationCounters(engine))
        self.running = Gauge("llama_lite_requests_running", "Requests holding a KV-cache row", registry=r)
        self.waiting = Gauge("llama_lite_requests_waiting", "Requests waiting for a KV-cache row", registry=r)
        self.rows_in_use = Gauge("llama_lite_kv_cache_rows_in_use", "KV-cache rows held by requests", registry=r)
        self.prompt_tokens = Counter("llama_lite_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("llama_lite_generation_tokens", "Tokens generated", registry=r)
        self.requests_finished = Counter("llama_lite_requests_finished", "Requests finished", ["finish_reason"], registry=r)
        self.ttft = Histogram("llama_lite_time_to_first_token_seconds", "From a request's arrival to its first new token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.itl = Histogram("llama_lite_inter_token_latency_seconds", "Between a request's successive new tokens",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), registry=r)


class PrefixCacheCounters:
    """The prefix cache's hits, misses and reused tokens, read from the engine when /metrics is asked
    (ints, so reading them from another thread is safe); zeros with the cache off."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        prefix = self.engine.prefix
        for name, what, value in [
            ("hits", "Requests admitted with the K/V of their prompt's beginning reused", prefix and prefix.hits),
            ("misses", "Requests admitted that found no reusable beginning (prompts of 3+ tokens)", prefix and prefix.misses),
            ("reused_tokens", "Prompt tokens whose K/V were reused instead of prefilled", prefix and prefix.reused_tokens),
        ]:
            yield CounterMetricFamily(f"llama_lite_prefix_cache_{name}", what, value=value or 0)


class SpeculationCounters:
    """Speculative decoding's guessed and accepted tokens, and the decoding steps of requests that
    guessed (tokens per such step: 1 + accepted / steps), read from the engine when /metrics is asked."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        acceptance = self.engine.acceptance
        for name, what, value in [
            ("proposed_tokens", "Tokens guessed by prompt lookup and checked", acceptance.proposed),
            ("accepted_tokens", "Guessed tokens the model agreed with (kept)", acceptance.accepted),
            ("steps", "Decoding steps of requests that guessed", acceptance.steps),
        ]:
            yield CounterMetricFamily(f"llama_lite_speculative_{name}", what, value=value)


class EngineThread:
    def __init__(self, engine):
        self.engine = engine
        self.metrics = Metrics(engine)
        self.commands = queue.SimpleQueue()
        self.tickets = {}  # engine request id -> Ticket
        self.pending = 0  # submitted, not yet finished (the server's queue limit counts these)
        self.closing = False
        self.own_thread = True  # False: the caller steps the engine itself (`run`)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="llama_lite-engine", daemon=True)

    def start(self):
        if self.own_thread:
            self.thread.start()

    def submit(self, ticket, prompt_ids, params):
        with self._lock:
            self.pending += 1
        self.commands.put(("add", ticket, prompt_ids, params))

    def abort(self, ticket):
        self.commands.put(("abort", ticket))

    def abort_all(self):
        """Server shutting down: every request ends now (finish reason "abort")."""
        self.closing = True
        self.commands.put(("abort_all",))

    def stop(self):
        self.commands.put(("stop",))
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    # --- the thread ---------------------------------------------------------------------------------

    def run(self):
        """Add, abort and step until `stop`: in the engine's own thread, or in the caller's."""
        while True:
            try:  # wait for work only when there is nothing to step
                command = self.commands.get_nowait() if self.engine.has_unfinished() else self.commands.get()
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                self._apply(command)
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                self._step()
            else:
                self._gauges()

    def _apply(self, command):
        kind, *args = command
        if kind == "add":
            ticket, prompt_ids, params = args
            if self.closing:
                return self._done(ticket, ValueError("the server is shutting down"))
            try:
                ticket.request_id = self.engine.add(prompt_ids, params)
            except ValueError as e:
                return self._done(ticket, e)
            self.tickets[ticket.request_id] = ticket
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        elif kind == "abort":
            if args[0].request_id is not None:
                self.engine.abort(args[0].request_id)
        elif kind == "abort_all":
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)

    def _done(self, ticket, item):
        with self._lock:
            self.pending -= 1
        ticket.deliver(item)

    def _step(self):
        now = None
        for out in self.engine.step():
            ticket = self.tickets.get(out.request_id)
            if ticket is None:
                continue
            now = now or time.perf_counter()
            n_new, ticket.echoed_ids = len(out.token_ids) - ticket.echoed_ids, 0
            self.metrics.generated_tokens.inc(n_new)
            if n_new:
                if ticket.last_token is None:
                    self.metrics.ttft.observe(now - ticket.submitted)
                else:
                    self.metrics.itl.observe(now - ticket.last_token)
                ticket.last_token = now
            if out.finished:
                del self.tickets[out.request_id]
                self.metrics.requests_finished.labels(out.finish_reason).inc()
                self._done(ticket, out)
            else:
                ticket.deliver(out)
        self._gauges()

    def _gauges(self):
        engine = self.engine
        self.metrics.running.set(len(engine.running))
        self.metrics.waiting.set(len(engine.waiting))
        self.metrics.rows_in_use.set(engine.model.params.max_batch_size - len(engine.free_rows))
