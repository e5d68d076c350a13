"""`Llama`: build a model and tokenizer from a checkpoint, then generate text in batches.

The decode loop is Meta's: prompts padded into one token tensor, decoding from the shortest
prompt's end, prompt tokens kept with `torch.where`, a finished mask that only ORs, an early stop
once every row is finished, and truncation done once on the host with `tolist()`.
"""

import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import parallel
from .chat_template import render_chat
from .checkpoint import CheckpointError, read_checkpoint
from .download import default_checkpoint
from .kernels import quantize_int8, quantize_modules
from .model import ModelArgs, Transformer
from .sampling import check_sampling, sample
from .tokenizer import Tokenizer, gguf_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROGRESS_BYTES = 50 << 20  # show loading progress for files larger than this


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls beat float32 there (about 2x here); elsewhere they crawl."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _stop_prefix_length(text: str, stop_texts) -> int:
    """How many trailing characters of `text` could begin one of `stop_texts` (0 if none)."""
    longest = 0
    for stop in stop_texts:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def check_positive_int(name, value):
    """ValueError unless `value` is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, generator: torch.Generator):
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.device = next(model.parameters()).device

    @staticmethod
    def build(checkpoint=None, tokenizer=None, max_seq_len=2048, max_batch_size=8, device=None, dtype=None, seed=None,
              quantize=None, compile=False) -> "Llama":
        """Load a checkpoint (None: the default SmolLM2-135M-Instruct GGUF) into a ready generator.

        quantize="int8": every weight matrix held as int8 with a scale per row (weight-only; about a
        quarter of float32's memory). compile=True: the one-token decode step is compiled with
        torch.compile (Transformer.compile_decode), 2-3x faster at batch 1 on CPU; compiling costs
        seconds to tens of seconds the first time a batch size is seen (inductor caches on disk).
        """
        if quantize not in (None, "int8"):
            raise ValueError(f"unknown quantize {quantize!r}; use 'int8' or None")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("max_batch_size", max_batch_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be a whole number or None, got {seed!r}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)

        ckpt = read_checkpoint(default_checkpoint() if checkpoint is None else checkpoint)
        if ckpt.context_length and max_seq_len > ckpt.context_length:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context length {ckpt.context_length}; "
                f"pass max_seq_len <= {ckpt.context_length}"
            )
        params = ModelArgs(**ckpt.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        world = parallel.world_size()
        if world > 1 and (quantize or compile):
            raise ValueError("quantize and compile work in one process only; run without torchrun, or without them")
        if world > 1:  # under torchrun: split the model across the processes
            parallel.check_divisible(world, params.n_heads, params.n_kv_heads, params.hidden_dim, params.vocab_size)
            device = parallel.setup(device)
        if tokenizer is not None:
            tok = Tokenizer.from_file(tokenizer)
        elif ckpt.gguf_reader is not None:
            tok = gguf_tokenizer(ckpt.gguf_reader)
        elif ckpt.tokenizer_file is not None:
            tok = Tokenizer.from_file(ckpt.tokenizer_file)
        else:
            raise CheckpointError(f"{ckpt.path} has no tokenizer.json or tokenizer.model; pass tokenizer=PATH")
        if tok.n_words > params.vocab_size:
            raise CheckpointError(f"the tokenizer has {tok.n_words} tokens but the model only {params.vocab_size}; pass the model's own tokenizer")

        # No throw-away random init: the checkpoint's tensors are assigned. (fairscale's layers
        # cannot be made on the meta device; they get uninitialised memory instead.)
        with torch.device("meta" if world == 1 else device):
            model = Transformer(params)
            if quantize:
                quantize_modules(model, dtype)
        local_shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}

        # One tensor at a time: read (dequantized, merged or un-permuted), cut to this rank's part,
        # converted, placed.
        state = {}
        progress = tqdm(ckpt.tensors(), total=ckpt.n_tensors, desc="loading", unit="tensor", leave=False,
                        file=sys.stderr, disable=ckpt.size < _PROGRESS_BYTES or not parallel.is_main())
        for name, tensor in progress:
            tensor = parallel.shard(name, tensor, local_shapes.get(name, tensor.shape))
            scale_name = name.removesuffix("weight") + "scale"
            if scale_name in local_shapes:  # an int8 layer: quantized as it is read
                state[name], scale = quantize_int8(tensor.to(device))
                state[scale_name] = scale.to(dtype)
            else:
                state[name] = tensor.to(device=device, dtype=dtype)
        if ckpt.tied and "tok_embeddings.weight" in state:
            for part in ("weight", "scale") if quantize else ("weight",):  # the same tensors, not copies
                state[f"output.{part}"] = state[f"tok_embeddings.{part}"]
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise CheckpointError(f"{ckpt.path}: its tensors do not match its metadata ({detail[:300]})") from None
        model.setup_cache()
        model.eval()
        if compile:
            model.compile_decode()

        generator = torch.Generator(device=device)
        if seed is None:
            seed = parallel.broadcast(generator.seed())  # every rank must sample the same tokens
        generator.manual_seed(seed)
        return Llama(model, tok, generator)

    # --- the decode loop ---------------------------------------------------------------------------

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

    def _decode(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo):
        """Fill a padded batch one position at a time; yields (cur_pos, tokens, token_logprobs)
        after each step. tokens: (bsz, longest prompt + max_gen_len); token_logprobs likewise or None."""
        self._check_prompts(prompt_tokens, max_gen_len)
        check_sampling(temperature, top_p, top_k)
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

        prev_pos = 0
        for cur_pos in range(min(len(p) for p in prompt_tokens), total_len):
            # The first call is the prefill of every row's shared prompt length; then one token a step.
            # Echoed logprobs need every prompt position's logits, otherwise only the last is computed.
            logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not (logprobs and echo))
            next_token = sample(logits[:, -1], temperature, top_p, top_k, self.generator)
            next_token = torch.where(prompt_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                first = cur_pos - logits.shape[1] + 1  # the logits at position p score the token at p + 1
                targets = tokens[:, first : cur_pos + 1, None]
                token_logprobs[:, first : cur_pos + 1] = F.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
            finished |= ~prompt_mask[:, cur_pos] & torch.isin(next_token, stop_ids)
            finished |= cur_pos + 1 >= row_end
            prev_pos = cur_pos
            yield cur_pos, tokens, token_logprobs
            if finished.all():  # the one host sync a step
                break

    @torch.inference_mode()
    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, echo=False):
        """New tokens for each prompt (with the prompt first if `echo`), cut to `max_gen_len` and
        before the first stop id; and their log-probabilities if `logprobs`, else None."""
        for _, tokens, token_logprobs in self._decode(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo):
            pass
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

    @torch.inference_mode()
    def stream(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=None):
        """Yield the reply to one prompt as text pieces while it is generated.

        A piece is released only when the text decoded so far does not end in an incomplete UTF-8
        character, so no piece ever holds half of one; text that could be the start of a stop token
        spelled out ("<|im" of "<|im_end|>") is held until the next tokens settle it. The pieces
        join to decode() of the tokens generate() returns.
        """
        n = len(prompt_tokens) if isinstance(prompt_tokens, (list, tuple)) else 0
        stop_texts = [self.tokenizer.decode([i]) for i in self.tokenizer.stop_ids]
        new, emitted = [], ""
        for cur_pos, tokens, _ in self._decode([prompt_tokens], max_gen_len, temperature, top_p, top_k, False, False):
            if cur_pos < n:
                continue
            token = int(tokens[0, cur_pos])
            if token in self.tokenizer.stop_ids:
                break
            new.append(token)
            # Decode everything so far, not the new token alone: SentencePiece spaces and multi-token
            # characters come out right only in context.
            text = self.tokenizer.decode(new)
            if text.endswith("\ufffd") or not text.startswith(emitted):
                continue  # the next token should complete a character
            ready = len(text) - _stop_prefix_length(text, stop_texts)
            if ready > len(emitted):
                yield text[len(emitted) : ready]
                emitted = text[:ready]
        text = self.tokenizer.decode(new)
        if text != emitted:
            yield text[len(emitted) :]

    # --- text in, text out -------------------------------------------------------------------------

    def _generate_many(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo=False, progress=False):
        """`generate`'s results for a list of any length, in order, with the KV cache's rows kept busy
        (continuous batching): each prompt is prefilled alone into a free row, all rows decode
        together at their own positions, and a row that finishes takes the next prompt at once, so
        no row idles while a long reply in the same batch goes on and no prompt is walked token by
        token. Greedy results equal each prompt run alone."""
        params = self.model.params
        if max_gen_len is None:
            longest = max(range(len(prompt_tokens)), key=lambda i: len(prompt_tokens[i]))
            max_gen_len = params.max_seq_len - 1 - len(prompt_tokens[longest])
            if max_gen_len < 1:
                raise ValueError(
                    f"prompt {longest} has {len(prompt_tokens[longest])} tokens, leaving no room to generate within "
                    f"max_seq_len {params.max_seq_len}; shorten it or build with a larger max_seq_len"
                )
        self._check_prompts(prompt_tokens, max_gen_len, one_batch=False)  # errors name a prompt's place in the list
        check_sampling(temperature, top_p, top_k)
        with torch.inference_mode():
            return self._continuous(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, progress)

    def _continuous(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, progress):
        n_rows = min(self.model.params.max_batch_size, len(prompt_tokens))
        stop_ids, device = self.tokenizer.stop_ids, self.device
        waiting = iter(range(len(prompt_tokens)))
        results = [None] * len(prompt_tokens)  # (tokens, logprobs or None) per prompt
        # Per row: the prompt it holds (None: idle), its new tokens and their logprobs, the echoed
        # prompt's logprobs, and its next input token and that token's position.
        held, new, new_logprobs, prompt_logprobs = [None] * n_rows, [None] * n_rows, [None] * n_rows, [None] * n_rows  # set by fill
        next_input, next_position = [0] * n_rows, [0] * n_rows
        bar = tqdm(total=len(prompt_tokens), desc="completing", unit="prompt", file=sys.stderr,
                   disable=not progress or not parallel.is_main())
        started, n_new = time.perf_counter(), 0

        def chosen_logprobs(logits, chosen):  # (rows, vocab), (rows,) -> (rows,)
            return F.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)

        def take(row, token, logprob) -> bool:
            """Record a row's new token; True once the row is finished (stop id or max_gen_len)."""
            nonlocal n_new
            if token not in stop_ids:
                new[row].append(token)
                new_logprobs[row].append(logprob)
                next_input[row], next_position[row] = token, next_position[row] + 1
                if len(new[row]) < max_gen_len:
                    return False
            i = held[row]
            results[i] = ((list(prompt_tokens[i]) if echo else []) + new[row],
                          prompt_logprobs[row] + new_logprobs[row] if logprobs else None)
            n_new += len(new[row])
            bar.set_postfix_str(f"{n_new / (time.perf_counter() - started):.1f} tok/s", refresh=False)
            bar.update(1)
            return True

        def fill(row):
            """Prefill waiting prompts into `row` until one does not finish at once; idle if none wait."""
            while True:
                i = held[row] = next(waiting, None)
                if i is None:
                    return
                ids = list(prompt_tokens[i])
                new[row], new_logprobs[row], prompt_logprobs[row] = [], [], []
                echoed = logprobs and echo  # echoed logprobs score every prompt token: all positions' logits
                logits = self.model(torch.tensor([ids], device=device), 0, last_only=not echoed, first_row=row)
                if echoed:  # the first prompt token has nothing before it: 0
                    prompt_logprobs[row] = [0.0] + chosen_logprobs(logits[0, :-1], torch.tensor(ids[1:], device=device)).tolist()
                token = sample(logits[:, -1], temperature, top_p, top_k, self.generator)
                next_position[row] = len(ids) - 1
                if not take(row, int(token[0]), float(chosen_logprobs(logits[:, -1], token)[0]) if logprobs else None):
                    return

        for row in range(n_rows):
            fill(row)
        while any(i is not None for i in held):
            # Idle rows ride along at their last position (a batch row costs little); their output is ignored.
            tokens = torch.tensor(next_input, device=device)[:, None]  # (n_rows, 1)
            logits = self.model(tokens, torch.tensor(next_position, device=device), last_only=True)[:, -1]  # (n_rows, vocab)
            chosen = sample(logits, temperature, top_p, top_k, self.generator)
            lps = chosen_logprobs(logits, chosen).tolist() if logprobs else [None] * n_rows
            for row, token in enumerate(chosen.tolist()):  # the one host sync a step
                if held[row] is not None and take(row, token, lps[row]):
                    fill(row)
        bar.close()
        return [r[0] for r in results], ([r[1] for r in results] if logprobs else None)

    def text_completion(self, prompts, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False, echo=False,
                        progress=False):
        """Complete each prompt string: [{"generation": str, "tokens": [int], ("logprobs": [float])}].
        `progress` shows a bar (prompts done, tokens/s) on stderr."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        prompt_tokens = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not text")
            prompt_tokens.append(self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False))
        tokens, token_logprobs = self._generate_many(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, progress)
        results = [{"generation": self.tokenizer.decode(t), "tokens": t} for t in tokens]
        for result, lp in zip(results, token_logprobs or []):
            result["logprobs"] = lp
        return results

    def chat_prompt_tokens(self, dialog) -> list:
        """The tokens of `dialog` rendered with the checkpoint's chat template, ready for the reply."""
        template = self.tokenizer.chat_template
        if not template:
            raise ValueError("this checkpoint has no chat template; use text_completion instead")
        tok = self.tokenizer
        text = render_chat(
            template,
            dialog,
            bos_token=tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
            eos_token=tok.decode([tok.eos_id]),
        )
        return tok.encode(text, bos=False, eos=False)  # the template writes any special tokens itself

    def chat_completion(self, dialogs, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, logprobs=False):
        """The assistant's next message for each dialog: [{"generation": {"role", "content"}}]."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError("dialogs must be a non-empty list of dialogs")
        prompt_tokens = [self.chat_prompt_tokens(d) for d in dialogs]
        tokens, token_logprobs = self._generate_many(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs)
        results = [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}} for t in tokens]
        for result, lp in zip(results, token_logprobs or []):
            result["logprobs"] = lp
        return results
