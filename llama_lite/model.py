"""The Llama transformer: tokens and their positions in, logits out. No I/O.

Meta's weight names and layout (interleaved RoPE pairs), grouped-query attention, SwiGLU and a
KV cache preallocated as buffers of a fixed shape, so a decode step never allocates a growing cache.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # SwiGLU width (feed_forward_length); Meta derives it from multiple_of
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # KV-cache length
    max_batch_size: int = 8  # KV-cache rows

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos and sin of every (position, frequency) pair: two float32 (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its position's angle.

    This is Meta's (and GGUF's) interleaved convention; Hugging Face checkpoints store Q/K rows
    permuted for a rotate-half layout instead, which a loader must undo.
    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (bsz or 1, seqlen, 1, head_dim // 2).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (bsz, seqlen, n_heads, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = parallel.world_size()  # under torchrun each rank holds n_heads / world of the heads
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // world, args.n_kv_heads // world, args.head_dim
        self.wq = parallel.column_linear(args.dim, args.n_heads * self.head_dim)
        self.wk = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = parallel.row_linear(args.n_heads * self.head_dim, args.dim)

    def project(self, x, cos, sin):
        """Queries, keys and values of x (bsz, seqlen, dim), rotated to their positions."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, rows, positions, mask):
        """Store k, v in the cache and attend; (bsz, seqlen, n_heads * head_dim) of this rank, before wo.
        rows: the cache rows, a slice; positions: (bsz or 1, seqlen) or, when every row writes the
        same positions, a slice; mask: (bsz or 1, 1, n_rep * seqlen, end) or None (see Transformer)."""
        bsz, seqlen = q.shape[:2]
        # The cache is (max_batch_size, n_kv_heads, max_seq_len, head_dim): written in place by
        # position, read back as every position up to the furthest one written (a view, no copy).
        cache_k, cache_v = self.cache_k[rows], self.cache_v[rows]
        if isinstance(positions, slice):
            cache_k[:, :, positions] = k.transpose(1, 2)
            cache_v[:, :, positions] = v.transpose(1, 2)
            end = positions.stop
        else:  # each row at its own positions: index (bsz, 1) x (bsz, seqlen) -> (bsz, seqlen, n_kv_heads, head_dim)
            row_index = torch.arange(bsz, device=q.device)[:, None]
            cache_k[row_index, :, positions] = k
            cache_v[row_index, :, positions] = v
            end = mask.shape[-1]
        keys, values = cache_k[:, :, :end], cache_v[:, :, :end]  # (bsz, n_kv_heads, end, head_dim)

        # Grouped-query attention without copying K/V: the n_rep query heads that share a kv head
        # (query head h reads kv head h // n_rep) become n_rep * seqlen query rows against it.
        n_rep = self.n_heads // self.n_kv_heads
        q = q.transpose(1, 2).reshape(bsz, self.n_kv_heads, n_rep * seqlen, self.head_dim)  # rows ordered (rep, pos)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (bsz, n_kv_heads, n_rep * seqlen, head_dim)
        out = out.view(bsz, self.n_heads, seqlen, self.head_dim).transpose(1, 2)  # (bsz, seqlen, n_heads, head_dim)
        return out.reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_linear(dim, hidden_dim)
        self.w2 = parallel.row_linear(hidden_dim, dim)
        self.w3 = parallel.column_linear(dim, hidden_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

        self.compiled = None  # (project, finish) compiled for one-position steps; see Transformer.compile_decode

    def project(self, x, cos, sin):
        return self.attention.project(self.attention_norm(x), cos, sin)

    def finish(self, x, attended):
        h = x + self.attention.wo(attended)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x, rows, positions, cos, sin, mask):
        # The cache update and attention stay eager: their shapes grow with the sequence.
        project, finish = self.compiled if self.compiled and x.shape[1] == 1 else (self.project, self.finish)
        q, k, v = project(x, cos, sin)
        return finish(x, self.attention.attend(q, k, v, rows, positions, mask))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.dim % params.n_heads or params.n_heads % params.n_kv_heads:
            raise ValueError(
                f"n_heads={params.n_heads} must divide dim={params.dim} and be a multiple of "
                f"n_kv_heads={params.n_kv_heads}"
            )
        self.params = params
        self.tok_embeddings = parallel.embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = parallel.column_linear(params.dim, params.vocab_size, gather_output=True)
        self.compiled_head = None
        self.setup_cache()

    def setup_cache(self):
        """(Re)allocate the KV cache and RoPE tables on the weights' device, in their dtype.

        Called by __init__, and again after weights built on the meta device were loaded with
        `assign=True`, since buffers made on the meta device hold no memory.
        """
        p = self.params
        weight = self.norm.weight  # in the activations' dtype, even when the matrices are int8
        # Computed on the CPU and moved: arithmetic on the meta device would import torch._dynamo (0.6 s).
        cos, sin = rope_tables(p.head_dim, p.max_seq_len, p.rope_theta, device="cpu")
        self.register_buffer("rope_cos", cos.to(weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device), persistent=False)
        shape = (p.max_batch_size, p.n_kv_heads // parallel.world_size(), p.max_seq_len, p.head_dim)
        for layer in self.layers:
            for name in ("cache_k", "cache_v"):
                cache = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
                layer.attention.register_buffer(name, cache, persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos, last_only: bool = False, first_row: int = 0) -> torch.Tensor:
        """Logits (float32, (bsz, seqlen, vocab_size)) for `tokens` at positions start_pos onward.

        Writes K/V for those positions into cache rows first_row..first_row+bsz-1. `start_pos` is an
        int, or a LongTensor (bsz,) giving each row its own start (continuous batching: rows at
        different points of different sequences decode together). `last_only` computes the output
        projection for the last position alone (bsz, 1, vocab_size): a long prompt's full logits
        would cost seqlen x vocab floats that generation never reads.
        """
        bsz, seqlen = tokens.shape
        p = self.params
        per_row = isinstance(start_pos, torch.Tensor)
        furthest = int(start_pos.max()) if per_row else start_pos  # a host sync only for per-row positions
        if first_row + bsz > p.max_batch_size or furthest + seqlen > p.max_seq_len or first_row < 0:
            raise ValueError(
                f"{bsz} rows from row {first_row} at positions up to {furthest + seqlen - 1} do not fit the KV "
                f"cache ({p.max_batch_size} rows x {p.max_seq_len} positions); "
                "build with a larger max_batch_size or max_seq_len"
            )
        end = furthest + seqlen
        offsets = torch.arange(seqlen, device=tokens.device)
        query_pos = (start_pos[:, None] if per_row else torch.tensor([[start_pos]], device=tokens.device)) + offsets  # (bsz or 1, seqlen)
        cos = self.rope_cos[query_pos][:, :, None]  # (bsz or 1, seqlen, 1, head_dim // 2)
        sin = self.rope_sin[query_pos][:, :, None]
        mask = None
        if per_row or seqlen > 1:
            # Query at position q sees keys 0..q; rows of the attention's queries come as (rep, pos).
            n_rep = p.n_heads // p.n_kv_heads
            key_pos = torch.arange(end, device=tokens.device)
            mask = key_pos <= query_pos[..., None]  # (bsz or 1, seqlen, end)
            mask = mask[:, None].repeat(1, 1, n_rep, 1)  # (bsz or 1, 1, n_rep * seqlen, end)
        positions = query_pos if per_row else slice(start_pos, end)
        rows = slice(first_row, first_row + bsz)
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            h = layer(h, rows, positions, cos, sin, mask)
        if last_only:
            h = h[:, -1:]
        return (self.compiled_head if self.compiled_head and seqlen == 1 else self.head)(h)

    def head(self, h):
        return self.output(self.norm(h)).float()

    def compile_decode(self):
        """Compile the one-position step (decoding) around attention: per layer, norm + q/k/v + RoPE,
        and wo + residual + feed-forward; then the output head. Fuses the small ops and turns each
        one-row matrix product into a single pass over its weights (kernels.py). Compiled once for
        all layers (they share code and shapes), again for each new batch size."""
        for layer in self.layers:
            layer.compiled = (torch.compile(layer.project, dynamic=False), torch.compile(layer.finish, dynamic=False))
        self.compiled_head = torch.compile(self.head, dynamic=False)
