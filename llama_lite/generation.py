"""`Llama`: build a model and tokenizer from a checkpoint, then generate text in batches.

`generate` is Meta's decode loop, kept as the readable core: prompts padded into one token tensor,
decoding from the shortest prompt's end, prompt tokens kept with `torch.where`, a finished mask that
only ORs, an early stop once every row is finished, and truncation done once on the host with
`tolist()`. Everything else (`text_completion`, `chat_completion`, `stream`) is a request on the
engine (engine.py), so it shares one continuous batch with whatever else runs.
"""

import dataclasses
import os
import sys
import time

import torch
from tqdm import tqdm

from .engine.engine import Engine
from .engine.sampling import SamplingParams, check_sampling, chosen_logprobs, draw_seed, request_seed, sample
from .engine.speculation import check_speculative
from .loading.checkpoint import CheckpointError, Int4Values, Int8Values, read_checkpoint
from .loading.download import default_checkpoint
from .model import parallel
from .model.devices import CpuLoad, check_threads, default_threads, resolve_device, resolve_dtype
from .model.kernels import THIN_ROWS, int4_modules, pack_int4, quantize_int4, quantize_int8, quantize_modules
from .model.transformer import KVCache, ModelArgs, Transformer
from .text.chat_template import check_template, render_chat
from .text.tokenizer import Tokenizer, gguf_tokenizer

_PROGRESS_BYTES = 50 << 20  # show loading progress for files larger than this
# A generation without a length limit (max_gen_len=None) that has repeated one span of at most
# LOOP_PERIOD tokens verbatim for its last LOOP_WINDOW tokens has fallen into a loop a small model
# never leaves (1 in 4 sampled runs of "Hi" on SmolLM2 did, until the context's end): it ends there.
LOOP_WINDOW, LOOP_PERIOD = 256, 64


def check_positive_int(name, value):
    """ValueError unless `value` is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, generator: torch.Generator, prefix_cache=True,
                 speculative="auto", threads=None):
        """`threads`: the CPU threads torch computes with (for messages; Llama.build sets them)."""
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.prefix_cache, self.speculative = prefix_cache, speculative
        self.threads = threads or torch.get_num_threads()
        self.device = next(model.parameters()).device
        self._engine = None
        self._inbox = {}  # request id -> outputs not yet read, for requests these methods run

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

        max_seq_len=None: 2048, or the model's context where that is shorter.
        quantize: None keeps a GGUF's 4-bit (Q4_0 / Q4_1) weights in 4 bits where that is the fast
        path (a CPU computing in bfloat16: dtype None or "bfloat16"), and every other weight in
        `dtype`; "int4" also quantizes float weights of the layers to group-32 4-bit (bfloat16
        activations, CPU); "int8" holds every weight matrix as int8 with a scale per row.
        compile: the decode step compiled whole (decode_step.py). None compiles it in the background
        where that is the fastest path and changes no promised bit (bfloat16 and 4-bit weights on a
        CPU), replying eagerly meanwhile; True compiles it now (float32 too); False never.
        prefix_cache=True: the engine reuses the K/V of a prompt's beginning that its cache rows still
        hold (prefix_cache.py); False prefills every prompt whole, to compare.
        speculative: "auto" (or "ngram") lets the engine guess a request's next tokens from its own text
        and check them in one step where that costs about nothing (speculation.py); the tokens stay
        exactly those without it. "off" never guesses, to compare. draft: a draft model is not
        supported yet (None only); prompt lookup needs none.
        chat_template: a jinja2 chat template, or a file holding one, used instead of the
        checkpoint's (one that takes `tools`, say, for tool calls).
        threads=None: the cores this process may use (affinity, cgroup quota) that no other process
        keeps busy while it builds (devices.default_threads); set for the whole process.
        """
        load = CpuLoad()  # other processes' use of the cores, measured while the checkpoint is read
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"unknown quantize {quantize!r}; use 'int8', 'int4' or None")
        if compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (the fastest path this machine supports), got {compile!r}")
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        check_speculative(speculative)
        if draft is not None:
            raise ValueError("draft models are not supported yet; pass draft=None (speculative='ngram' guesses without one)")
        for name, path in (("checkpoint", checkpoint), ("tokenizer", tokenizer)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path (str or PathLike) or None, got {path!r}")
            if path == "":  # Path("") would be the current folder
                default = "the default model" if name == "checkpoint" else "the checkpoint's own"
                raise ValueError(f"{name} must be a path, not an empty string; or None for {default}")
        template = read_chat_template(chat_template)
        if max_seq_len is not None:
            check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("max_batch_size", max_batch_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
            raise ValueError(f"seed must be a whole number (64-bit) or None, got {seed!r}")
        if threads is not None:
            check_threads(threads)
        device = resolve_device(device)

        ckpt = read_checkpoint(default_checkpoint() if checkpoint is None else checkpoint)
        world = parallel.world_size()
        if world > 1 and (quantize or compile):
            raise ValueError("quantize and compile work in one process only; run without torchrun, or without them")
        kept, dtype = _quantized_weights(ckpt, quantize, dtype, device, world)
        if max_seq_len is None:
            max_seq_len = min(2048, ckpt.context_length or 2048)
        if ckpt.context_length and max_seq_len > ckpt.context_length:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context length {ckpt.context_length}; "
                f"pass max_seq_len <= {ckpt.context_length}"
            )
        params = ModelArgs(**ckpt.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if world > 1:  # under torchrun: split the model across the processes
            parallel.check_divisible(world, params.n_heads, params.n_kv_heads, params.hidden_dim, params.vocab_size)
            device = parallel.setup(device)
        KVCache.check_fits(params, dtype, device)
        if tokenizer is not None:
            tok = Tokenizer.from_file(tokenizer)
        elif ckpt.gguf_reader is not None:
            tok = gguf_tokenizer(ckpt.gguf_reader)
        elif ckpt.tokenizer_file is not None:
            tok = Tokenizer.from_file(ckpt.tokenizer_file)
        else:
            raise CheckpointError(f"{ckpt.path} has no tokenizer.json or tokenizer.model; pass tokenizer=PATH")
        if template is not None:
            tok.chat_template = template
        if tok.n_words > params.vocab_size:
            raise CheckpointError(f"the tokenizer has {tok.n_words} tokens but the model only {params.vocab_size}; pass the model's own tokenizer")
        n_threads = threads if threads is not None else default_threads(load)
        if n_threads is not None and device.type == "cpu":
            torch.set_num_threads(n_threads)

        # No throw-away random init: the checkpoint's tensors are assigned. (fairscale's layers
        # cannot be made on the meta device; they get uninitialised memory instead.)
        with torch.device("meta" if world == 1 else device):
            model = Transformer(params)
            if quantize == "int8":
                quantize_modules(model, dtype)
            modules = {kind: {name.removesuffix(".weight") for name in kept if kept[name] == kind} for kind in ("int4", "int8")}
            if ckpt.tied and "tok_embeddings" in modules["int8"]:
                modules["int8"].add("output")  # the embedding's own int8 rows and scales
            quantize_modules(model, dtype, modules["int8"], group=32)
            int4_layers = int4_modules(model, dtype, modules["int4"])
        local_shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}

        # One tensor at a time: read (dequantized, merged or un-permuted), cut to this rank's part,
        # converted, placed.
        state, int4_parts = {}, {}
        progress = tqdm(ckpt.tensors(frozenset(kept) & ckpt.stored.keys()), total=ckpt.n_tensors, desc="loading", unit="tensor",
                        leave=False, file=sys.stderr, disable=ckpt.size < _PROGRESS_BYTES or not parallel.is_main())
        for name, tensor in progress:
            module, _, kind = name.rpartition(".")
            if module in int4_layers:  # 4-bit values as stored, or quantized now; packed once a fused matrix is whole
                _add_int4_part(state, int4_parts, int4_layers[module], name, tensor, dtype)
                continue
            if not isinstance(tensor, Int8Values):  # (kept values only ever load in one process)
                tensor = parallel.shard(name, tensor, local_shapes.get(name, tensor.shape))
            if kind == "weight" and module + ".scale" in local_shapes:  # an int8 layer: as stored (Q8_0), or quantized as read
                state[name], state[module + ".scale"] = tensor if isinstance(tensor, Int8Values) else quantize_int8(tensor.to(device))
            else:
                state[name] = tensor.to(device=device, dtype=dtype)
        if ckpt.tied and "tok_embeddings.weight" in state:
            for part in ("weight", "scale") if "output.scale" in local_shapes else ("weight",):  # the same tensors, not copies
                state[f"output.{part}"] = state[f"tok_embeddings.{part}"]
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise CheckpointError(f"{ckpt.path}: its tensors do not match its metadata ({detail[:300]})") from None
        model.setup_cache()
        model.tokenizer_vocab_size = tok.n_words  # a smaller tokenizer than the model's: its missing ids are never sampled
        model.eval()
        model.use_thin_decode(device.type == "cpu" and dtype == torch.float32 and not (quantize or compile) and world == 1
                                and max_batch_size <= THIN_ROWS)
        if compile is None:  # where it is fast and keeps every promise (float32 stays eager, bit for bit)
            compile = device.type == "cpu" and dtype != torch.float32 and world == 1
            background = True
        else:
            background = False
        if compile:
            from .model.decode_step import DecodeStep  # imports the compiler (~70 MB): only when it is used

            model.decode_step = DecodeStep(model)
            if background and parallel.is_main():
                print("llama_lite: compiling the decode step in the background (up to a minute the first time, seconds once "
                      "cached); replies start at once", file=sys.stderr)
            model.decode_step.start(background)

        generator = torch.Generator(device=device)
        if seed is None:
            seed = parallel.broadcast(generator.seed())  # every rank must sample the same tokens
        generator.manual_seed(seed)
        return Llama(model, tok, generator, prefix_cache=prefix_cache, speculative=speculative, threads=n_threads)

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
        check_positive_int("max_gen_len", max_gen_len)
        for i, ids in enumerate(prompt_tokens):
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"prompt {i} is empty or not a list of token ids; give every prompt at least one token")
            if not all(isinstance(t, int) and 0 <= t < params.vocab_size for t in ids):
                raise ValueError(f"prompt {i} holds a token id outside [0, {params.vocab_size})")
            if len(ids) + max_gen_len > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, and with max_gen_len {max_gen_len} it exceeds "
                    f"max_seq_len {params.max_seq_len}; shorten it, lower max_gen_len or build with a larger max_seq_len"
                )

    @torch.inference_mode()
    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, echo=False):
        """New tokens for each prompt (with the prompt first if `echo`), cut to `max_gen_len` and
        before the first stop id; and their log-probabilities if `logprobs`, else None."""
        self._check_prompts(prompt_tokens, max_gen_len)
        check_sampling(temperature, top_p, top_k)
        if self._engine is not None and self._engine.requests:  # aborted ones hold nothing
            raise ValueError("generate uses KV-cache rows 0..N-1, which the engine's unfinished requests hold; "
                             "finish or abort them first, or add this prompt to the engine")
        bsz, device = len(prompt_tokens), self.device
        lens = torch.tensor([len(p) for p in prompt_tokens], device=device)
        total_len = max(len(p) for p in prompt_tokens) + max_gen_len
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, ids in enumerate(prompt_tokens):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        # From lengths, not `tokens != pad_id`: a pad id can be a real token inside a prompt.
        prompt_mask = torch.arange(total_len, device=device)[None, :] < lens[:, None]  # (bsz, total_len)
        row_end = lens + max_gen_len  # each row is done once it holds max_gen_len new tokens
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        token_logprobs = torch.zeros(bsz, total_len, device=device) if logprobs else None
        generators = self._generators(len(prompt_tokens), None) if temperature > 0 else None
        prompt_lens = [len(p) for p in prompt_tokens]

        prev_pos = 0
        for cur_pos in range(min(len(p) for p in prompt_tokens), total_len):
            # The first call is the prefill of every row's shared prompt length; then one token a step.
            # Echoed logprobs need every prompt position's logits, otherwise only the last is computed.
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not (logprobs and echo))
            next_token = _sample_rows(logits[:, -1], [cur_pos >= n for n in prompt_lens], generators, temperature,
                                      top_p, top_k)
            next_token = torch.where(prompt_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                first = cur_pos - logits.shape[1] + 1  # the logits at position p score the token at p + 1
                token_logprobs[:, first : cur_pos + 1] = chosen_logprobs(logits, tokens[:, first : cur_pos + 1])
            finished |= ~prompt_mask[:, cur_pos] & torch.isin(next_token, stop_ids)
            finished |= cur_pos + 1 >= row_end
            prev_pos = cur_pos
            if finished.all():  # the one host sync a step
                break

        out_tokens, out_logprobs = [], []
        rows_logprobs = token_logprobs.tolist() if logprobs else None
        for i, row in enumerate(tokens.tolist()):
            n = len(prompt_tokens[i])
            new = row[n : n + max_gen_len]
            end = n + next((j for j, t in enumerate(new) if t in self.tokenizer.stop_ids), len(new))
            start = 0 if echo else n
            out_tokens.append(row[start:end])
            if logprobs:
                out_logprobs.append(rows_logprobs[i][start:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def _generators(self, n, seed):
        """Row i of a job samples from its own generator, seeded request_seed(seed, i); without a
        seed, the job's seed is drawn from the Llama's generator (Llama.build's seed)."""
        base = draw_seed(self.generator) if seed is None else seed
        return [torch.Generator(self.device).manual_seed(request_seed(base, i)) for i in range(n)]

    # --- requests on the engine ----------------------------------------------------------------------

    def _outputs(self, request_ids):
        """Step the engine until these requests finish, yielding their outputs as they come. Outputs
        of other requests these methods run (a paused stream) wait in their inboxes; a request whose
        reader stops early (a closed stream, an error, Ctrl-C) is aborted."""
        pending = set(request_ids)
        try:
            while pending:
                ready = [out for rid in request_ids if rid in pending for out in self._take(rid)]
                if not ready:
                    waiting = any(rid in self.engine.requests for rid in pending)
                    if not waiting and not any(out.request_id in pending for out in self.engine.aborted):
                        raise RuntimeError("the engine was stepped directly while these requests ran; their outputs are gone")
                    for out in self.engine.step():
                        if out.request_id in self._inbox:
                            self._inbox[out.request_id].append(out)
                for out in ready:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            for rid in request_ids:
                self._inbox.pop(rid, None)
                if rid in pending:
                    self.engine.abort(rid)

    def _take(self, rid):
        box = self._inbox[rid]
        taken, box[:] = list(box), []
        return taken

    def _add(self, prompt_tokens, params):
        """Add each prompt as a request with its SamplingParams (params[i] for prompt i): their ids
        (nothing added if one is refused)."""
        ids = []
        try:
            for prompt, its_params in zip(prompt_tokens, params):
                ids.append(self.engine.add(prompt, its_params))
                self._inbox[ids[-1]] = []
        except BaseException:
            for rid in ids:
                self._inbox.pop(rid, None)
                self.engine.abort(rid)
            raise
        return ids

    def as_completed(self, prompt_tokens, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False,
                     echo=False, stop=None, seed=None, presence_penalty=0.0, frequency_penalty=0.0, progress=False,
                     json_schema=None, json_object=False, regex=None, grammar=None):
        """Run each prompt (token ids) as a request on the engine; yield (its index, its result) as
        each finishes, so a caller can keep finished work while the rest runs. A result: tokens,
        text, logprobs (or None) and finish_reason. `progress` shows a bar on stderr. json_schema,
        json_object, regex, grammar: structured output, as SamplingParams takes it.

        Prompt i samples from its own generator seeded request_seed(seed, i) (seed drawn from the
        Llama's generator when None), so its text does not depend on the batch. max_gen_len=None:
        up to the cache's end, or until the text repeats itself verbatim (LOOP_WINDOW)."""
        guard_loops = max_gen_len is None
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
        request_ids = self._add(prompt_tokens, self._per_prompt(params, len(prompt_tokens)))
        index = {rid: i for i, rid in enumerate(request_ids)}
        looped = set()
        results = {rid: {"tokens": [], "text": [], "logprobs": [] if logprobs else None} for rid in request_ids}
        bar = tqdm(total=len(request_ids), desc="completing", unit="prompt", file=sys.stderr,
                   disable=not progress or not parallel.is_main())
        started, n_new = time.perf_counter(), 0
        try:
            for out in self._outputs(request_ids):
                result = results[out.request_id]
                result["tokens"] += out.token_ids
                result["text"].append(out.text)
                if logprobs:
                    result["logprobs"] += out.logprobs
                n_new += len(out.token_ids)
                if guard_loops and not out.finished and _looping(result["tokens"]):
                    looped.add(out.request_id)
                    self.engine.abort(out.request_id)  # its last output comes at the next step
                if out.finished:
                    bar.set_postfix_str(f"{n_new / (time.perf_counter() - started):.1f} tok/s", refresh=False)
                    bar.update(1)
                    reason = "length" if out.request_id in looped else out.finish_reason
                    yield index[out.request_id], {**result, "text": "".join(result["text"]), "finish_reason": reason}
        finally:
            bar.close()

    def _per_prompt(self, params, n):
        """params for each of n prompts, prompt i seeded request_seed(seed, i) (see _generators)."""
        base = draw_seed(self.generator) if params.seed is None else params.seed
        return [dataclasses.replace(params, seed=request_seed(base, i)) for i in range(n)]

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
        reason = None
        for out in self._outputs(self._add([prompt_tokens], self._per_prompt(params, 1))):
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
        return [_with_logprobs({"generation": {"role": "assistant", "content": r["text"]}, "finish_reason": r["finish_reason"]}, r)
                for r in done]


def _add_int4_part(state, parts, target, name, tensor, dtype):
    """Keep one weight (or bias) of an int4 layer; once every part of its matrix is in, pack it into
    `state` (the parts' rows one after another, as kernels.FUSED_INT4 orders them)."""
    (fused, members), kind = target, name.rpartition(".")[2]
    if kind == "weight" and not isinstance(tensor, Int4Values):
        tensor = Int4Values(*quantize_int4(tensor))
    got = parts.setdefault((fused, kind), {})
    got[name.rpartition(".")[0]] = tensor
    if len(got) < len(members):
        return
    ordered = [got[m] for m in members]
    del parts[(fused, kind)]
    if kind == "weight":
        q, scale, offset = (torch.cat(x) for x in zip(*ordered))
        state[fused + ".weight"], state[fused + ".scales_and_zeros"] = pack_int4(q, scale, offset, dtype=dtype)
    else:
        state[fused + "." + kind] = torch.cat(ordered).to(dtype)


def _quantized_weights(ckpt, quantize, dtype, device, world):
    """({Meta name: "int4" or "int8"} of the weights held quantized, the activations' dtype).

    4-bit weights run through PyTorch's CPU kernel with bfloat16 activations: the fastest path
    measured here on both kinds of x86 CPU (AVX512-BF16 and AVX2-only). So unless another dtype is
    asked for, a GGUF's Q4_0 / Q4_1 layers stay 4-bit, and a Q8_0 embedding and output head stay
    int8 with their scale per 32 (read once per token, they are a third of SmolLM2's bytes); both as
    stored, nothing rounded but the 4-bit blocks' scales (to bfloat16). quantize="int4" also
    quantizes the layers of float checkpoints."""
    asked_bf16 = dtype is None or dtype in ("bfloat16", torch.bfloat16)
    if quantize == "int4" and (device.type != "cpu" or not asked_bf16):
        raise ValueError("quantize='int4' runs on a CPU with bfloat16 activations; pass device='cpu' and dtype "
                         "'bfloat16' (or none), or quantize=None")
    if quantize == "int8" or not (quantize == "int4" or (ckpt.stored and device.type == "cpu" and asked_bf16 and world == 1)):
        return {}, resolve_dtype(dtype, device)
    ends = ("tok_embeddings.weight", "output.weight")  # looked up, or multiplied for one token a sequence
    kept = {name: kind for name, kind in ckpt.stored.items() if (kind == "int4") != (name in ends)}
    if quantize == "int4":
        kept.update({f"layers.{i}.{m}.weight": "int4" for i in range(ckpt.args["n_layers"]) for m in _LAYER_MATRICES})
    return kept, torch.bfloat16


_LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def read_chat_template(value) -> "str | None":
    """A chat template given as its text or as a file holding it (None: none given)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"chat_template must be a jinja2 template or a file holding one, got {value!r}")
    text = str(value)
    if not isinstance(value, str) or ("{{" not in text and "{%" not in text):  # a path
        try:
            text = open(value, encoding="utf-8").read()
        except FileNotFoundError:
            raise FileNotFoundError(f"chat template file {value} does not exist; pass a jinja2 template or its file") from None
        except (IsADirectoryError, UnicodeDecodeError):
            raise ValueError(f"chat template file {value} is not a text file; pass a jinja2 template or its file") from None
    check_template(text)
    return text


def _sample_rows(logits, due, generators, temperature, top_p, top_k):
    """The next id of each row of `logits` (bsz, vocab): greedy at temperature 0, else each row due
    (past its prompt) sampled alone with its own generator, so it draws what it would draw alone; rows
    still in their prompt draw nothing (0, replaced by their prompt token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    zero = torch.zeros(1, dtype=torch.long, device=logits.device)
    return torch.cat([sample(row, temperature, top_p, top_k, generator) if is_due else zero
                      for row, is_due, generator in zip(logits.split(1), due, generators)])


def _looping(tokens) -> bool:
    """Whether the last LOOP_WINDOW tokens repeat one span of at most LOOP_PERIOD tokens verbatim."""
    if len(tokens) < LOOP_WINDOW:
        return False
    tail = tokens[-LOOP_WINDOW:]
    return any(tail[-1] == tail[-1 - p] and tail[p:] == tail[:-p] for p in range(1, LOOP_PERIOD + 1))


def _with_logprobs(result: dict, done: dict) -> dict:
    if done["logprobs"] is not None:
        result["logprobs"] = done["logprobs"]
    return result
