"""The compiled decode step built: exported with torch.export, compiled by AOTInductor, timed and
checked, in a process of its own (precompile.py) -- it imports the compiler, which a serving process
never does. What it builds is loaded by aot_step.py.

A graph per range of token counts (aot_step.token_ranges) and, where the step may take prompts, one
for a prompt chunk; the attention width is dynamic in whole key blocks. Building takes a minute or
two per graph; the artifact is keyed by everything its code depends on (`artifact_folder`).
"""

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_dir
from . import aot_step
from .aot_step import MATVEC_ROWS, AotStep, _constants, has_eager_twin, takes_prompt_chunks, token_ranges
from .kernels import PROMPT_TILE, tiles_pay
from .kv_cache import KEY_BLOCK, key_blocks

TIMING_ROUNDS = 8  # timed calls per token count (the best is kept)


def cpu_identity() -> str:
    """The CPU's model name and instruction-set flags: compiled code is only valid on the CPU kind it was made for."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    return f"{fields.get('model name', '').strip()} | {' '.join(sorted(fields.get('flags', '').split()))}"


def _code_fingerprint() -> str:
    """The model package's source: a change to the step's code makes a new artifact."""
    digest = hashlib.sha256()
    for path in sorted([*Path(__file__).parent.glob("*.py"), *Path(__file__).parent.glob("*.cpp")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def artifact_folder(model, threads: int) -> Path:
    """Where the step for this model's shapes, tensors, thread count, CPU, torch and code lives."""
    signature = {
        "torch": torch.__version__, "cpu": cpu_identity(), "threads": threads, "code": _code_fingerprint(),
        "params": {k: repr(v) for k, v in vars(model.params).items()},
        "tensors": [(name, tuple(t.shape), str(t.dtype)) for name, t in _constants(model).items()],
    }
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "compiled" / key


class _Exported(nn.Module):
    """The step as a module whose buffers are the model's tensors and its KV cache (written in place)."""

    def __init__(self, model, shape):
        super().__init__()
        low, _, self.one_row = shape
        self.model, self.tiled = model, self.one_row and low >= aot_step.TILED_CHUNK
        self.n_layers = len(model.cache.k)
        for i, (k, v) in enumerate(zip(model.cache.k, model.cache.v)):
            self.register_buffer(f"cache_k{i}", k, persistent=False)
            self.register_buffer(f"cache_v{i}", v, persistent=False)

    def forward(self, tokens, rows, positions, key_index, logits_at, slots=None, slot_positions=None):
        from .decode_step import _step

        cache_k = [getattr(self, f"cache_k{i}") for i in range(self.n_layers)]
        cache_v = [getattr(self, f"cache_v{i}") for i in range(self.n_layers)]
        return _step(self.model, tokens, rows, positions, key_index, cache_k, cache_v, logits_at, self.one_row, slots,
                     slot_positions, self.tiled)


def graph_shapes(model) -> list:
    """(fewest tokens, most, one_row) of each graph: token_ranges' decoding tokens, and where the step
    takes prompts (aot_step.takes_prompt_chunks) prompt chunks of one row, up to PROMPT_TILE tokens a
    call: where some are tiled (aot_step.tiled_chunks), a graph for those and one for shorter ones."""
    params = model.params
    prompts = []
    if takes_prompt_chunks(model):
        least = aot_step.tiled_chunks(model) or PROMPT_TILE + 1
        prompts = [(2, least - 1, True), (least, PROMPT_TILE, True)]
    most = min(PROMPT_TILE, params.max_seq_len)  # a chunk fits the cache
    prompts = [(low, min(high, most), True) for low, high, _ in prompts if low <= most]
    return [(low, high, False) for low, high in token_ranges(params.max_batch_size)] + prompts


def graph_name(shape) -> str:
    """A graph's name (its file's, less .pt2, and its dynamic dimensions' prefix) by its (fewest, most, one_row)."""
    low, high, one_row = shape
    return f"prompt_{low}_{high}" if one_row else f"tokens_{low}_{high}"


def build(model, folder: Path, threads: int, log=print, helper=None) -> float:
    """Export and compile the step's graphs for `model` into `folder` (made whole or not at all).
    Imports the compiler: run it in a process of its own. Returns the seconds it took.
    `helper(partial_folder, shapes)`, if given, starts a process that compiles those of graph_shapes
    into the folder too (a subprocess.Popen): the compiler's work is single-threaded Python (a minute
    or more a graph, its C++ compile ~10 s), so up to `threads` processes share the graphs."""
    started = time.perf_counter()
    sweep_dead_builds(folder)
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shapes = graph_shapes(model)
    ways = max(1, min(len(shapes), threads)) if helper is not None else 1
    helpers = [helper(partial, shapes[i::ways]) for i in range(1, ways)]
    try:
        compile_graphs(model, partial, shapes[::ways], threads, log)
        for child in helpers:
            if child.wait():
                raise RuntimeError(f"a process compiling some of the graphs failed (exit status {child.returncode})")
    finally:
        for child in helpers:
            if child.poll() is None:  # this one failed: theirs would be for nothing
                child.kill()
    seconds = time.perf_counter() - started
    graphs = [{"low": low, "high": high, "one_row": one_row, "file": graph_name((low, high, one_row)) + ".pt2"}
              for low, high, one_row in shapes]
    listing = {"graphs": graphs, "build_seconds": round(seconds, 1)}
    (partial / "graphs.json").write_text(json.dumps(listing))
    log("llama_lite: timing the compiled step by tokens a step")
    step = AotStep(model, partial)
    listing["step_ms"] = time_steps(step, model.params.max_seq_len)
    listing["takes_prompts"] = alike_in_every_graph(step, model.params.max_seq_len)
    (partial / "graphs.json").write_text(json.dumps(listing))
    try:
        os.replace(partial, folder)  # atomic: a reader sees the whole folder or none
    except OSError:  # another build finished first: keep its folder
        shutil.rmtree(partial, ignore_errors=True)
    return seconds


def sweep_dead_builds(folder: Path) -> None:
    """Remove what killed builds of `folder` left (FOLDER.PID.partial whose process is gone): a build
    cleans up after itself, but not after a kill -9 or a power cut."""
    for partial in folder.parent.glob(f"{folder.name}.*.partial"):
        try:
            os.kill(int(partial.name.split(".")[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, OSError):  # not a name of ours, or a live process we may not signal
            pass


def compile_graphs(model, folder: Path, shapes, threads: int, log=print) -> None:
    """Export and compile each of `shapes` (graph_shapes' (fewest, most, one_row)) into `folder`."""
    from torch._inductor import aoti_compile_and_package, config

    from .decode_step import aten_kernels_in_compiled_code

    config.cpp.threads = threads  # compiled loops are split across this many threads for good
    aten_kernels_in_compiled_code(has_eager_twin(model))
    tiles_pay()  # probed now, outside the trace (an export sees fake tensors)
    blocks = key_blocks(model.params.max_seq_len) // KEY_BLOCK
    width = torch.export.Dim("key_blocks", min=1, max=blocks) if blocks > 1 else None  # key_index is by block
    for low, high, one_row in shapes:
        n = min(low + 1, high)  # an example size of 1 would be taken as fixed
        tokens = torch.zeros(n, dtype=torch.long)  # n tokens of row 0, positions 0..n-1
        key_index = torch.arange(min(2, blocks) * KEY_BLOCK).view(-1, KEY_BLOCK)
        example = (tokens, tokens.clone(), torch.arange(n), key_index, torch.arange(min(2, n)))
        name = graph_name((low, high, one_row))
        count = torch.export.Dim(name, min=low, max=high) if low < high else None
        wanted = torch.export.Dim(f"logits_of_{name}", min=1, max=high) if low < high else None
        dims = ({0: count}, {0: count}, {0: count}, {0: width}, {0: wanted})
        if not one_row:  # the tokens are slots 0..n-1 of row 0, beside an empty row 1
            rows = model.params.max_batch_size
            grid = torch.zeros(min(2, rows), n, dtype=torch.long)
            grid[0] = torch.arange(n)
            example += (torch.arange(n), grid)
            grid_rows = torch.export.Dim(f"rows_of_{name}", min=1, max=rows) if rows > 1 else None
            grid_slots = torch.export.Dim(f"slots_of_{name}", min=1, max=high) if low < high else None
            dims += ({0: count}, {0: grid_rows, 1: grid_slots})
        log(f"llama_lite: compiling the {'prompt chunk' if one_row else 'decode'} step for {low}-{high} token(s) a call")
        with torch.inference_mode(False), torch.no_grad():
            exported = torch.export.export(_Exported(model, (low, high, one_row)), example, dynamic_shapes=dims, strict=False)
        # the code's fingerprint in the configs: inductor's own cache keys on them, not on the lowerings we change
        configs = {"aot_inductor.package_constants_in_so": False, "size_asserts": False,
                   "aot_inductor.metadata": {"llama_lite_code": _code_fingerprint()}}
        aoti_compile_and_package(exported, package_path=str(folder / f"{name}.pt2"), inductor_configs=configs)


@torch.inference_mode()
def time_steps(step: AotStep, max_seq_len: int) -> dict:
    """{tokens: best milliseconds} of the step for 1 to MATVEC_ROWS tokens, each a one-token segment of
    row 0 (as speculation feeds them) at positions ~64, the counts taken in turns so that a busy
    moment does not fall on one of them alone."""
    counts = [n for n in range(1, MATVEC_ROWS + 1) if 64 + n <= max_seq_len]
    best = dict.fromkeys(counts, float("inf"))
    for round_ in range(TIMING_ROUNDS + 1):
        for n in counts:
            tokens = torch.full((n,), 100, dtype=torch.long)
            segments = [(0, 64 + i, 1) for i in range(n)]
            started = time.perf_counter()
            step(tokens, segments, torch.arange(n))
            if round_:  # the first round allocates
                best[n] = min(best[n], 1000 * (time.perf_counter() - started))
    return {n: round(ms, 3) for n, ms in best.items()}


@torch.inference_mode()
def alike_in_every_graph(step: AotStep, max_seq_len: int) -> bool:
    """Whether decoding tokens' logits are bit for bit the same through every decoding graph, a prompt's
    short chunks (the int4 kernel's products) give decoding's, and its long ones (tiled, at least
    step.tiled_chunks tokens) the same however the prompt was cut: then a token's logits and K/V depend
    neither on how its prompt is cut (into chunks on one side of tiled_chunks) nor on what shares its
    step, and the step may take prompts. (The int4 kernel's rows and attention's products are alike
    however many rows they have, MKL's on an Intel CPU in its strict mode; MKL's AVX2 code without it
    differed at ~100 queries over 1,024 keys; kernels.prompt_tiles' GEMM at its fixed count.) Long
    enough for that where the cache is (a few seconds of a build). It rewrites row 0's K/V."""
    if isinstance(step, AotStep) and not any(one_row for _, _, one_row, _ in step.graphs):
        return False  # built without a prompt graph (graph_shapes)
    n = min(8 * KEY_BLOCK + 2 * MATVEC_ROWS + 4, max_seq_len)
    tokens = torch.arange(100, 100 + n)

    def fed(sizes, one_token: bool):
        pieces, first = [], 0
        for size in sizes:
            last = min(first + size, n)
            if first < last:
                segments = [(0, p, 1) for p in range(first, last)] if one_token else [(0, first, last - first)]
                pieces.append(step(tokens[first:last], segments, torch.arange(last - first)))
            first = last
        return torch.cat(pieces)

    decoded = fed((1, MATVEC_ROWS - 1, MATVEC_ROWS + 1, n), one_token=True)
    least = step.tiled_chunks or n + 1
    short = fed((2, MATVEC_ROWS + 1, least - 1), one_token=False)  # chunks the int4 kernel computes
    alike = torch.equal(decoded, fed((MATVEC_ROWS + 1, 2, n), one_token=True)) and torch.equal(short, decoded[: len(short)])
    if least <= n:
        alike = alike and torch.equal(fed((n,), one_token=False), fed((least, PROMPT_TILE + 3, n), one_token=False))
    return alike
