"""POST /v1/chat/completions: a conversation rendered through the model's chat template and answered,
with tools offered (and calls read back, or forced by a grammar) when the request has them."""

import asyncio

from ..text.chat_template import takes_tools
from .errors import APIError
from .protocol import ChatRequest
from .serving import OpenAIServing, response_format
from .tool_calls import call_format, call_grammar, check_parameters


class ServingChat(OpenAIServing):
    async def create_chat_completion(self, body: ChatRequest, request):
        self.check_model(body.model)
        prompt, call_parsing, constraint = await asyncio.to_thread(self._chat_prompt, body)
        sampling = {**body.sampling(default_max_tokens=None), "logprobs": bool(body.logprobs),
                    "top_logprobs": body.top_logprobs or 0, "echo": False, **constraint}
        return await self.generate(request, body, "chat.completion", "chatcmpl", [prompt], sampling, chat=True,
                                   call_parsing=call_parsing)

    def _chat_prompt(self, body: ChatRequest):
        """The prompt's tokens; (call format, function names) when tools are offered, else None; and
        the constraint: the forced call's grammar, or the response_format's."""
        tools, template = body.template_tools(), self.llm.tokenizer.chat_template or ""
        if sum(len(m.content or "") for m in body.messages) > self.max_chars:
            raise APIError(400, "the messages hold more tokens than this model's context; shorten them", param="messages",
                           code="context_length_exceeded")
        if tools and not takes_tools(template):
            raise APIError(400, "this model's chat template does not take tools; start the server with --chat_template "
                                "FILE holding one that does (a Qwen2.5-, Hermes- or Llama 3.1-style template)", param="tools")
        try:
            prompt = self.llm.chat_prompt_tokens(body.dialog(), tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not tools:
            return prompt, None, response_format(body)
        fmt, forced = call_format(template), [f.model_dump() for f in body.functions_forced()]
        try:
            check_parameters(forced, "tools")
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        constraint = {"grammar": call_grammar(fmt, forced)} if forced else {}
        return prompt, (fmt, [t["function"]["name"] for t in tools]), constraint
