"""An OpenAI-compatible HTTP server: many clients, one continuous batch. This file holds the routes
and the middleware; the requests are served by ServingCompletion (serving_completion.py) and
ServingChat (serving_chat.py) over the engine (engine.py), which one thread steps (engine_thread.py)
while every handler awaits its own outputs, so concurrent clients share the batch. Request shapes:
protocol.py (pydantic models FastAPI validates and shows at /docs); metrics: metrics.py.

Endpoints: POST /v1/completions, POST /v1/chat/completions (whole, or streamed as server-sent
events), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus). Both
completions endpoints take `response_format` (JSON object or JSON Schema, enforced token by token:
constraints.py); chat takes `tools` and `tool_choice`, rendered through the chat template and
answered as OpenAI's `tool_calls` (tool_calls.py). Bad requests get OpenAI's error body, {"error":
{"message", "type", "param", "code"}}, with a 4xx status; a failure inside the server is a 500 with
that body (the traceback goes to the log, not the client).

The event loop must stay free for every client's stream: a body over --max_body_mb is refused
before it is read further; prompts are tokenized (and chat templates rendered) in a worker thread,
and a prompt with more characters than the context could hold is refused untokenized (tokenizing
megabytes holds the interpreter, worker thread or not).
"""

import logging
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..engine.engine_thread import EngineThread
from .errors import APIError
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, error_of
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion

log = logging.getLogger("llama_lite.server")
MAX_BODY_MB = 8  # a whole 128k-token context as text is ~0.5 MB; far larger bodies are refused unread

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    llm, worker = request.app.state.llm, request.app.state.worker
    step = llm.model.decode_step
    if step is None or not step.compiled:  # "compiling" while another process builds the step this one will take (precompile.py)
        decoding = "eager" if llm.model.compiled_later is None else "compiling"
    else:
        decoding = "eager" if step.error else "compiled" if step.ready else "compiling"
    path = {"path": llm.path.path, "why": llm.path.why} if llm.path is not None else {}
    return {"status": "shutting down" if worker.closing else "ok", "decode_step": decoding, **path}


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [request.app.state.model_card]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    card = request.app.state.model_card
    if model_id != card["id"]:
        raise APIError(404, f"model '{model_id}' does not exist here; this server serves '{card['id']}'",
                       param="model", code="model_not_found")
    return card


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await request.app.state.serving_completion.create_completion(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    return await request.app.state.serving_chat.create_chat_completion(body, request)


async def api_error(request, exc: APIError):
    return exc.response()


async def invalid_request(request, exc: RequestValidationError):
    error = error_of(exc.errors()[0])
    return APIError(400, error.message, param=error.param, code=error.code).response()


async def http_error(request, exc: HTTPException):
    message = f"{request.method} {request.url.path}: {exc.detail}"  # an unknown path or method
    if exc.status_code == 400:  # FastAPI could not parse the body
        message = "the request body could not be parsed (JSON nested too deeply, or a number too long); send plain JSON"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, message, code=code, headers=exc.headers).response()


class ApiKeyAndBodyLimitMiddleware:
    """ASGI middleware around every route: 401 without the API key (when the server has one) on
    /v1/; 413 once the body's length or its bytes so far pass the limit, before any parsing."""

    def __init__(self, app, api_key, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorized = headers.get(b"authorization") == f"Bearer {self.api_key}".encode()
        if self.api_key and scope["path"].startswith("/v1/") and not authorized:
            return await send_error(send, APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                                   code="invalid_api_key"))
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.max_body / (1 << 20):g} MB "
                                  "(--max_body_mb); send a shorter prompt", code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await send_error(send, too_large)
        received, overflowed, started = 0, False, False

        async def limited_receive():
            """The body, cut off where a chunked body grows past the limit (the answer is then 413)."""
            nonlocal received, overflowed
            if overflowed:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                overflowed = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def watched_send(message):
            nonlocal started
            if overflowed:  # whatever the route made of a cut body, the answer is 413
                if not started:
                    started = True
                    await send_error(send, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, watched_send)


class InternalErrorMiddleware:
    """ASGI middleware around every route: an exception a route raises becomes a JSON 500 (its
    traceback logged, never sent) unless the response has begun."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            if not started:
                await send_error(send, APIError(500, "the server failed on this request; its log says why",
                                                kind="server_error", code="internal_error"))


async def send_error(send, error: APIError):
    """`error` sent as the whole response, from ASGI middleware (outside FastAPI's handlers)."""
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(llm, model_name: str, api_key=None, max_queue: int = 64, max_body_mb: float = MAX_BODY_MB) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name`. `max_queue`: requests that may wait for a
    KV-cache row beyond those running; one more is answered 429. `max_body_mb`: larger request
    bodies are answered 413 unread."""
    worker = EngineThread(llm.engine, ServerMetrics(llm.engine))

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    # strict_content_type=False: a body sent without a Content-Type is read as JSON too.
    app = FastAPI(title="llama_lite", lifespan=lifespan, strict_content_type=False)
    app.state.llm, app.state.worker = llm, worker
    app.state.model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "llama_lite"}
    app.state.serving_completion = ServingCompletion(llm, model_name, worker, max_queue)
    app.state.serving_chat = ServingChat(llm, model_name, worker, max_queue)
    app.state.shutdown = worker.abort_all
    app.add_middleware(ApiKeyAndBodyLimitMiddleware, api_key=api_key, max_body=int(max_body_mb * (1 << 20)))
    app.add_middleware(InternalErrorMiddleware)  # added last: the outermost, so it sees the others' failures too
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(router)
    return app


def serve(llm, model_name: str, sock, api_key=None, max_queue: int = 64, max_body_mb: float = MAX_BODY_MB) -> None:
    """Run the server on `sock` (a bound socket) until SIGTERM or Ctrl-C; running requests then end
    (finish reason "abort"). The engine steps in this thread, where the model was loaded, and HTTP is
    served from another (engine_thread.py says why)."""
    import uvicorn

    app = create_app(llm, model_name, api_key=api_key, max_queue=max_queue, max_body_mb=max_body_mb)
    worker = app.state.worker
    worker.own_thread = False

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.shutdown()  # end the running requests, so their connections close
            super().handle_exit(sig, frame)

    host, port = sock.getsockname()[:2]
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10))

    def serve_http():
        try:
            server.run(sockets=[sock])
        finally:
            worker.stop()  # the engine's loop below ends with the server, however it ended

    # uvicorn takes signals only in the main thread: here they reach it through this thread.
    previous = {signum: signal.signal(signum, server.handle_exit) for signum in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=serve_http, name="llama_lite-http")
    http.start()
    try:
        worker.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        http.join()
