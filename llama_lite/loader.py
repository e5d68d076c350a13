"""`load`: `Llama.build`'s settings into a ready model, tokenizer and generator.

The checkpoint is read, the model's shape fixed (its context, the batch's rows, its split across
torchrun's processes), its tokenizer chosen, its weights loaded (weights.py), and the machine's
choices made: CPU threads, the path (the weights' precision: asked for, or measured once per
machine, path_choice.py), and the decode step compiled ahead of time (aot_step.py, precompile.py).
"""

import functools
import shutil
import subprocess
import sys
from dataclasses import asdict
from typing import NamedTuple

import torch

from . import path_choice, precompile
from .errors import CheckpointError
from .loading.checkpoint import read_checkpoint
from .loading.download import default_checkpoint
from .loading.weights import load_model, quantized_weights
from .model import aot_build, aot_step, parallel
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
    path: path_choice.PathChoice  # the weights' precision, and why
    compiling: "subprocess.Popen | None"  # the process building the compiled step for the next start


def load(settings: BuildSettings) -> Loaded:
    """Read the checkpoint of `settings` and make everything `Llama` holds."""
    cpu_load = CpuLoad()  # other processes' use of the cores, measured while the checkpoint is read
    template = read_chat_template(settings.chat_template)
    device = resolve_device(settings.device)
    ckpt = read_checkpoint(default_checkpoint() if settings.checkpoint is None else settings.checkpoint)
    world = parallel.world_size()
    if world > 1 and (settings.quantize or settings.compile):
        raise ValueError("quantize and compile work in one process only; run without torchrun, or without them")
    threads = settings.threads if settings.threads is not None else default_threads(cpu_load)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
        if settings.threads is not None and parallel.is_main():
            warn_if_oversubscribed(threads)
    path = _path(settings, ckpt, device, world)
    quantize, dtype_asked = ({"int4": ("int4", None), "bfloat16": (None, "bfloat16")}.get(path.path, (None, "float32"))
                             if path.measured else (settings.quantize, settings.dtype))
    quantized, dtype = quantized_weights(ckpt, quantize, dtype_asked, device, world)
    exact = dtype == torch.float32 and not quantized and quantize is None  # float32 throughout: eager, bit for bit
    if not path.measured:
        path.path = "int4" if "int4" in quantized.values() else settings.quantize or str(dtype).removeprefix("torch.")
    params = _model_args(ckpt, settings.max_seq_len, settings.max_batch_size)
    if world > 1:  # under torchrun: split the model across the processes
        parallel.check_divisible(world, params.n_heads, params.n_kv_heads, params.hidden_dim, params.vocab_size)
        device = parallel.setup(device)
    KVCache.check_fits(params, dtype, device)
    tok = _tokenizer(ckpt, settings.tokenizer, template, params.vocab_size)
    model = load_model(ckpt, params, quantized, quantize, dtype, device, tok.n_words)
    model.use_thin_decode(device.type == "cpu" and exact and not settings.compile and world == 1
                          and settings.max_batch_size <= THIN_ROWS)
    child = {**asdict(settings), "checkpoint": str(ckpt.path), "quantize": quantize, "dtype": str(dtype).removeprefix("torch."),
             "compile": False, "tokenizer": settings.tokenizer and str(settings.tokenizer), "chat_template": None,
             "threads": torch.get_num_threads()}
    compiling = attach_decode_step(model, settings.compile, device, exact, child, path)
    if threads is not None and device.type == "cpu":
        now = _threads_for_now(model, threads, settings.threads is None and cpu_load, compiling)
        torch.set_num_threads(now)
        if now < threads and compiling is None:  # lowered for others' niced work: given back when it is gone
            model.threads_later = functools.partial(_threads_back, threads, [CpuLoad()])
    return Loaded(model, tok, _generator(device, settings.seed), threads, path, compiling)


def _threads_for_now(model, threads: int, cpu_load, compiling) -> int:
    """The threads eager steps take until the compiled step is: fewer than `threads` (what compiled
    code is made for) where niced work keeps cores busy (`cpu_load`, unless the threads were asked
    for), this process's own build (`compiling`: a process a graph, up to `threads`) above all. One
    thread beside it on 2 cores: 4-20x faster than two, whose every operation waits on the core the
    build shares (docs/performance.md#threads). _load_quietly gives them back."""
    now = threads if not cpu_load else min(threads, default_threads(cpu_load, niced=True))
    if compiling is not None:
        now = min(now, max(1, threads - min(threads, len(aot_build.graph_shapes(model)))))
    return now


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


def _path(settings, ckpt, device, world) -> path_choice.PathChoice:
    """The path asked for, or where nothing is (dtype, quantize), the one measured fastest on this machine."""
    asked = {name: getattr(settings, name) for name in ("dtype", "quantize") if getattr(settings, name) is not None}
    if asked or device.type != "cpu" or world > 1:
        shown = ", ".join(f"{name}={value!r}" for name, value in asked.items())
        return path_choice.PathChoice("", f"asked for ({shown})" if asked else f"{device.type}'s default")
    low = "int4" if "int4" in ckpt.stored.values() else "bfloat16"
    params = _model_args(ckpt, settings.max_seq_len, settings.max_batch_size)
    file = path_choice.choice_file(params, torch.get_num_threads(), low)
    choice = path_choice.read(file)
    if choice is None:  # the first time for this shape on this machine: measured, said once, kept
        choice = path_choice.measure(params, low)
        path_choice.write(file, choice)
        if parallel.is_main():
            print(f"llama_lite: {choice.path} is this machine's path: {choice.why}", file=sys.stderr)
    return choice


def attach_decode_step(model, compile, device, exact, child_settings: dict, path) -> "subprocess.Popen | None":
    """The compiled decode step where asked (compile=True: built now if need be) or, with compile None,
    where it is the measured path's (low precision on a CPU; float32 stays eager, bit for bit): loaded
    if built before, else built by another process for the next start while this one decodes eagerly
    with the same numbers (aot_step.EagerStep, also compile=False's on a low-precision CPU path)."""
    if parallel.world_size() > 1 or (not compile and exact):
        return None
    if device.type != "cpu":  # CUDA: compiled in this process, as CUDA graphs
        if compile:
            from .model.decode_step import DecodeStep  # imports the compiler: only when it is used

            model.decode_step = DecodeStep(model)
            model.decode_step.build()
        return None
    eager_twin = aot_step.EagerStep(model) if aot_step.has_eager_twin(model) else None
    if compile is False:  # the compiled step's numbers, eagerly: the text a compiled process gives
        model.decode_step = eager_twin
        return None
    threads = child_settings["threads"]
    folder = aot_build.artifact_folder(model, threads)
    try:
        model.decode_step = aot_step.load(model, folder)
    except Exception as e:  # built by another torch, or damaged: built again
        print(f"llama_lite: the compiled decode step in {folder} could not be loaded ({type(e).__name__}); "
              "building it again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    if model.decode_step is not None:
        return None
    check = path_choice.choice_file(model.params, threads, path.path) if path.measured and not path.verified else None
    cmd = precompile.command(child_settings, threads, check)
    if compile:  # asked for: wait for it
        precompile.run_now(cmd)
        model.decode_step = aot_step.load(model, folder)
        return None
    model.decode_step = eager_twin  # until it is built: the same numbers, eagerly
    child = precompile.start_in_background(cmd, folder)
    model.compiled_later = functools.partial(_load_quietly, model, folder, child, threads)
    if child is not None and parallel.is_main():
        print(f"llama_lite: compiling the decode step in another process (minutes, once; log {folder}.log); "
              "until it is built, decoding runs without it", file=sys.stderr)
    return child


def _threads_back(threads: int, window: list) -> bool:
    """Between requests: `threads` set again, True, once no niced work kept a core busy for a second
    (window[0], a CpuLoad: restarted where it did); False meanwhile."""
    if window[0].seconds() < 1.0:
        return False
    if default_threads(window[0], niced=True) < threads:
        window[0] = CpuLoad()
        return False
    torch.set_num_threads(threads)
    return True


def _load_quietly(model, folder, child, threads):
    """The step built into `folder`, once the process building it (`child`, if this one started it) has
    exited: while it tears down its compiler, a server's steps ran ~10x slower (a 64-token reply
    4.3 s instead of 0.3, on a 2-core EPYC), though it runs at the lowest priority. The cores it
    used go back to this process's threads."""
    if child is not None and child.poll() is None:
        return None
    try:
        step = aot_step.load(model, folder)
    except Exception:  # damaged: the next start says so, and builds it again
        step = None
    if child is not None or step is not None:
        torch.set_num_threads(threads)
    return step


def _generator(device, seed) -> torch.Generator:
    """The generator of requests without their own seed; every rank must sample the same tokens."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = parallel.broadcast(generator.seed())
    return generator.manual_seed(seed)
