"""POST /v1/chat/completions: a conversation rendered through the model's chat template and answered,
with tools offered (and calls read back, or forced by a grammar) when the request has them."""

import asyncio

from ..text.chat_template import takes_tools
from .errors import APIError
from .generic_tools import GENERIC, generic_dialog, generic_grammar
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
        """The prompt's tokens; (call format, function names, forced) when tools are offered, else None; and
        the constraint: the forced call's grammar, or the response_format's."""
        tools, template = body.template_tools(), self.llm.tokenizer.chat_template or ""
        if sum(len(m.content or "") for m in body.messages) > self.max_chars:
            raise APIError(400, "the messages hold more tokens than this model's context; shorten them", param="messages",
                           code="context_length_exceeded")
        generic = not takes_tools(template)  # tools described in the system message instead (generic_tools)
        forced = [f.model_dump() for f in body.functions_forced()]
        try:
            dialog = generic_dialog(body.dialog(), tools, answer=not forced) if generic else body.dialog()
            prompt = self.llm.chat_prompt_tokens(dialog, tools=None if generic else tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not tools:
            return prompt, None, response_format(body)
        offered = [t["function"] for t in tools]
        try:  # a generic reply is held to its JSON even with "auto": every function's schema is used
            check_parameters(offered if generic else forced, "tools")
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        if generic:
            fmt, constraint = GENERIC, {"grammar": generic_grammar(forced or offered, answer=not forced)}
        else:
            fmt, constraint = call_format(template), {"grammar": call_grammar(call_format(template), forced)} if forced else {}
        if forced:  # stop strings end content, as OpenAI's do, never a forced call
            constraint["stop"] = ()
        return prompt, (fmt, [f["name"] for f in offered], bool(forced)), constraint
