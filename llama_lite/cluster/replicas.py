"""`serve --ray`: the one-server OpenAI app (server/app.py) in each of N Ray Serve replicas, behind
a front deployment that reads each request's prompt and hands it to PrefixAffinityRouter (router.py),
which picks the replica (docs/cluster.md).

Ray Serve's HTTP proxy gives an ingress deployment a request whose body it has not read, so a router
there cannot see the prompt: the front reads the body and calls the replicas' handle with a
ForwardedRequest, whose `prompt` the router reads. A replica runs the app in-process, as ASGI, and
streams its messages back, so streaming, 4xx/429/500 bodies, the API key and the body limit are the
one server's own; a client that leaves cancels the call, which the app sees as a disconnect (aborted)."""

import asyncio
import json
import queue
import signal
import sys
import threading
from dataclasses import dataclass

from .ray_connect import connect, for_workers, import_ray, split_threads

# Requests a front holds at once; each replica takes its rows and --max_queue more (then the app says 429).
FRONT_MAX_ONGOING = 1000
APP_NAME = "llama_lite"
GRACEFUL_SHUTDOWN_S = 10  # as the one server's uvicorn gives running requests
REPLICA_HEADER = b"x-llama-lite-replica"  # each response names the replica that made it


@dataclass
class ForwardedRequest:
    """An HTTP request as the front read it, and the text the router matches (`prompt`)."""

    method: str
    path: str
    query_string: bytes
    headers: list
    body: bytes
    prompt: str


def routing_text(body: bytes) -> str:
    """The text a request's prompt begins with: a completion's prompt, or a chat's messages one after
    another (a conversation's next turn begins with its last one); "" for anything else."""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    if isinstance(request.get("messages"), list):
        return "".join(f"{m.get('role')}\n{_text(m.get('content'))}\n" for m in request["messages"] if isinstance(m, dict))
    return _text(request.get("prompt"))


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # chat content parts, or a list of prompts (routed by the first)
        first = content[0] if content else ""
        return first if isinstance(first, str) else "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class EngineReplica:
    """One replica: a Llama and create_app over it, the app called in-process for each request."""

    def __init__(self, build: dict, model_name: str, api_key, max_queue: int, max_body_mb: float):
        built = queue.SimpleQueue()
        options = dict(api_key=api_key, max_queue=max_queue, max_body_mb=max_body_mb)
        threading.Thread(target=_build_and_step, args=(build, model_name, options, built), name="llama_lite-engine",
                         daemon=True).start()
        self.app = built.get()
        if isinstance(self.app, BaseException):
            raise self.app
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __del__(self):
        """Serve's graceful shutdown: running requests end (finish reason "abort"), the engine thread stops."""
        self.app.state.shutdown()
        self.app.state.worker.stop()

    async def __call__(self, request: ForwardedRequest):
        """The app's ASGI messages for `request`, as it sends them (a streamed response a chunk at a time)."""
        sent, gone, body_read = asyncio.Queue(), asyncio.Event(), False

        async def receive():
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
                 "query_string": request.query_string, "headers": request.headers, "client": None, "server": None}
        task = asyncio.ensure_future(self.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":  # which replica answered, for logs and load checks
                    message = {**message, "headers": [*message["headers"], (REPLICA_HEADER, self.replica_id.encode())]}
                yield message
            task.result()
        finally:  # the client left (the call was cancelled) or the response is whole
            gone.set()
            task.cancel()


def _build_and_step(build: dict, model_name: str, options: dict, built: queue.SimpleQueue) -> None:
    """Build a replica's Llama and app, hand the app to `built`, then step its engine, all in this one
    thread: torch's OpenMP threads are fast only for the thread that used them first. Built in one
    thread and stepped in another, a decode step ran 4.6x slower (2-core EPYC: 41 against 194 steps
    a second; docs/performance.md#threads)."""
    from ..generation import Llama
    from ..server.app import create_app

    try:
        app = create_app(Llama.build(**build), model_name, **options)
    except BaseException as e:  # the replica's constructor raises it
        built.put(e)
        return
    app.state.worker.own_thread = False  # stepped here, not in a thread of its own
    built.put(app)
    app.state.worker.run()


def front_deployment(serve):
    """The ingress deployment: every path, its body read, forwarded to the replica the router picks."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(max_ongoing_requests=FRONT_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
                      graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    @serve.ingress(app)
    class Front:
        def __init__(self, replicas):
            self.replicas = replicas

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        async def forward(self, path: str, request: Request):
            body = await request.body()
            call = ForwardedRequest(request.method, request.url.path, request.url.query.encode(), request.headers.raw,
                                    body, routing_text(body))
            stream = self.replicas.options(stream=True).remote(call)
            try:
                start = await stream.__anext__()
            except BaseException:
                stream.cancel()
                raise

            async def chunks():
                try:
                    async for message in stream:
                        if message["type"] == "http.response.body" and message.get("body"):
                            yield message["body"]
                finally:
                    stream.cancel()

            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"] if k.lower() != b"content-length"}
            return StreamingResponse(chunks(), status_code=start["status"], headers=headers)

    return Front


def serve_replicas(address: str, replicas: int, host: str, port: int, build: dict, threads, model_name: str,
                   api_key, max_queue: int, max_body_mb: float) -> None:
    """Serve `replicas` engine replicas on a Ray cluster at http://host:port until SIGTERM or Ctrl-C."""
    took = connect(address, num_cpus=max(split_threads(None, 1), replicas * split_threads(threads, replicas)))
    serve = import_ray("ray.serve")
    each = start_replicas(replicas, host, port, build, threads, model_name, api_key, max_queue, max_body_mb, address)
    where = f"[{host}]" if ":" in str(host) else host
    print(f"serving {model_name} at http://{where}:{port}/v1 on Ray Serve ({replicas} replicas of {build['max_batch_size']} "
          f"rows, {each} threads each; Ray ready in {took or 0:.1f} s); Ctrl-C to stop", file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.delete(APP_NAME)  # others' applications on a shared cluster stay
        if took is not None:
            import_ray().shutdown()


def start_replicas(replicas: int, host: str, port: int, build: dict, threads, model_name: str, api_key=None,
                   max_queue: int = 64, max_body_mb: float = 8, address: str = "local") -> int:
    """Deploy the front and `replicas` engine replicas on the connected cluster; once they answer,
    return each one's threads (`threads` split between them)."""
    serve = import_ray("ray.serve")
    from ray.serve.config import RequestRouterConfig

    from .router import PrefixAffinityRouter

    each, rows = split_threads(threads, replicas), build["max_batch_size"]
    engine = serve.deployment(EngineReplica, name="LlamaReplica", num_replicas=replicas,
                              ray_actor_options={"num_cpus": each}, max_ongoing_requests=rows + max_queue + 1,
                              graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
                              request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                                        request_router_kwargs={"imbalance": rows}))
    serve.start(http_options={"host": host, "port": port})
    replica_app = engine.bind({**for_workers(build, address), "threads": each}, model_name, api_key, max_queue, max_body_mb)
    serve.run(front_deployment(serve).bind(replica_app), name=APP_NAME, route_prefix="/")
    return each
