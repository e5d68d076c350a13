"""An OpenAI-compatible HTTP server: many clients, one continuous batch. HTTP only: the shapes of
OpenAI's requests (protocol.py, pydantic models FastAPI validates and shows at /docs) and responses
over the engine (engine.py), which one thread steps (engine_thread.py) while every handler awaits its
own outputs, so concurrent clients share the batch.

Endpoints: POST /v1/completions, POST /v1/chat/completions (whole, or streamed as server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus). Both completions endpoints take
`response_format` (JSON object or JSON Schema, enforced token by token: constraints.py); chat takes
`tools` and `tool_choice`, rendered through the chat template and answered as OpenAI's `tool_calls`
(tool_calls.py). Bad requests get OpenAI's error body, {"error": {"message", "type", "param",
"code"}}, with a 4xx status.
"""

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException

from .chat_template import takes_tools
from .constraints import KINDS
from .engine_thread import EngineThread, Ticket
from .protocol import ChatRequest, CompletionRequest, error_of
from .sampling import SamplingParams
from .tool_calls import CallParser, call_format, call_grammar, check_parameters


class APIError(Exception):
    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(llm, model_name: str, api_key=None, max_queue: int = 64) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name`. `max_queue`: requests that may wait for a
    KV-cache row beyond those running; one more is answered 429."""
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

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        error = error_of(exc.errors()[0])
        return APIError(400, error.message, param=error.param, code=error.code).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI could not parse the body
            message = "the request body could not be parsed (JSON nested too deeply, or a number too long); send plain JSON"
        return APIError(exc.status_code, message).response()

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        step = llm.model.decode_step  # "compiling" while the first replies come from the eager step
        decoding = "eager" if step is None or step.error else "compiled" if step.ready else "compiling"
        return {"status": "shutting down" if worker.closing else "ok", "decode_step": decoding}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llama_lite"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = _prompts(body.prompt, llm.tokenizer)
        shared = {**body.sampling(default_max_tokens=16), "logprobs": body.logprobs is not None,
                  "top_logprobs": body.logprobs or 0, "echo": bool(body.echo), **_response_format(body)}
        return await _serve(request, body, "text_completion", "cmpl", prompts, shared, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model, model_name)
        prompt, calls, constraint = _chat_prompt(body)
        shared = {**body.sampling(default_max_tokens=None), "logprobs": bool(body.logprobs),
                  "top_logprobs": body.top_logprobs or 0, "echo": False, **constraint}
        return await _serve(request, body, "chat.completion", "chatcmpl", [prompt], shared, chat=True, calls=calls)

    def _chat_prompt(body: ChatRequest):
        """The prompt's tokens; (call format, function names) when tools are offered, else None; and
        the constraint: the forced call's grammar, or the response_format's."""
        tools, template = body.template_tools(), llm.tokenizer.chat_template or ""
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
        if worker.pending + len(choices) > rows + max_queue:
            raise APIError(429, f"the server's queue is full ({max_queue} waiting); retry in a few seconds",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "2"})
        await _compile(shared)
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        tickets = []
        for index, prompt in choices:
            seed = shared["seed"]
            try:
                params = SamplingParams(**{**shared, "seed": None if seed is None else seed + index % n})
            except ValueError as e:
                raise APIError(400, str(e)) from None
            ticket = Ticket(loop, outputs, index, echoed_ids=len(prompt) if params.echo else 0)
            worker.submit(ticket, prompt, params)
            tickets.append(ticket)
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name}
        view = _Choices(llm.tokenizer, choices, n, chat, shared, calls)
        events = _events(outputs, len(choices), tickets, request)
        if stream:
            return EventSourceResponse(_stream(events, view, head, chat, include_usage))
        async for index, out in events:
            view.add(index, out)
        return {**head, "choices": view.whole(), "usage": view.usage()}

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

    async def _events(outputs, count, tickets, request):
        """(choice index, RequestOutput) until every choice finished; an error adding one is a 400.
        A client that goes away has its requests aborted (within one engine step)."""
        left = count
        try:
            while left:
                try:
                    index, item = await asyncio.wait_for(outputs.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
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
                yield _sse({**base, "choices": [view.add(index, out)]})
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
        self.offset = {index: 0 for index, _ in choices}

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

    def _token(self, token_id):
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))

    def _logprobs(self, index, out):
        entries = []
        for token_id, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs or [None] * len(out.token_ids)):
            text, raw = self._token(token_id)
            entries.append((text, raw, logprob, [(*self._token(t), lp) for t, lp in (top or [])]))
        self.lp[index] += entries
        start = self.offset[index]
        self.offset[index] += sum(len(text) for text, *_ in entries)
        return self._shape(entries, start)

    def _merged(self, index):
        return self._shape(self.lp[index], start=0)

    def _shape(self, entries, start):
        """OpenAI's logprobs object for these (text, bytes, logprob, top) entries; `start`: the text
        offset of the first (0 is the choice's first token, a prompt's first when echoed: no logprob)."""
        if self.chat:
            return {"content": [{"token": text, "logprob": _finite(lp), "bytes": raw,
                                 "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": b} for t, b, v in top]}
                                for text, raw, lp, top in entries]}
        offsets, position = [], start
        for text, *_ in entries:
            offsets.append(position)
            position += len(text)
        first_prompt = self.echo and start == 0
        return {
            "tokens": [text for text, *_ in entries],
            "token_logprobs": [None if first_prompt and i == 0 else _finite(lp) for i, (_, _, lp, _) in enumerate(entries)],
            "top_logprobs": [None if first_prompt and i == 0 else {t: _finite(v) for t, _, v in top}
                             for i, (_, _, _, top) in enumerate(entries)],
            "text_offset": offsets,
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


def _prompts(prompt, tokenizer) -> list:
    """A completion's prompt(s) as token lists: a string, a list of strings, token ids, or lists of them."""
    def ids(p, i):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"prompt {i} is empty; send some text", param="prompt")
            return tokenizer.encode(p, bos=tokenizer.add_bos, eos=False)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.n_words for t in p):
            return list(p)
        raise APIError(400, f"prompt {i} must be a non-empty string or a list of token ids in [0, {tokenizer.n_words})",
                       param="prompt")

    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return [ids(prompt, 0)]
    return [ids(p, i) for i, p in enumerate(prompt)]


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key=None, max_queue: int = 64) -> None:
    """Run the server until SIGTERM or Ctrl-C; running requests then end (finish reason "abort")."""
    import uvicorn

    app = create_app(llm, model_name, api_key=api_key, max_queue=max_queue)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.shutdown()  # end the running requests, so their connections close
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    Server(config).run()
