"""`load`: `Llama.build`'s settings into a ready model, tokenizer and generator.

The checkpoint is read, the model's shape fixed (its context, the batch's rows, its split across
torchrun's processes), its tokenizer chosen, its weights loaded (weights.py), and the machine's
choices made: CPU threads, the one-token decode path, and whether the decode step is compiled.
"""

import sys
from typing import NamedTuple

import torch

from .errors import CheckpointError
from .loading.checkpoint import read_checkpoint
from .loading.download import default_checkpoint
from .loading.weights import load_model, quantized_weights
from .model import parallel
from .model.devices import CpuLoad, default_threads, resolve_device, warn_if_oversubscribed
from .model.kernels import THIN_ROWS
from .model.kv_cache import KVCache
from .model.transformer import ModelArgs, Transformer
from .settings import BuildSettings
from .text.chat_template import read_chat_template
from .text.gguf_vocab import gguf_tokenizer
from .text.tokenizer import Tokenizer


class Loaded(NamedTuple):
    model: Transformer
    tokenizer: Tokenizer
    generator: torch.Generator
    threads: "int | None"  # the CPU threads set for the process (None: torch's own)


def load(settings: BuildSettings) -> Loaded:
    """Read the checkpoint of `settings` and make everything `Llama` holds."""
    cpu_load = CpuLoad()  # other processes' use of the cores, measured while the checkpoint is read
    template = read_chat_template(settings.chat_template)
    device = resolve_device(settings.device)
    ckpt = read_checkpoint(default_checkpoint() if settings.checkpoint is None else settings.checkpoint)
    world = parallel.world_size()
    if world > 1 and (settings.quantize or settings.compile):
        raise ValueError("quantize and compile work in one process only; run without torchrun, or without them")
    quantized, dtype = quantized_weights(ckpt, settings.quantize, settings.dtype, device, world)
    params = _model_args(ckpt, settings.max_seq_len, settings.max_batch_size)
    if world > 1:  # under torchrun: split the model across the processes
        parallel.check_divisible(world, params.n_heads, params.n_kv_heads, params.hidden_dim, params.vocab_size)
        device = parallel.setup(device)
    KVCache.check_fits(params, dtype, device)
    tok = _tokenizer(ckpt, settings.tokenizer, template, params.vocab_size)
    threads = settings.threads if settings.threads is not None else default_threads(cpu_load)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
        if settings.threads is not None and parallel.is_main():
            warn_if_oversubscribed(threads)
    model = load_model(ckpt, params, quantized, settings.quantize, dtype, device, tok.n_words)
    model.use_thin_decode(device.type == "cpu" and dtype == torch.float32 and not (settings.quantize or settings.compile)
                          and world == 1 and settings.max_batch_size <= THIN_ROWS)
    compile_decode_step(model, settings.compile, device, dtype)
    return Loaded(model, tok, _generator(device, settings.seed), threads)


def _model_args(ckpt, max_seq_len, max_batch_size) -> ModelArgs:
    """The checkpoint's shape with this run's context (None: 2048, or the model's if shorter) and rows."""
    if max_seq_len is None:
        max_seq_len = min(2048, ckpt.context_length or 2048)
    if ckpt.context_length and max_seq_len > ckpt.context_length:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the model's context length {ckpt.context_length}; "
            f"pass max_seq_len <= {ckpt.context_length}"
        )
    return ModelArgs(**ckpt.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)


def _tokenizer(ckpt, path, template, vocab_size) -> Tokenizer:
    """The tokenizer file at `path`, else the checkpoint's own; with `template` as its chat template if given."""
    if path is not None:
        tok = Tokenizer.from_file(path)
    elif ckpt.gguf_reader is not None:
        tok = gguf_tokenizer(ckpt.gguf_reader)
    elif ckpt.tokenizer_file is not None:
        tok = Tokenizer.from_file(ckpt.tokenizer_file)
    else:
        raise CheckpointError(f"{ckpt.path} has no tokenizer.json or tokenizer.model; pass tokenizer=PATH")
    if template is not None:
        tok.chat_template = template
    if tok.n_words > vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.n_words} tokens but the model only {vocab_size}; "
                              "pass the model's own tokenizer")
    return tok


def compile_decode_step(model, compile, device, dtype) -> None:
    """Compile the model's one-token step if asked (True: now), or, with compile None, in the background
    where it is fast and keeps every promise (a CPU computing in bfloat16 or 4 bits; float32 stays
    eager, bit for bit), replying eagerly meanwhile."""
    background = compile is None
    if background:
        compile = device.type == "cpu" and dtype != torch.float32 and parallel.world_size() == 1
    if not compile:
        return
    from .model.decode_step import DecodeStep  # imports the compiler (~70 MB): only when it is used

    model.decode_step = DecodeStep(model)
    if background and parallel.is_main():
        print("llama_lite: compiling the decode step in the background (up to a minute the first time, seconds once "
              "cached); replies start at once", file=sys.stderr)
    model.decode_step.start(background)


def _generator(device, seed) -> torch.Generator:
    """The generator of requests without their own seed; every rank must sample the same tokens."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = parallel.broadcast(generator.seed())
    return generator.manual_seed(seed)
