"""POST /v1/completions: a prompt (text or token ids, one or many) continued."""

import asyncio

from ..checks import is_whole
from .errors import APIError
from .protocol import CompletionRequest
from .serving import OpenAIServing, response_format


class ServingCompletion(OpenAIServing):
    async def create_completion(self, body: CompletionRequest, request):
        self.check_model(body.model)
        prompts = await asyncio.to_thread(_prompt_ids, body.prompt, self.llm.tokenizer, self.max_chars)
        sampling = {**body.sampling(default_max_tokens=16), "logprobs": body.logprobs is not None,
                    "top_logprobs": body.logprobs or 0, "echo": bool(body.echo), **response_format(body)}
        return await self.generate(request, body, "text_completion", "cmpl", prompts, sampling, chat=False)


def _prompt_ids(prompt, tokenizer, max_chars) -> list:
    """A completion's prompt(s) as token lists: a string, a list of strings, token ids, or lists of them.
    Text of more than `max_chars` characters cannot fit the context: refused untokenized."""
    if isinstance(prompt, str) or all(is_whole(t) for t in prompt):
        return [_one_prompt_ids(prompt, 0, tokenizer, max_chars)]
    return [_one_prompt_ids(p, i, tokenizer, max_chars) for i, p in enumerate(prompt)]


def _one_prompt_ids(prompt, i, tokenizer, max_chars) -> list:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, f"prompt {i} is empty; send some text", param="prompt")
        if len(prompt) > max_chars:
            raise APIError(400, f"prompt {i} has {len(prompt)} characters, more tokens than this model's context holds; "
                                "shorten it", param="prompt", code="context_length_exceeded")
        try:
            return tokenizer.encode(prompt, bos=tokenizer.add_bos, eos=False)
        except ValueError as e:  # a lone surrogate ("\ud800" in the JSON)
            raise APIError(400, f"prompt {i}: {e}", param="prompt") from None
    if isinstance(prompt, list) and prompt and all(is_whole(t) and 0 <= t < tokenizer.n_words for t in prompt):
        return list(prompt)
    raise APIError(400, f"prompt {i} must be a non-empty string or a list of token ids in [0, {tokenizer.n_words})",
                   param="prompt")
