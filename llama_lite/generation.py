"""`Llama`: build a model and tokenizer from a checkpoint, then generate text in batches.

A façade: `build` reads its settings (settings.py) and loads (loader.py); `generate` is
Meta's padded decode loop (engine/padded.py); everything else (`text_completion`,
`chat_completion`, `stream`, `as_completed`) is a request on the engine (engine/engine.py), run by
the synchronous driver (engine/driver.py), so it shares one continuous batch with whatever else runs.
"""

import torch

from .checks import check_whole
from .engine.driver import Driver, seeded_per_prompt
from .engine.engine import Engine
from .engine.padded import padded_generate
from .engine.prompts import check_prompt
from .engine.sampling import SamplingParams, check_sampling
from .loader import load
from .model.transformer import Transformer
from .settings import BuildSettings
from .text.chat_template import render_chat
from .text.tokenizer import Tokenizer


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, generator: torch.Generator, prefix_cache=True,
                 speculative="auto", threads=None, path=None, compiling=None):
        """`threads`: the CPU threads torch computes with (for messages; Llama.build sets them); `path`:
        the weights' precision and why (path_choice.PathChoice); `compiling`: the process building the
        compiled decode step for the next start (a subprocess.Popen, or None). Llama.build sets both."""
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.path, self.compiling = path, compiling
        self.prefix_cache, self.speculative = prefix_cache, speculative
        self.threads = threads or torch.get_num_threads()
        self.device = next(model.parameters()).device
        self._engine = None
        self._driver = None  # runs this object's requests on the engine (made on first use)

    @property
    def engine(self) -> Engine:
        """The engine over this model's KV cache (made on first use)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, self.generator, prefix_cache=self.prefix_cache,
                                  speculative=self.speculative)
        return self._engine

    @staticmethod
    def build(checkpoint=None, tokenizer=None, max_seq_len=2048, max_batch_size=8, device=None, dtype=None, seed=None,
              quantize=None, compile=None, prefix_cache=True, speculative="auto", draft=None, chat_template=None,
              threads=None) -> "Llama":
        """Load a checkpoint (None: the default SmolLM2-135M-Instruct GGUF) into a ready generator.
        Each argument is a field of settings.BuildSettings, which checks it and says what it does."""
        settings = BuildSettings(checkpoint=checkpoint, tokenizer=tokenizer, max_seq_len=max_seq_len,
                                 max_batch_size=max_batch_size, device=device, dtype=dtype, seed=seed, quantize=quantize,
                                 compile=compile, prefix_cache=prefix_cache, speculative=speculative, draft=draft,
                                 chat_template=chat_template, threads=threads)
        loaded = load(settings)
        return Llama(loaded.model, loaded.tokenizer, loaded.generator, prefix_cache=prefix_cache, speculative=speculative,
                     threads=loaded.threads, path=loaded.path, compiling=loaded.compiling)

    # --- Meta's decode loop ---------------------------------------------------------------------------

    def _check_prompts(self, prompt_tokens, max_gen_len, one_batch=True):
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if one_batch and len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}; "
                "pass fewer, use text_completion (it batches), or build with a larger max_batch_size"
            )
        check_whole("max_gen_len", max_gen_len, 1)
        for i, ids in enumerate(prompt_tokens):
            check_prompt(ids, params, max_gen_len, ("max_gen_len", max_gen_len), index=i)

    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, echo=False):
        """New tokens for each prompt (with the prompt first if `echo`), cut to `max_gen_len` and
        before the first stop id; and their log-probabilities if `logprobs`, else None."""
        self._check_prompts(prompt_tokens, max_gen_len)
        check_sampling(temperature, top_p, top_k)
        if self._engine is not None and self._engine.requests:  # aborted ones hold nothing
            raise ValueError("generate uses KV-cache rows 0..N-1, which the engine's unfinished requests hold; "
                             "finish or abort them first, or add this prompt to the engine")
        return padded_generate(self.model, self.tokenizer, self.generator, prompt_tokens, max_gen_len, temperature, top_p,
                               top_k, logprobs, echo)

    # --- requests on the engine ----------------------------------------------------------------------

    def as_completed(self, prompt_tokens, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False,
                     echo=False, stop=None, seed=None, presence_penalty=0.0, frequency_penalty=0.0, progress=False,
                     json_schema=None, json_object=False, regex=None, grammar=None):
        """Run each prompt (token ids) as a request on the engine; yield (its index, its result) as
        each finishes, so a caller can keep finished work while the rest runs. A result: tokens,
        text, logprobs (or None) and finish_reason. `progress` shows a bar on stderr. json_schema,
        json_object, regex, grammar: structured output, as SamplingParams takes it.

        Prompt i samples from its own generator seeded request_seed(seed, i) (seed drawn from the
        Llama's generator when None), so its text does not depend on the batch. max_gen_len=None:
        up to the cache's end, or until the text repeats itself verbatim (driver.LOOP_WINDOW)."""
        stop_loops = max_gen_len is None
        if max_gen_len is None:  # as Meta's: up to the cache's end for the longest prompt
            self._check_prompts(prompt_tokens, 1, one_batch=False)
            longest = max(range(len(prompt_tokens)), key=lambda i: len(prompt_tokens[i]))
            max_gen_len = self.model.params.max_seq_len - 1 - len(prompt_tokens[longest])
            if max_gen_len < 1:
                raise ValueError(
                    f"prompt {longest} has {len(prompt_tokens[longest])} tokens, leaving no room to generate within "
                    f"max_seq_len {self.model.params.max_seq_len}; shorten it or build with a larger max_seq_len"
                )
        self._check_prompts(prompt_tokens, max_gen_len, one_batch=False)  # errors name a prompt's place in the list
        check_sampling(temperature, top_p, top_k)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_gen_len, stop=stop,
                                seed=seed, logprobs=logprobs, echo=echo, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, json_schema=json_schema, json_object=json_object,
                                regex=regex, grammar=grammar)
        request_ids = self._add_all(prompt_tokens, params)
        index = {rid: i for i, rid in enumerate(request_ids)}
        for rid, result in self._driver.completions(request_ids, logprobs, stop_loops, progress):
            yield index[rid], result

    def _add_all(self, prompt_tokens, params) -> list:
        """Add each prompt as a request on the engine, prompt i seeded request_seed(seed, i); their ids."""
        if self._driver is None:
            self._driver = Driver(self.engine)
        return self._driver.add_all(prompt_tokens, seeded_per_prompt(params, len(prompt_tokens), self.generator))

    def _complete(self, prompt_tokens, max_gen_len, **sampling):
        """as_completed's results in the prompts' order."""
        done = dict(self.as_completed(prompt_tokens, max_gen_len, **sampling))
        return [done[i] for i in range(len(prompt_tokens))]

    @torch.inference_mode()
    def stream(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=None, stop=None, seed=None,
               presence_penalty=0.0, frequency_penalty=0.0, json_schema=None, json_object=False, regex=None, grammar=None):
        """Yield the reply to one prompt as text pieces while it is generated, as a request in the
        engine's shared batch. No piece holds half a UTF-8 character or text that may still turn out
        to be a stop string; the pieces join to the whole reply (decode() of what generate returns
        for this prompt with the same seed). Closing the generator early aborts the request. The
        generator's return value (StopIteration.value) is the finish reason: "stop" or "length"."""
        self._check_prompts([prompt_tokens], max_gen_len)
        check_sampling(temperature, top_p, top_k)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_gen_len, stop=stop, seed=seed,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                json_schema=json_schema, json_object=json_object, regex=regex, grammar=grammar)
        request_ids, reason = self._add_all([prompt_tokens], params), None
        for out in self._driver.run(request_ids):
            if out.text:
                yield out.text
            reason = out.finish_reason
        return reason

    # --- text in, text out -------------------------------------------------------------------------

    def text_completion(self, prompts, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, echo=False,
                        stop=None, seed=None, presence_penalty=0.0, frequency_penalty=0.0, progress=False, **constraint):
        """Complete each prompt string: [{"generation": str, "tokens": [int], "finish_reason": str,
        ("logprobs": [float])}]. `progress` shows a bar (prompts done, tokens/s) on stderr.
        `constraint`: json_schema=, json_object=, regex= or grammar=, as SamplingParams takes them."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        prompt_tokens = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not text")
            prompt_tokens.append(self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False))
        done = self._complete(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, top_k=top_k,
                              logprobs=logprobs, echo=echo, stop=stop, seed=seed, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, progress=progress, **constraint)
        return [_with_logprobs({"generation": r["text"], "tokens": r["tokens"], "finish_reason": r["finish_reason"]}, r)
                for r in done]

    def chat_prompt_tokens(self, dialog, tools=None) -> list:
        """The tokens of `dialog` rendered with the checkpoint's chat template, ready for the reply;
        `tools` (OpenAI-style function definitions) go to a template that takes them."""
        template = self.tokenizer.chat_template
        if not template:
            raise ValueError("this checkpoint has no chat template; use text_completion instead")
        tok = self.tokenizer
        text = render_chat(
            template,
            dialog,
            bos_token=tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
            eos_token=tok.decode([tok.eos_id]),
            tools=tools,
        )
        return tok.encode(text, bos=False, eos=False)  # the template writes any special tokens itself

    def chat_completion(self, dialogs, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, stop=None,
                        seed=None, presence_penalty=0.0, frequency_penalty=0.0, **constraint):
        """The assistant's next message for each dialog: [{"generation": {"role", "content"}, "finish_reason"}].
        `constraint`: json_schema=, json_object=, regex= or grammar=, as SamplingParams takes them."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError("dialogs must be a non-empty list of dialogs")
        prompt_tokens = [self.chat_prompt_tokens(d) for d in dialogs]
        done = self._complete(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, top_k=top_k,
                              logprobs=logprobs, stop=stop, seed=seed, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, **constraint)
        return [_with_logprobs({"generation": {"role": "assistant", "content": r["text"]},
                                "finish_reason": r["finish_reason"]}, r) for r in done]


def _with_logprobs(result: dict, done: dict) -> dict:
    if done["logprobs"] is not None:
        result["logprobs"] = done["logprobs"]
    return result
