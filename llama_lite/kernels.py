"""Linear layers for decoding: the step that reads every weight once per generated token.

At one row of input a linear layer is a matrix-vector product, bound by memory bandwidth. MKL's
GEMV (what `F.linear` calls) streams float32 weights at ~12 GB/s on a 2-core test machine; the same
product written as multiply-and-sum and compiled by inductor streams them at ~30 GB/s. So inside a
compiled region (`Llama.build(compile=True)`, see Transformer.compile_decode) one-row inputs take
that path; several rows (prefill, batches) keep `F.linear`, whose GEMM reuses each weight across rows.

Eager float32 decoding of a few rows is memory-bound too, and there MKL's GEMM is slow the usual
way round: x @ W^T for 4 rows streams the weights at well under half the speed of W @ x^T, which
MKL runs as a thin product (measured on a 2-core AVX-512 CPU: 82 against 37 ms for SmolLM2's
weights, and a one-row GEMV takes 62 ms). `Linear.skinny` takes that way for inputs of up to
SKINNY_ROWS rows; Transformer.use_skinny_decode says when it may, without breaking batch invariance.

`Int8Linear` / `Int8Embedding` hold weight-only int8 weights, one scale per output row: a quarter of
float32's bytes to stream, and with the compiled product the int8-to-float cast is fused into the
same single pass over them.
"""

import torch
import torch.nn.functional as F
from torch import nn


def matvec(x, weight, scale=None):
    """x @ weight.T (* scale) for a one-row x as multiply-and-sum; fast only inside torch.compile,
    which fuses it (and an int8-to-float cast) into one pass over the weights."""
    out = (x[..., None, :] * weight.to(x.dtype)).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
    return out if scale is None else out * scale


def _compiled_matvec(x, max_rows: int) -> bool:
    """Inside torch.compile with at most `max_rows` input rows: take the multiply-and-sum path."""
    return torch.compiler.is_compiling() and x.numel() <= max_rows * x.shape[-1]


SKINNY_ROWS = 8  # inputs of up to this many rows may take the thin product (W @ x^T)


def add_bias(out, bias):
    """out + bias, added after the product on every path, so each rounds the same way (Qwen2's q/k/v)."""
    return out if bias is None else out + bias


class Linear(nn.Linear):
    """nn.Linear (no bias unless asked), with the one-row path when compiled and the thin one when `skinny`."""

    skinny = False  # set by Transformer.use_skinny_decode

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        pass  # weights are always assigned from a checkpoint; a random init would be thrown away

    def forward(self, x):
        if _compiled_matvec(x, max_rows=1):
            out = matvec(x, self.weight)
        elif self.skinny and x.shape[0] <= SKINNY_ROWS:
            out = (self.weight @ x.T).T.contiguous()  # (out, rows) -> (rows, out)
        else:
            out = F.linear(x, self.weight)
        return add_bias(out, self.bias)


_ROWS_AT_A_TIME = 4096  # int8 matrices are cast or quantized in slices of this many rows


def quantize_int8(weight: torch.Tensor):
    """Symmetric per-row int8: (int8 weight, float32 scale per row) with weight ~= q * scale."""
    q, scales = [], []
    for rows in weight.split(_ROWS_AT_A_TIME):  # a float temporary of a few MB, not of the whole matrix
        rows = rows.float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127  # (rows,)
        q.append((rows / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8))  # (rows, in)
        scales.append(scale)
    return torch.cat(q), torch.cat(scales)


def quantize_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every linear layer and the embedding for int8 ones (still empty, on the same device)."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, Linear):
                setattr(parent, child_name, Int8Linear(child.in_features, child.out_features, dtype=dtype,
                                                       bias=child.bias is not None))
            elif isinstance(child, torch.nn.Embedding):
                setattr(parent, child_name, Int8Embedding(child.num_embeddings, child.embedding_dim, dtype=dtype))


class Int8Rows(nn.Module):
    """A (rows, cols) int8 matrix `weight` and one `scale` per row (in the activations' dtype)."""

    def __init__(self, rows: int, cols: int, dtype=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(rows, dtype=dtype))


class Int8Linear(Int8Rows):
    """A weight-only int8 linear layer: y = (x @ q.T) * scale (+ bias, not quantized), computed in x's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype=None, bias: bool = False):
        super().__init__(out_features, in_features, dtype)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def forward(self, x):
        # Up to 8 rows: casting int8 inside the fused loop beats materialising float weights for a GEMM
        # (batch-8 decode 99 vs 60 tok/s here); float weights gain from the GEMM from 2 rows on.
        if _compiled_matvec(x, max_rows=8):
            return add_bias(matvec(x, self.weight, self.scale), self.bias)
        # Cast a slice of rows at a time: a float copy of a 49k-row output matrix would add ~110 MB.
        parts = [F.linear(x, rows.to(x.dtype)) for rows in self.weight.split(_ROWS_AT_A_TIME)]
        return add_bias(torch.cat(parts, dim=-1) * self.scale, self.bias)


class Int8Embedding(Int8Rows):
    """Token embeddings stored as int8 rows and their scales (shared with a tied Int8Linear output)."""

    def forward(self, tokens):
        return self.weight[tokens].to(self.scale.dtype) * self.scale[tokens, None]  # (..., dim)
