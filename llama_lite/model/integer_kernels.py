"""The int4 path's products in kernels of our own: 4-bit weights times inputs rounded to 8 bits (the
layers), and int8 rows times int8 rows (the output head).

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) turns every weight into a float before it
multiplies, so at one row it is bound by arithmetic, not memory: ~12 GB/s of 4-bit weights on a
2-core Zen 4, where the memory gives ~30. Like llama.cpp, integer_kernels.cpp rounds each input row to
int8 per group of 32 and multiplies integers (AVX512-VNNI's dot product of 4 byte pairs, AVX2's
maddubs), one float step per group: a SmolLM2 step's layer products at one row 2.5 against 4.1 ms,
at 8 rows 8.5 against 11.7 (that Zen 4). The head's integer product (`int8_mm`) is what
`torch._int_mm(x, w.t())` computes, the same int32 sums, read at the memory's speed at one row (from
6 rows on it is `_int_mm`, faster there: 3.9 against 4.5 ms at 8 rows, 8 against 37 at 64).

The source is compiled on first use on each machine (`g++ -O3 -march=native`, ~7 s) into
~/.cache/llama_lite/kernels, keyed by the source, torch and the CPU, and loaded as the operator
`torch.ops.llama_lite.q4_mm` and `.int8_mm`, which compiled steps call too. Where it cannot be
built (no compiler), the same sums come from PyTorch's own operators, slowly.
"""

import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from ..cache import cache_dir

GROUP = 32  # inputs per scale and offset: GGUF's Q4_0 / Q4_1 block
LANES = 16  # output rows in a block of the packed layout
SOURCE = Path(__file__).with_name("integer_kernels.cpp")
_loaded = False  # torch.ops.llama_lite's kernels are registered in this process (`native`)


def pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """(packed (out / 16, in / 32, 256) uint8, scales (out / 16, in / 32, 2, 16) float16) from 4-bit
    values q (out, in) in 0..15 and a scale and offset per group (out, in / 32): the layout
    integer_kernels.cpp reads (weight = q * scale + offset, each group's 16 rows' weights 8j + b and
    8j + 4 + b in one byte)."""
    out_features, in_features = q.shape
    if out_features % LANES or in_features % GROUP:
        raise ValueError(f"int4 weights need rows in multiples of {LANES} and columns in multiples of {GROUP}, "
                         f"got {out_features} x {in_features}")
    v = q.to(torch.uint8).view(out_features // LANES, LANES, in_features // GROUP, 4, 2, 4)  # (block, lane, group, j, half, b)
    packed = (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(out_features // LANES, -1, 256)
    scales = torch.stack((scale, offset)).to(torch.float16).view(2, out_features // LANES, LANES, -1).permute(1, 3, 0, 2)
    return packed.contiguous(), scales.contiguous()


def unpack(packed: torch.Tensor, scales: torch.Tensor):
    """(q (in, out) float32, scale (in / 32, out), offset (in / 32, out)): `pack`'s values back, laid
    out for a GEMM of input rows by the weights (kernels.prompt_tiles)."""
    blocks, groups, _ = packed.shape
    v = packed.view(blocks, groups, 4, LANES, 4)  # (block, group, j, lane, b)
    q = torch.stack((v & 15, v >> 4), dim=3)  # (block, group, j, half, lane, b)
    q = q.permute(1, 2, 3, 5, 0, 4).reshape(groups * GROUP, blocks * LANES).float()
    scale, offset = scales.float().permute(2, 1, 0, 3).reshape(2, groups, blocks * LANES)
    return q, scale, offset


def q4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, in) float32 times the packed weights: (rows, out) float32."""
    if _ready() and x.device.type == "cpu":
        return torch.ops.llama_lite.q4_mm(x, packed, scales)
    return _q4_mm_in_torch(x, packed, scales)


def int8_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (rows, in) int8 in -127..127 times w (out, in) int8, transposed: (rows, out) int32, exact."""
    if _ready() and x.device.type == "cpu":
        return torch.ops.llama_lite.int8_mm(x, w)
    return torch._int_mm(x, w.t())


def _ready() -> bool:
    """The kernels are loaded (built now if this is their first use outside a trace: a compiler tracing
    the model reads the flag and calls nothing, the model's loading having loaded them)."""
    return _loaded or (not torch.compiler.is_compiling() and native())


def _q4_mm_in_torch(x, packed, scales):
    """The kernel's arithmetic in PyTorch's operators: the same integer sums (exact in float32: at most
    32 * 15 * 127), the float terms summed in another order (~1e-6 apart). That is x rounded to int8
    per group of 32, times the weights."""
    rows, groups = x.shape[0], packed.shape[1]
    parts = x.view(rows, groups, GROUP)
    amax = parts.abs().amax(-1, keepdim=True)
    xq = torch.round(parts * torch.where(amax > 0, 127 / amax, 0))  # (rows, groups, 32)
    q, scale, offset = unpack(packed, scales)
    dots = torch.einsum("rgi,gio->rgo", xq, q.view(groups, GROUP, -1))  # (rows, groups, out)
    step = amax / 127
    return (dots * (scale * step) + offset * (xq.sum(-1, keepdim=True) * step)).sum(1)


@functools.cache
def native() -> bool:
    """Whether torch.ops.llama_lite's kernels are loaded (built now where it was not yet). Called as a model
    with int4 layers loads: before anything is traced, and before a compiled step that calls it."""
    try:
        torch.ops.load_library(str(_built()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"llama_lite: the integer kernels could not be built ({str(e).strip().splitlines()[-1][:200]}); "
              "computing their products with PyTorch's operators, slowly", file=sys.stderr)
        return False
    torch.library.register_fake("llama_lite::q4_mm")(_fake_q4_mm)
    torch.library.register_fake("llama_lite::int8_mm")(_fake_int8_mm)
    global _loaded
    _loaded = True
    return True


def _fake_q4_mm(x, packed, scales):
    return x.new_empty(x.shape[0], packed.shape[0] * LANES)


def _fake_int8_mm(x, w):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.int32)


def _built(march: str = "native", namespace: str = "llama_lite") -> Path:
    """The kernels' shared library for this source, torch and CPU, compiled once (written whole or not
    at all). Tests build it for other instruction sets (`march`) under another operator `namespace`."""
    from .aot_build import cpu_identity

    key = hashlib.sha256(f"{SOURCE.read_text()}{torch.__version__}{cpu_identity()}{march}{namespace}".encode()).hexdigest()[:20]
    library = cache_dir() / "kernels" / f"integer_kernels-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
    torch_dir = Path(torch.__file__).parent
    command = [os.environ.get("CXX", "g++"), "-O3", f"-march={march}", f"-DNAMESPACE={namespace}", "-ffp-contract=off",
               "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-w",
               f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
               f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(partial),
               f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    print("llama_lite: building the int4 and int8 kernels for this CPU (once, ~10 s)", file=sys.stderr, flush=True)
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        os.replace(partial, library)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(e.stderr or str(e)) from None
    finally:
        partial.unlink(missing_ok=True)
    return library
