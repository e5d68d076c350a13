"""What serving completions and chat share: checking a request against the model and the queue,
submitting one engine request per choice, and answering whole or as server-sent events."""

import asyncio
import json
import time
import uuid

from fastapi.sse import EventSourceResponse, format_sse_event

from ..engine.constraints import KINDS
from ..engine.engine_thread import RequestHandle
from ..engine.sampling import SamplingParams, draw_seed, request_seed
from .choices import ChoiceAccumulator
from .errors import APIError


class OpenAIServing:
    """The base of ServingCompletion and ServingChat: `llm` served as `model_name` through `worker`
    (the engine's thread); `max_queue` requests may wait for a KV-cache row beyond those running."""

    def __init__(self, llm, model_name: str, worker, max_queue: int):
        self.llm, self.model_name, self.worker, self.max_queue = llm, model_name, worker, max_queue
        self.rows = llm.model.params.max_batch_size
        # A text of n characters (n bytes at least) holds n / max_token_bytes tokens at least: one longer
        # than this can never fit the context, and is refused before tokenizing it.
        self.max_chars = llm.model.params.max_seq_len * llm.tokenizer.max_token_bytes()

    def check_model(self, model):
        if not model:
            raise APIError(400, f"'model' is required; this server serves '{self.model_name}'", param="model")
        if model != self.model_name:
            raise APIError(400, f"model '{model}' does not exist here; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def generate(self, request, body, kind, id_prefix, prompts, sampling, chat, call_parsing=None):
        """The response to `body`: each prompt's n choices generated with the SamplingParams fields
        `sampling`, whole or streamed; `kind` and `id_prefix` name it ("chat.completion", "chatcmpl")."""
        n, stream = body.n or 1, bool(body.stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self._check_context(prompts, sampling, chat)
        choices = [(i * n + j, prompt) for i, prompt in enumerate(prompts) for j in range(n)]
        self._check_capacity(len(choices), n)
        await self._compile_constraint(sampling)
        outputs = asyncio.Queue()
        handles = self._submit(choices, sampling, outputs)
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.model_name}
        accumulator = ChoiceAccumulator(self.llm.tokenizer, choices, n, chat, sampling, call_parsing)
        if stream:  # the streaming response itself stops (and so aborts) when its client goes
            events = self._events(outputs, len(choices), handles)
            return EventSourceResponse(_stream(events, accumulator, head, chat, include_usage))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            async for index, out in self._events(outputs, len(choices), handles, gone):
                accumulator.add(index, out)
        finally:
            gone.cancel()
        return {**head, "choices": accumulator.response_choices(), "usage": accumulator.usage()}

    def _check_context(self, prompts, sampling, chat):
        context = self.llm.model.params.max_seq_len
        for prompt in prompts:
            if len(prompt) + (sampling["max_tokens"] or 1) > context:
                raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {sampling['max_tokens']}; "
                                    f"this model's context is {context} tokens: shorten the prompt or lower max_tokens",
                               param="messages" if chat else "prompt", code="context_length_exceeded")

    def _check_capacity(self, sequences, n):
        rows, max_queue = self.rows, self.max_queue
        if self.worker.closing:
            raise APIError(503, "the server is shutting down", kind="server_error")
        if sequences > rows + max_queue:  # it would be refused however idle the server is
            raise APIError(400, f"this request runs {sequences} sequences (prompts x n), more than the server ever "
                                f"holds ({rows} rows + --max_queue {max_queue}); send fewer prompts or a smaller n",
                           param="n" if n > 1 else "prompt", code="too_many_sequences")
        if self.worker.pending + sequences > rows + max_queue:
            raise APIError(429, f"the server's queue is full ({max_queue} waiting); retry in a few seconds",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "2"})

    def _submit(self, choices, sampling, outputs) -> list:
        """One engine request per choice, its outputs sent to `outputs`; their handles."""
        loop, handles = asyncio.get_running_loop(), []
        # Choice k (prompt i's choice j is i * n + j) samples from its own generator seeded seed + k, so
        # it repeats whatever else runs; without a seed, the request's is drawn from the server's (--seed).
        seed = draw_seed(self.llm.generator) if sampling["seed"] is None else sampling["seed"]
        for index, prompt in choices:
            try:
                params = SamplingParams(**{**sampling, "seed": request_seed(seed, index)})
            except ValueError as e:
                raise APIError(400, str(e)) from None
            handle = RequestHandle(loop, outputs, index, echoed_ids=len(prompt) if params.echo else 0)
            self.worker.submit(handle, prompt, params)
            handles.append(handle)
        return handles

    async def _compile_constraint(self, sampling):
        """A constrained request's matcher made in a worker thread, so that compiling holds up neither
        the event loop nor the engine thread (which then finds it made); 400 if it cannot be enforced."""
        if not any(sampling.get(k) for k in KINDS):
            return
        try:
            await asyncio.to_thread(lambda: self.llm.engine.grammars.matcher(SamplingParams(**sampling)))
        except ValueError as e:
            message = str(e).replace("SamplingParams.json_schema", "response_format.json_schema.schema")
            raise APIError(400, message, param="response_format") from None

    async def _events(self, outputs, count, handles, gone=None):
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
                for handle in handles:
                    self.worker.abort(handle)


def response_format(body) -> dict:
    """The SamplingParams fields a request's response_format asks for."""
    return body.response_format.constraint() if body.response_format is not None else {}


async def _disconnected(request):
    """Returns once the client of a whole (non-streamed) answer has gone; its body is read already,
    so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(events, accumulator, head, chat, include_usage):
    """The server-sent events of a streamed response: a chunk for each output with news, the usage
    if asked, then [DONE]."""
    chunk_kind = head["object"] + ".chunk" if chat else head["object"]
    base = {**head, "object": chunk_kind}
    if chat:
        for index, _ in accumulator.choices:
            yield _sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
    try:
        async for index, out in events:
            choice = accumulator.add(index, out)
            if choice.get("text") or choice.get("delta") or out.finished or (accumulator.logprobs and out.token_ids):
                yield _sse({**base, "choices": [choice]})  # no chunk without news
    finally:
        await events.aclose()  # a client gone mid-stream: abort its requests now
    if include_usage:
        yield _sse({**base, "choices": [], "usage": accumulator.usage()})
    yield format_sse_event(data_str="[DONE]")


def _sse(data) -> bytes:
    return format_sse_event(data_str=json.dumps(data, ensure_ascii=False))
