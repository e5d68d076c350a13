"""The engine in a thread of its own, for a server whose handlers run on an asyncio loop.

The engine is not thread-safe, so one thread owns it: handlers `submit` requests and `abort` them
through a queue; the thread adds them between steps, steps while anything is unfinished, and hands
each output to its request's asyncio queue on the loop that asked. An abort is applied before the
next step. The server's metrics (server/metrics.py) are counted here, where the steps happen.
`scripts/serve.py` runs this in the main thread (`run`) and serves HTTP from another: torch's OpenMP
threads are fast only for the thread that used them first (docs/performance.md#threads).
"""

import queue
import threading
import time

# How long the idle thread blocks before looking again. A signal (SIGTERM, Ctrl-C) the kernel hands to
# another thread runs its Python handler only when the main thread next runs Python code, and a thread
# blocked in SimpleQueue.get() without a timeout never does: the server would not stop when idle.
IDLE_WAKE_S = 0.2


class RequestHandle:
    """A handler's view of one engine request: its outputs arrive on `outputs` (an asyncio.Queue);
    an error adding it arrives there as a ValueError."""

    def __init__(self, loop, outputs, tag, echoed_ids=0):
        """`tag` comes back with every item; `echoed_ids`: prompt ids the first output repeats (echo)."""
        self.loop, self.outputs, self.tag, self.echoed_ids = loop, outputs, tag, echoed_ids
        self.request_id = None  # set by the engine thread when added
        self.submitted = time.perf_counter()
        self.last_token = None  # when its last new token came (for inter-token latency)

    def deliver(self, item):
        deliver_all([(self, item)])


def deliver_all(deliveries):
    """Each (handle, item) onto its handle's queue, with one wake-up of each event loop for them all: a
    wake-up a request each step cost the server's HTTP thread a core's slice per request, and every
    slice it takes stalls the step's OpenMP threads (docs/performance.md#threads)."""
    by_loop = {}
    for handle, item in deliveries:
        by_loop.setdefault(handle.loop, []).append((handle.outputs, (handle.tag, item)))
    for loop, puts in by_loop.items():
        loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts):
    for outputs, item in puts:
        outputs.put_nowait(item)


class EngineThread:
    """Steps `engine` for the server's handlers, counting into `metrics` (a server.metrics.ServerMetrics)."""

    def __init__(self, engine, metrics):
        self.engine = engine
        self.metrics = metrics
        self.commands = queue.SimpleQueue()
        self.handles = {}  # engine request id -> RequestHandle
        self.pending = 0  # submitted, not yet finished (the server's queue limit counts these)
        self.closing = False
        self.own_thread = True  # False: the caller steps the engine itself (`run`)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="llama_lite-engine", daemon=True)

    def start(self):
        if self.own_thread:
            self.thread.start()

    def submit(self, handle, prompt_ids, params):
        with self._lock:
            self.pending += 1
        self.commands.put(("add", handle, prompt_ids, params))

    def abort(self, handle):
        self.commands.put(("abort", handle))

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
                busy = self.engine.has_unfinished()
                command = self.commands.get_nowait() if busy else self.commands.get(timeout=IDLE_WAKE_S)
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
            else:  # idle: take a compiled step another process has built meanwhile, before the next request
                self.engine.model.adopt_compiled_step()
                self.metrics.update_gauges(self.engine)

    def _apply(self, command):
        kind, *args = command
        if kind == "add":
            handle, prompt_ids, params = args
            if self.closing:
                return self._done(handle, ValueError("the server is shutting down"))
            try:
                handle.request_id = self.engine.add(prompt_ids, params)
            except ValueError as e:
                return self._done(handle, e)
            self.handles[handle.request_id] = handle
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        elif kind == "abort":
            if args[0].request_id is not None:
                self.engine.abort(args[0].request_id)
        elif kind == "abort_all":
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)

    def _done(self, handle, item, deliveries=None):
        """`item` is `handle`'s last: delivered now, or added to `deliveries`."""
        with self._lock:
            self.pending -= 1
        if deliveries is None:
            handle.deliver(item)
        else:
            deliveries.append((handle, item))

    def _step(self):
        now, deliveries = None, []
        for out in self.engine.step():
            handle = self.handles.get(out.request_id)
            if handle is None:
                continue
            now = now or time.perf_counter()
            n_new, handle.echoed_ids = len(out.token_ids) - handle.echoed_ids, 0
            self.metrics.generated_tokens.inc(n_new)
            if n_new:
                if handle.last_token is None:
                    self.metrics.ttft.observe(now - handle.submitted)
                else:
                    self.metrics.itl.observe(now - handle.last_token)
                handle.last_token = now
            if out.finished:
                del self.handles[out.request_id]
                self.metrics.requests_finished.labels(out.finish_reason).inc()
                self._done(handle, out, deliveries)
            else:
                deliveries.append((handle, out))
        deliver_all(deliveries)
        self.metrics.update_gauges(self.engine)

