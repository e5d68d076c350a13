"""An OpenAI-compatible HTTP server: many clients, one continuous batch. HTTP only: the shapes of
OpenAI's requests (protocol.py, pydantic models FastAPI validates and shows at /docs) and responses
over the engine (engine.py), which one thread steps (engine_thread.py) while every handler awaits its
own outputs, so concurrent clients share the batch.

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

import asyncio
import codecs
import json
import logging
import math
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException

from ..engine.constraints import KINDS
from ..engine.engine_thread import EngineThread, Ticket
from ..engine.sampling import SamplingParams, draw_seed, request_seed
from ..text.chat_template import takes_tools
from .protocol import ChatRequest, CompletionRequest, error_of
from .tool_calls import CallParser, call_format, call_grammar, check_parameters

log = logging.getLogger("llama_lite.server")
MAX_BODY_MB = 8  # a whole 128k-token context as text is ~0.5 MB; far larger bodies are refused unread


class APIError(Exception):
    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Guard:
    """ASGI middleware around every route: the API key; the body's size (413 once its length or its
    bytes so far pass the limit, before any parsing); and any exception a route raises, which becomes
    a JSON 500 (its traceback logged, never sent)."""

    def __init__(self, app, api_key, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/") and headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
            return await self._error(send, APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                                    code="invalid_api_key"))
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.max_body / (1 << 20):g} MB "
                                  "(--max_body_mb); send a shorter prompt", code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._error(send, too_large)
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
                    await self._error(send, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            if not started:
                await self._error(send, APIError(500, "the server failed on this request; its log says why",
                                                 kind="server_error", code="internal_error"))

    @staticmethod
    async def _error(send, error: APIError):
        response = error.response()
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def create_app(llm, model_name: str, api_key=None, max_queue: int = 64, max_body_mb: float = MAX_BODY_MB) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name`. `max_queue`: requests that may wait for a
    KV-cache row beyond those running; one more is answered 429. `max_body_mb`: larger request
    bodies are answered 413 unread."""
    worker = EngineThread(llm.engine)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    # strict_content_type=False: a body sent without a Content-Type is read as JSON too.
    app = FastAPI(title="llama_lite", lifespan=lifespan, strict_content_type=False)
    app.state.worker = worker
    created = int(time.time())
    rows = llm.model.params.max_batch_size
    # A text of n characters (n bytes at least) holds n / max_token_bytes tokens at least: one longer
    # than this can never fit the context, and is refused before tokenizing it.
    max_chars = llm.model.params.max_seq_len * llm.tokenizer.max_token_bytes()
    app.add_middleware(_Guard, api_key=api_key, max_body=int(max_body_mb * (1 << 20)))

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        error = error_of(exc.errors()[0])
        return APIError(400, error.message, param=error.param, code=error.code).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"  # an unknown path or method
        if exc.status_code == 400:  # FastAPI could not parse the body
            message = "the request body could not be parsed (JSON nested too deeply, or a number too long); send plain JSON"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.get("/health")
    async def health():
        step = llm.model.decode_step  # "compiling" while the first replies come from the eager step
        decoding = "eager" if step is None or step.error else "compiled" if step.ready else "compiling"
        return {"status": "shutting down" if worker.closing else "ok", "decode_step": decoding}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "llama_lite"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model '{model_id}' does not exist here; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = await asyncio.to_thread(_prompts, body.prompt, llm.tokenizer, max_chars)
        shared = {**body.sampling(default_max_tokens=16), "logprobs": body.logprobs is not None,
                  "top_logprobs": body.logprobs or 0, "echo": bool(body.echo), **_response_format(body)}
        return await _serve(request, body, "text_completion", "cmpl", prompts, shared, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model, model_name)
        prompt, calls, constraint = await asyncio.to_thread(_chat_prompt, body)
        shared = {**body.sampling(default_max_tokens=None), "logprobs": bool(body.logprobs),
                  "top_logprobs": body.top_logprobs or 0, "echo": False, **constraint}
        return await _serve(request, body, "chat.completion", "chatcmpl", [prompt], shared, chat=True, calls=calls)

    def _chat_prompt(body: ChatRequest):
        """The prompt's tokens; (call format, function names) when tools are offered, else None; and
        the constraint: the forced call's grammar, or the response_format's."""
        tools, template = body.template_tools(), llm.tokenizer.chat_template or ""
        if sum(len(m.content or "") for m in body.messages) > max_chars:
            raise APIError(400, "the messages hold more tokens than this model's context; shorten them", param="messages",
                           code="context_length_exceeded")
        if tools and not takes_tools(template):
            raise APIError(400, "this model's chat template does not take tools; start the server with --chat_template "
                                "FILE holding one that does (a Qwen2.5-, Hermes- or Llama 3.1-style template)", param="tools")
        try:
            prompt = llm.chat_prompt_tokens(body.dialog(), tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not tools:
            return prompt, None, _response_format(body)
        fmt, forced = call_format(template), [f.model_dump() for f in body.functions_forced()]
        try:
            check_parameters(forced, "tools")
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        constraint = {"grammar": call_grammar(fmt, forced)} if forced else {}
        return prompt, (fmt, [t["function"]["name"] for t in tools]), constraint

    async def _serve(request, body, kind, id_prefix, prompts, shared, chat, calls=None):
        n, stream = body.n or 1, bool(body.stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        context = llm.model.params.max_seq_len
        for prompt in prompts:
            if len(prompt) + (shared["max_tokens"] or 1) > context:
                raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {shared['max_tokens']}; "
                                    f"this model's context is {context} tokens: shorten the prompt or lower max_tokens",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        choices = [(i * n + j, prompt) for i, prompt in enumerate(prompts) for j in range(n)]
        if worker.closing:
            raise APIError(503, "the server is shutting down", kind="server_error")
        if len(choices) > rows + max_queue:  # it would be refused however idle the server is
            raise APIError(400, f"this request runs {len(choices)} sequences (prompts x n), more than the server ever "
                                f"holds ({rows} rows + --max_queue {max_queue}); send fewer prompts or a smaller n",
                           param="n" if n > 1 else "prompt", code="too_many_sequences")
        if worker.pending + len(choices) > rows + max_queue:
            raise APIError(429, f"the server's queue is full ({max_queue} waiting); retry in a few seconds",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "2"})
        await _compile(shared)
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        tickets = []
        # Choice k (prompt i's choice j is i * n + j) samples from its own generator seeded seed + k, so
        # it repeats whatever else runs; without a seed, the request's is drawn from the server's (--seed).
        seed = draw_seed(llm.generator) if shared["seed"] is None else shared["seed"]
        for index, prompt in choices:
            try:
                params = SamplingParams(**{**shared, "seed": request_seed(seed, index)})
            except ValueError as e:
                raise APIError(400, str(e)) from None
            ticket = Ticket(loop, outputs, index, echoed_ids=len(prompt) if params.echo else 0)
            worker.submit(ticket, prompt, params)
            tickets.append(ticket)
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name}
        view = _Choices(llm.tokenizer, choices, n, chat, shared, calls)
        if stream:  # the streaming response itself stops (and so aborts) when its client goes
            return EventSourceResponse(_stream(_events(outputs, len(choices), tickets), view, head, chat, include_usage))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            async for index, out in _events(outputs, len(choices), tickets, gone):
                view.add(index, out)
        finally:
            gone.cancel()
        return {**head, "choices": view.whole(), "usage": view.usage()}

    async def _disconnected(request):
        """Returns once the client of a whole (non-streamed) answer has gone; its body is read already,
        so the next message is the disconnect."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _compile(shared):
        """A constrained request's matcher made in a worker thread, so that compiling holds up neither
        the event loop nor the engine thread (which then finds it made); 400 if it cannot be enforced."""
        if not any(shared.get(k) for k in KINDS):
            return
        try:
            await asyncio.to_thread(lambda: llm.engine.grammars.matcher(SamplingParams(**shared)))
        except ValueError as e:
            message = str(e).replace("SamplingParams.json_schema", "response_format.json_schema.schema")
            raise APIError(400, message, param="response_format") from None

    async def _events(outputs, count, tickets, gone=None):
        """(choice index, RequestOutput) until every choice finished; an error adding one is a 400.
        When `gone` (a future) completes, the client has left: its requests are aborted at the next
        engine step."""
        left = count
        try:
            while left:
                if gone is None:
                    index, item = await outputs.get()
                else:
                    get = asyncio.ensure_future(outputs.get())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        return
                    index, item = get.result()
                if isinstance(item, ValueError):
                    raise APIError(400, str(item))
                left -= item.finished
                yield index, item
        finally:
            if left:
                for ticket in tickets:
                    worker.abort(ticket)

    async def _stream(events, view, head, chat, include_usage):
        chunk_kind = head["object"] + ".chunk" if chat else head["object"]
        base = {**head, "object": chunk_kind}
        if chat:
            for index, _ in view.choices:
                yield _sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        try:
            async for index, out in events:
                choice = view.add(index, out)
                if choice.get("text") or choice.get("delta") or out.finished or (view.logprobs and out.token_ids):
                    yield _sse({**base, "choices": [choice]})  # no chunk without news
        finally:
            await events.aclose()  # a client gone mid-stream: abort its requests now
        if include_usage:
            yield _sse({**base, "choices": [], "usage": view.usage()})
        yield format_sse_event(data_str="[DONE]")

    app.state.shutdown = worker.abort_all
    return app


def _sse(data) -> bytes:
    return format_sse_event(data_str=json.dumps(data, ensure_ascii=False))


class _Choices:
    """Each choice's text, logprobs, tool calls and finish reason as outputs arrive, in OpenAI's shapes.
    `calls`: (call format, function names) when the chat offers tools: each reply's text is then
    read for calls as it streams (tool_calls.CallParser)."""

    def __init__(self, tokenizer, choices, n, chat, shared, calls=None):
        self.tokenizer, self.choices, self.n, self.chat = tokenizer, choices, n, chat
        self.parsers = {index: CallParser(*calls) for index, _ in choices} if calls else None
        self.calls = {index: [] for index, _ in choices}
        self.logprobs, self.echo = shared["logprobs"], shared["echo"]
        self.prompt_len = {index: len(prompt) for index, prompt in choices}
        self.text = {index: [] for index, _ in choices}
        self.lp = {index: [] for index, _ in choices}
        self.finish = {index: None for index, _ in choices}
        self.generated = {index: 0 for index, _ in choices}
        self.cached = {index: 0 for index, _ in choices}  # prompt tokens the prefix cache gave each choice
        self.offset = {index: 0 for index, _ in choices}  # characters of text before the next token
        self.utf8 = {index: codecs.getincrementaldecoder("utf-8")("replace") for index, _ in choices}

    def add(self, index, out):
        """Record one output; the choice as a streamed chunk shows it."""
        first = not self.text[index]
        self.cached[index] = out.cached_tokens
        self.generated[index] += len(out.token_ids) - (self.prompt_len[index] if self.echo and first else 0)
        text = out.text
        if self.parsers:
            text = self.parsers[index].feed(text)
            if out.finished:
                rest, self.calls[index] = self.parsers[index].finish()
                text += rest
                self.calls[index] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                                     for call in self.calls[index]]
        self.text[index].append(text)
        piece_lp = self._logprobs(index, out) if self.logprobs else None
        if out.finished:
            self.finish[index] = "tool_calls" if self.calls[index] else out.finish_reason
        if self.chat:
            delta = {"content": text} if text else {}
            if out.finished and self.calls[index]:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(self.calls[index])]
            return {"index": index, "delta": delta, "logprobs": piece_lp, "finish_reason": self.finish[index]}
        return {"index": index, "text": text, "logprobs": piece_lp, "finish_reason": self.finish[index]}

    def whole(self):
        result = []
        for index, _ in self.choices:
            text = "".join(self.text[index])
            lp = self._merged(index) if self.logprobs else None
            if self.chat:
                message = {"role": "assistant", "content": text or (None if self.calls[index] else "")}
                if self.calls[index]:
                    message["tool_calls"] = self.calls[index]
                result.append({"index": index, "message": message, "logprobs": lp, "finish_reason": self.finish[index]})
            else:
                result.append({"index": index, "text": text, "logprobs": lp, "finish_reason": self.finish[index]})
        return result

    def usage(self):
        firsts = [index for index, _ in self.choices if index % self.n == 0]  # each prompt once
        prompt = sum(self.prompt_len[index] for index in firsts)
        completion = sum(self.generated.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached[index] for index in firsts)}}

    def _token(self, token_id, at_start):
        """(token text, its bytes): the bytes it adds to the text (joined they rebuild the text's
        UTF-8); a token holding part of a character shows the bytes escaped, as OpenAI does: "\\xe2\\x80"
        in chat, "bytes:\\xe2\\x80" in completions."""
        raw = self.tokenizer.token_bytes(token_id, at_start)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ("" if self.chat else "bytes:") + raw.decode("utf-8", "backslashreplace")
        return text, list(raw)

    def _logprobs(self, index, out):
        entries = []
        tops = out.top_logprobs or [None] * len(out.token_ids)
        for token_id, logprob, top in zip(out.token_ids, out.logprobs, tops):
            first = not self.lp[index] and not entries  # the text's first token: SentencePiece drops its space
            text, raw = self._token(token_id, first)
            top = [(*self._token(t, first), lp) for t, lp in (top or [])]
            if first and self.echo:  # an echoed prompt's first token has no logprob
                logprob, top = None, None
            entries.append((text, raw, logprob, top, self.offset[index]))
            self.offset[index] += len(self.utf8[index].decode(bytes(raw)))  # the characters it completes
        self.lp[index] += entries
        return self._shape(entries)

    def _merged(self, index):
        return self._shape(self.lp[index])

    def _shape(self, entries):
        """OpenAI's logprobs object for these (text, bytes, logprob, top, text offset) entries."""
        if self.chat:
            return {"content": [{"token": text, "logprob": _finite(lp), "bytes": raw,
                                 "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": b} for t, b, v in top]}
                                for text, raw, lp, top, _ in entries]}
        return {
            "tokens": [text for text, *_ in entries],
            "token_logprobs": [_finite(lp) for _, _, lp, _, _ in entries],
            "top_logprobs": [None if top is None else {t: _finite(v) for t, _, v in top} for _, _, _, top, _ in entries],
            "text_offset": [offset for *_, offset in entries],
        }


def _finite(x):
    return x if x is None or math.isfinite(x) else -9999.0


# --- what the models leave to the server: the model's name, tokens, the response format ------------

def _check_model(model, model_name):
    if not model:
        raise APIError(400, f"'model' is required; this server serves '{model_name}'", param="model")
    if model != model_name:
        raise APIError(400, f"model '{model}' does not exist here; this server serves '{model_name}'", param="model",
                       code="model_not_found")


def _response_format(body) -> dict:
    return body.response_format.constraint() if body.response_format is not None else {}


def _prompts(prompt, tokenizer, max_chars) -> list:
    """A completion's prompt(s) as token lists: a string, a list of strings, token ids, or lists of them.
    Text of more than `max_chars` characters cannot fit the context: refused untokenized."""
    def ids(p, i):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"prompt {i} is empty; send some text", param="prompt")
            if len(p) > max_chars:
                raise APIError(400, f"prompt {i} has {len(p)} characters, more tokens than this model's context holds; "
                                    "shorten it", param="prompt", code="context_length_exceeded")
            try:
                return tokenizer.encode(p, bos=tokenizer.add_bos, eos=False)
            except ValueError as e:  # a lone surrogate ("\ud800" in the JSON)
                raise APIError(400, f"prompt {i}: {e}", param="prompt") from None
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.n_words for t in p):
            return list(p)
        raise APIError(400, f"prompt {i} must be a non-empty string or a list of token ids in [0, {tokenizer.n_words})",
                       param="prompt")

    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return [ids(prompt, 0)]
    return [ids(p, i) for i, p in enumerate(prompt)]


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
