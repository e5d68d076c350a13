"""An OpenAI-compatible HTTP server: many clients, one continuous batch. HTTP only: the shapes of
OpenAI's requests and responses over the engine (engine.py), which one thread steps
(engine_thread.py) while every handler awaits its own outputs, so concurrent clients share the batch.

Endpoints: POST /v1/completions, POST /v1/chat/completions (whole, or streamed as server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus). Bad requests get OpenAI's error
body, {"error": {"message", "type", "param", "code"}}, with a 4xx status.
"""

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from .engine_thread import EngineThread, Ticket
from .sampling import SamplingParams

# OpenAI request fields this server does not implement: a non-default value is refused, never ignored.
UNSUPPORTED = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "parallel_tool_calls": None,
    "response_format": None, "logit_bias": None, "suffix": None, "best_of": 1, "audio": None, "modalities": None,
    "prediction": None, "reasoning_effort": None, "web_search_options": None, "service_tier": None, "store": False,
    "metadata": None,
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "presence_penalty",
          "frequency_penalty", "stream", "stream_options", "user", "logprobs", "cache_salt"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "max_completion_tokens"}
MAX_STOPS = 4  # as OpenAI


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

    app = FastAPI(title="llama_lite", lifespan=lifespan)
    app.state.worker = worker
    created = int(time.time())
    rows = llm.model.params.max_batch_size

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

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
    async def completions(request: Request):
        body = await _json_body(request)
        _check_fields(body, COMPLETION_FIELDS)
        _check_model(body, model_name)
        prompts = _prompts(body.get("prompt"), llm.tokenizer)
        logprobs = _optional_int(body, "logprobs", 0, 5)
        echo = _optional_bool(body, "echo", False)
        shared = _sampling(body, default_max_tokens=16, logprobs=logprobs is not None, top_logprobs=logprobs or 0, echo=echo)
        return await _serve(request, body, "text_completion", "cmpl", prompts, shared, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        _check_fields(body, CHAT_FIELDS)
        _check_model(body, model_name)
        messages = _messages(body.get("messages"))
        try:
            prompt = llm.chat_prompt_tokens(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        logprobs = _optional_bool(body, "logprobs", False)
        top = _optional_int(body, "top_logprobs", 0, 20) or 0
        if top and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        shared = _sampling(body, default_max_tokens=None, logprobs=logprobs, top_logprobs=top, echo=False)
        return await _serve(request, body, "chat.completion", "chatcmpl", [prompt], shared, chat=True)

    async def _serve(request, body, kind, id_prefix, prompts, shared, chat):
        n = _optional_int(body, "n", 1, 16, default=1)
        stream = _optional_bool(body, "stream", False)
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise APIError(400, "stream_options must be {\"include_usage\": bool}, and only with stream: true", param="stream_options")
        include_usage = bool((options or {}).get("include_usage"))
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
        view = _Choices(llm.tokenizer, choices, n, chat, shared)
        events = _events(outputs, len(choices), tickets, request)
        if stream:
            return EventSourceResponse(_stream(events, view, head, chat, include_usage))
        async for index, out in events:
            view.add(index, out)
        return {**head, "choices": view.whole(), "usage": view.usage()}

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
    """Each choice's text, logprobs and finish reason as outputs arrive, in OpenAI's shapes."""

    def __init__(self, tokenizer, choices, n, chat, shared):
        self.tokenizer, self.choices, self.n, self.chat = tokenizer, choices, n, chat
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
        self.text[index].append(out.text)
        piece_lp = self._logprobs(index, out) if self.logprobs else None
        if out.finished:
            self.finish[index] = out.finish_reason
        if self.chat:
            delta = {"content": out.text} if out.text else {}
            return {"index": index, "delta": delta, "logprobs": piece_lp, "finish_reason": self.finish[index]}
        return {"index": index, "text": out.text, "logprobs": piece_lp, "finish_reason": self.finish[index]}

    def whole(self):
        result = []
        for index, _ in self.choices:
            text = "".join(self.text[index])
            lp = self._merged(index) if self.logprobs else None
            if self.chat:
                result.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                               "finish_reason": self.finish[index]})
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


# --- request parsing: one line naming the problem and the field -------------------------------------

async def _json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _check_fields(body, allowed):
    for name, value in body.items():
        if name in UNSUPPORTED:
            if value is not None and value != UNSUPPORTED[name] and value != [] and value != {}:
                raise APIError(400, f"'{name}' is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")
        elif name not in allowed:
            raise APIError(400, f"unrecognized request argument '{name}'", param=name, code="unrecognized_argument")


def _check_model(body, model_name):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, f"'model' is required; this server serves '{model_name}'", param="model")
    if model != model_name:
        raise APIError(400, f"model '{model}' does not exist here; this server serves '{model_name}'", param="model",
                       code="model_not_found")


def _optional_int(body, name, low, high, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a whole number in {low}..{high}, got {value!r}", param=name)
    return value


def _optional_bool(body, name, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _number(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def _sampling(body, default_max_tokens, logprobs, top_logprobs, echo) -> dict:
    """SamplingParams fields from the request (OpenAI's defaults: temperature 1, top_p 1)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, got {body.get('stop')!r}",
                       param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63):
        raise APIError(400, f"'seed' must be a whole number, got {seed!r}", param="seed")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise APIError(400, f"'top_k' must be a whole number >= 1, got {top_k!r}", param="top_k")
    max_tokens = _optional_int(body, "max_tokens", 1, 1 << 30, default=default_max_tokens)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(400, f"'cache_salt' must be a non-empty string, got {salt!r}", param="cache_salt")
    return {
        "temperature": _number(body, "temperature", 1.0, 0, 2),
        "top_p": _number(body, "top_p", 1.0, 0, 1) or 1e-9,  # 0: the likeliest token alone
        "top_k": top_k,
        "max_tokens": max_tokens,
        "stop": tuple(stop or ()),
        "seed": seed,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "echo": echo,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2, 2),
        "cache_salt": salt,
    }


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

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return [ids(prompt, 0)]
    if isinstance(prompt, list) and prompt:
        return [ids(p, i) for i, p in enumerate(prompt)]
    raise APIError(400, "'prompt' is required: a string, a list of strings, or token ids", param="prompt")


def _messages(messages) -> list:
    """OpenAI chat messages as the chat template's dialog; text parts of a content list are joined."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    dialog = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role, content = message.get("role"), message.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}", param="messages")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, got {type(content).__name__}", param="messages")
        dialog.append({"role": role, "content": content})
    return dialog


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
