"""The default path, chosen by measuring this machine: low-precision weights, compiled, or float32 eager.

Which is faster depends on the CPU far more than on the model: 4-bit weights with bfloat16
activations won 5x on an AVX512-BF16 EPYC and lost 2x on an AVX2-only one (docs/performance.md).
So on first use for a model shape, `measure` times one step's layer products both ways (a second
or so, nothing compiled) and keeps the answer under ~/.cache/llama_lite/paths, keyed by the CPU's
model and flags, torch, the threads and the shape. The compile process (precompile.py) then times
the whole compiled step against float32's and corrects the choice where the products misled.
"""

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import cache_dir
from .model import integer_kernels
from .model.aot_build import cpu_identity
from .model.kernels import quantize_int4

LOW = ("int4", "bfloat16")  # the low-precision candidate: int4 where the checkpoint holds 4-bit blocks
SAMPLE_BYTES = 64 << 20  # float32 weights timed at once: beyond any cache, as a real step reads them
ROWS = (1, 8)  # a step of one sequence, and of a batch


@dataclass
class PathChoice:
    path: str  # "int4", "bfloat16" or "float32"
    why: str  # one line for /health, bench.py and stderr
    figures: dict = field(default_factory=dict)  # milliseconds a step, by what was timed
    verified: bool = False  # the whole compiled step was timed against float32's (precompile.py)

    @property
    def measured(self) -> bool:
        """Chosen by measuring (not asked for: a dtype, quantize, a GPU, torchrun)."""
        return bool(self.figures)


def choice_file(params, threads: int, low: str) -> Path:
    shape = {k: getattr(params, k) for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    key = json.dumps({"cpu": cpu_identity(), "torch": torch.__version__, "threads": threads, "low": low, **shape,
                      "int4 kernel": "integer_kernels"},  # choices timed with PyTorch's int4 kernel are measured again
                     sort_keys=True)
    return cache_dir() / "paths" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def read(path: Path) -> "PathChoice | None":
    try:
        return PathChoice(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: measure again
        return None


def write(path: Path, choice: PathChoice) -> None:
    """Written whole or not at all; a cache that cannot be written only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(asdict(choice), indent=1))
        os.replace(partial, path)
    except OSError:
        pass


def measure(params, low: str) -> PathChoice:
    """Time a step's layer products, low-precision against float32, at 1 and 8 rows; low wins where
    it is faster at both."""
    figures = {}
    for kind in (low, "float32"):
        for rows in ROWS:
            figures[f"{kind} products, {rows} row(s)"] = round(_products_ms(params, kind, rows), 2)
    faster = all(figures[f"{low} products, {r} row(s)"] < figures[f"float32 products, {r} row(s)"] for r in ROWS)
    shown = ", ".join(f"{figures[f'{low} products, {r} row(s)']} against {figures[f'float32 products, {r} row(s)']} ms "
                      f"at {r} row(s)" for r in ROWS)
    why = f"its layer products {'beat' if faster else 'lost to'} float32's here ({shown})"
    return PathChoice(low if faster else "float32", why, figures)


def _layer_shapes(params) -> list:
    """(out, in) of one layer's products as the step runs them (q/k/v and gate/up fused)."""
    head_dim = params.dim // params.n_heads
    return [((params.n_heads + 2 * params.n_kv_heads) * head_dim, params.dim), (params.dim, params.n_heads * head_dim),
            (2 * params.hidden_dim, params.dim), (params.dim, params.hidden_dim)]


@torch.inference_mode()
def _products_ms(params, kind: str, rows: int) -> float:
    """Milliseconds for every layer's products at `rows` input rows, from a sample of layers that
    does not fit any cache (random weights: the time does not depend on the values)."""
    shapes = _layer_shapes(params)
    layer_bytes = 4 * sum(o * i for o, i in shapes)
    sample = max(1, min(params.n_layers, SAMPLE_BYTES // layer_bytes))
    products = []
    for _ in range(sample):
        for out_features, in_features in shapes:
            weight = torch.randn(out_features, in_features)
            x = torch.randn(rows, in_features)
            if kind == "int4":
                packed, scales = integer_kernels.pack(*quantize_int4(weight))
                products.append(lambda x=x, p=packed, s=scales: integer_kernels.q4_mm(x, p, s))
            else:  # the eager step's product for these rows: the thin one (kernels.Linear) in float32
                dtype = torch.float32 if kind == "float32" else torch.bfloat16
                products.append(lambda x=x.to(dtype), w=weight.to(dtype): w @ x.T)
    for product in products:  # once for nothing: first calls allocate
        product()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for product in products:
            product()
        best = min(best, time.perf_counter() - started)
    return 1000 * best * params.n_layers / sample
