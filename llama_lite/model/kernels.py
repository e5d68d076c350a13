"""Linear layers for decoding: the step that reads every weight once per generated token.

At one row of input a linear layer is a matrix-vector product, bound by memory bandwidth. MKL's
GEMV (what `F.linear` calls) streams float32 weights at ~12 GB/s on a 2-core test machine; the same
product written as multiply-and-sum and compiled by inductor streams them at ~30 GB/s. So inside a
compiled region (`Llama.build(compile=True)`, see Transformer.compile_decode) one-row inputs take
that path; several rows (prefill, batches) keep `F.linear`, whose GEMM reuses each weight across rows.

Eager float32 decoding of a few rows is memory-bound too, and there MKL's GEMM is slow the usual
way round: x @ W^T for 4 rows streams the weights at well under half the speed of W @ x^T, which
MKL runs as a thin product (measured on a 2-core AVX-512 CPU: 82 against 37 ms for SmolLM2's
weights, and a one-row GEMV takes 62 ms). `Linear.thin` takes that way for inputs of up to
THIN_ROWS rows; Transformer.use_thin_decode says when it may, without breaking batch invariance.

`Int8Linear` / `Int8Embedding` hold weight-only int8 weights, one scale per output row: a quarter of
float32's bytes to stream, and with the compiled product the int8-to-float cast is fused into the
same single pass over them. `Int8Head` holds the int4 path's output head that way too, but multiplies
it by each row's activations rounded to int8 too, in an integer product (integer_kernels.int8_mm).

`Int4Linear` holds 4-bit weights in groups of 32 with a scale and an offset per group, the layout of
GGUF's Q4_0 / Q4_1 blocks, multiplied by inputs rounded to 8 bits in a kernel of our own (integer_kernels.py):
an eighth of float32's bytes, read at close to the memory's speed at one row. Past a few rows that
kernel is bound by arithmetic, so a prompt chunk's products (`prompt_tiles`) go through the weights
dequantized to bfloat16 and a GEMM instead, where the CPU multiplies bfloat16 in hardware.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import integer_kernels


def matvec(x, weight):
    """x @ weight.T for a one-row x as multiply-and-sum; fast only inside torch.compile, which fuses
    it (and any int8-to-float cast of the weight) into one pass over the weights."""
    return (x[..., None, :] * weight.to(x.dtype)).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)


def _compiled_matvec(x, max_rows: int) -> bool:
    """Inside torch.compile with at most `max_rows` float32 input rows: take the multiply-and-sum path.
    (Half-precision products keep ATen's kernel, so that their compiled step computes what the eager
    one does: aot_step.EagerStep.)"""
    return torch.compiler.is_compiling() and x.dtype == torch.float32 and x.numel() <= max_rows * x.shape[-1]


THIN_ROWS = 8  # inputs of up to this many rows may take the thin product (W @ x^T)


def add_bias(out, bias):
    """out + bias, added after the product on every path, so each rounds the same way (Qwen2's q/k/v)."""
    return out if bias is None else out + bias


class Linear(nn.Linear):
    """nn.Linear (no bias unless asked), with the one-row path when compiled and the thin one when `thin`."""

    thin = False  # set by Transformer.use_thin_decode

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        pass  # weights are always assigned from a checkpoint; a random init would be thrown away

    def forward(self, x):
        if self.weight.dtype != x.dtype:  # bfloat16 weights under float32 activations (the int4 path's head):
            # one bfloat16 product whatever the rows, the same kernel eager and compiled
            return add_bias(F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype), self.bias)
        if _compiled_matvec(x, max_rows=1):
            out = matvec(x, self.weight)
        elif self.thin and x.shape[0] <= THIN_ROWS:
            out = (self.weight @ x.T).T.contiguous()  # (out, rows) -> (rows, out)
        else:
            out = F.linear(x, self.weight)
        return add_bias(out, self.bias)


_ROWS_AT_A_TIME = 4096  # int8 matrices are cast or quantized in slices of this many rows


def quantize_int8(weight: torch.Tensor):
    """Symmetric per-row int8: (int8 weight, float32 scale (rows, 1)) with weight ~= q * scale."""
    return quantize_int8_rows(weight.split(_ROWS_AT_A_TIME), weight.shape)


def quantize_int8_rows(blocks, shape):
    """quantize_int8 of a `shape` matrix given as consecutive blocks of its rows: a reader dequantizes a
    few rows at a time, so no float copy of the whole matrix is ever held (a 49152 x 576 head's would be
    113 MB, the largest allocation of a batch-1 run)."""
    q = scale = None
    start = 0
    for rows in blocks:
        rows = rows.float()
        if q is None:
            q = torch.empty(shape, dtype=torch.int8, device=rows.device)
            scale = torch.empty(shape[0], 1, device=rows.device)
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (rows, 1)
        q[start:start + len(rows)] = (rows / row_scale).round_().clamp_(-127, 127)
        scale[start:start + len(rows)] = row_scale
        start += len(rows)
    return q, scale


def quantize_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every linear layer and embedding for an int8 one (still empty, on the same device)."""
    for _, parent in list(model.named_modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, Linear):
                setattr(parent, child_name, Int8Linear(child.in_features, child.out_features, dtype=dtype,
                                                       bias=child.bias is not None))
            elif isinstance(child, torch.nn.Embedding):
                setattr(parent, child_name, Int8Embedding(child.num_embeddings, child.embedding_dim, dtype=dtype))


class Int8Rows(nn.Module):
    """A (rows, cols) int8 matrix `weight` with a float32 `scale` per row, (rows, 1) (quantize="int8").
    Values are q * scale, computed in float32."""

    def __init__(self, rows: int, cols: int, dtype=None):
        super().__init__()
        self.dtype = dtype  # the activations'
        self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(rows, 1, dtype=torch.float32))

    def values(self, weight, scale, dtype):
        """Rows of weight (..., cols) with their scales (..., 1), as `dtype` numbers."""
        return (weight.float() * scale).to(dtype)


class Int8Linear(Int8Rows):
    """A weight-only int8 linear layer: y = x @ (q * scale).T (+ bias, not quantized), in x's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype=None, bias: bool = False):
        super().__init__(out_features, in_features, dtype)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def forward(self, x):
        # Up to 8 rows: casting int8 inside the fused loop beats materialising float weights for a GEMM
        # (batch-8 decode 99 vs 60 tok/s here); float weights gain from the GEMM from 2 rows on.
        if _compiled_matvec(x, max_rows=8):
            return add_bias(matvec(x.float(), self.values(self.weight, self.scale, torch.float32)).to(x.dtype), self.bias)
        # A slice of rows at a time: a float copy of a 49k-row output matrix would add ~110 MB.
        parts = [F.linear(x, self.values(rows, scales, x.dtype))
                 for rows, scales in zip(self.weight.split(_ROWS_AT_A_TIME), self.scale.split(_ROWS_AT_A_TIME))]
        return add_bias(torch.cat(parts, dim=-1), self.bias)


class Int8Head(Int8Rows):
    """The int4 path's output head as int8 rows, multiplied by each input row rounded to int8 with a
    step of its own (largest |x| / 127), in an integer product (integer_kernels.int8_mm, the sums of
    PyTorch's `_int_mm`); the int32 sums are scaled back by both steps. The step reads the head for
    every token: int8 halves a bfloat16 copy's bytes, and the integer product reads it once for all
    rows, where the int8 weight-only kernel (bfloat16 inputs) reads it again for every few (SmolLM2's
    49152 x 576 from memory, 2-core AVX512-BF16 EPYC, `_int_mm`: 1.8 against 2.3 ms at one row, 2.7
    against 6.9 at 8). Integer sums are exact, so a row's logits do not depend
    on the other rows, the kernel or the compiler. Like llama.cpp's Q8_0 head, which also rounds the
    activations to 8 bits (there per 32 values)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(out_features, in_features)
        self.bias = None

    def forward(self, x):
        rows = x.reshape(-1, self.weight.shape[1]).float()
        step = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # each row's own int8 step
        q = (rows / step).round().clamp(-127, 127).to(torch.int8)
        out = integer_kernels.int8_mm(q, self.weight).float() * (step * self.scale.view(1, -1).float())
        return out.to(x.dtype).view(*x.shape[:-1], self.weight.shape[0])


def int8_head(model: nn.Module, tied: bool) -> None:
    """Swap the output head for an empty Int8Head; a tied model's embedding too, which shares its tensors
    (looked up as float32: q * scale)."""
    model.output = Int8Head(model.output.in_features, model.output.out_features)
    if tied:
        model.tok_embeddings = Int8Embedding(model.tok_embeddings.num_embeddings, model.tok_embeddings.embedding_dim,
                                             dtype=torch.float32)


class Int8Embedding(Int8Rows):
    """Token embeddings stored as int8 rows and their scales (shared with a tied Int8Head output)."""

    def forward(self, tokens):
        return self.values(self.weight[tokens], self.scale[tokens], self.dtype)  # (..., dim)


INT4_GROUP = 32  # weights per scale and offset: GGUF's Q4_0 / Q4_1 block


def quantize_int4(weight: torch.Tensor):
    """Asymmetric group-32 4-bit values, as GGUF's Q4_1 and torchao: (q (out, in) 0..15, scale, offset),
    weight ~= q * scale + offset with scale and offset per group (out, in // 32)."""
    groups = weight.float().unflatten(-1, (-1, INT4_GROUP))  # (out, in // 32, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return q.flatten(1), scale, low


# Products that read the same input, held as one int4 matrix when all their weights are 4-bit: one
# kernel call instead of three (or two) at each layer, ~20% of a one-token step here.
FUSED_INT4 = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def _module_path(parent: str, child: str) -> str:
    return f"{parent}.{child}".lstrip(".")


def int4_modules(model: nn.Module, dtype: torch.dtype, names) -> dict:
    """Swap the linear layers named in `names` (module paths) for empty Int4Linear ones, fusing the
    groups of FUSED_INT4. Returns {each swapped layer's path: (the Int4Linear's path, the paths of
    the layers it holds, in order)}, which tells the loader where each weight goes."""
    where = {}
    for parent_name, parent in list(model.named_modules()):
        path = functools.partial(_module_path, parent_name)
        for fused, parts in FUSED_INT4.items():
            if all(path(p) in names and isinstance(getattr(parent, p, None), Linear) for p in parts):
                layers = [getattr(parent, p) for p in parts]
                setattr(parent, fused, Int4Linear(layers[0].in_features, sum(x.out_features for x in layers), dtype=dtype,
                                                  bias=layers[0].bias is not None))
                for p in parts:
                    setattr(parent, p, None)
                    where[path(p)] = (path(fused), [path(q) for q in parts])
        for child_name, child in list(parent.named_children()):
            if path(child_name) in names and isinstance(child, Linear):
                setattr(parent, child_name, Int4Linear(child.in_features, child.out_features, dtype=dtype,
                                                       bias=child.bias is not None))
                where[path(child_name)] = (path(child_name), [path(child_name)])
    return where


PROMPT_TILE = 128  # a prompt chunk's products take exactly this many rows (padded): see `prompt_tiles`


@contextlib.contextmanager
def prompt_tiles(model: nn.Module):
    """`model`'s Int4Linear layers called inside take their (at most PROMPT_TILE) rows through the
    weights dequantized to bfloat16 and one GEMM of exactly PROMPT_TILE rows, where `tiles_pay`: a
    prompt chunk's products, faster per token than the int4 kernel, bound by arithmetic past a few rows
    (SmolLM2 on an AMX Xeon, 2 cores: ~35 ms to dequantize, bound by memory; the GEMMs ~37 / 44 / 58 ms
    at 64 / 128 / 256 rows). oneDNN's bfloat16 GEMM gives a row bits that
    depend on how many rows the call has (64, 100 and 2048 rows each round differently; and a GEMM per
    tile packs the weights again, so several tiles a call cost as much as as many calls), but at a
    fixed count not on where the row sits or what the other rows hold: so a token's numbers do not depend
    on how its prompt was cut (aot_build.alike_in_every_graph checks it where a step is built). They
    differ from the int4 kernel's, so a prompt's K/V are not what decoding would write; the prefix
    cache only reuses prefilled K/V anyway. (A flag on the layers, not a context variable: the
    compiler reads attributes, and a model steps in one thread.)"""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    for layer in layers:
        layer.in_prompt_tile = tiles_pay()
    try:
        yield
    finally:
        for layer in layers:
            layer.in_prompt_tile = False


@functools.cache
def tiles_pay() -> bool:
    """Whether prompt_tiles' products run here: the CPU multiplies bfloat16 tiles in hardware (AMX).
    Elsewhere the int4 kernel beats dequantizing the weights for a GEMM: Zen 4 (AVX512-BF16, 2 cores),
    a 576 x 576 layer at 128 rows 0.41 ms in the kernel against 0.29 to dequantize + 0.30 to multiply,
    and all SmolLM2's layers dequantized per call ~300 ms (a tiled 48-token chunk 427 ms, 107 eager)."""
    return torch.cpu._is_amx_tile_supported()


class Int4Linear(nn.Module):
    """A group-32 int4 linear layer (+ bias, not quantized) in integer_kernels's layout: `weight` the packed
    4-bit values, `scales` each group's scale and offset (float16, as GGUF stores them). Takes and gives
    any float dtype; the kernel computes in float32. Inside `prompt_tiles`, a GEMM on the weights
    dequantized to bfloat16 instead."""

    in_prompt_tile = False  # set by prompt_tiles where its products run here

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, bias: bool = False):
        super().__init__()
        if in_features % INT4_GROUP or out_features % integer_kernels.LANES:
            raise ValueError(f"int4 needs input widths in multiples of {INT4_GROUP} and output widths in multiples of "
                             f"{integer_kernels.LANES}, got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // INT4_GROUP
        self.register_buffer("weight", torch.empty(out_features // integer_kernels.LANES, groups, 256, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features // integer_kernels.LANES, groups, 2, integer_kernels.LANES,
                                                   dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if self.in_prompt_tile:
            n = rows.shape[0]
            torch._check(n <= PROMPT_TILE)
            tile = F.pad(rows.to(torch.bfloat16), (0, 0, 0, PROMPT_TILE - n))  # always PROMPT_TILE rows: see prompt_tiles
            out = torch.mm(tile, self.dequantized())[:n]
        else:
            out = integer_kernels.q4_mm(rows.float().contiguous(), self.weight, self.scales)
        return add_bias(out.to(x.dtype).view(*x.shape[:-1], self.out_features), self.bias)  # (..., out)

    def dequantized(self) -> torch.Tensor:
        """The weights (in, out), q * scale + offset in float32, rounded to bfloat16. Compiled, ~1 ms a
        SmolLM2 layer on 2 cores."""
        q, scale, offset = integer_kernels.unpack(self.weight, self.scales)
        weights = q.view(self.in_features // INT4_GROUP, INT4_GROUP, -1) * scale[:, None] + offset[:, None]
        return weights.to(torch.bfloat16).view(self.in_features, self.out_features)
