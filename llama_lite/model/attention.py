"""Attention over the KV cache, and `Batch`: where the tokens of one forward call go.

Written for batch invariance (float32, eager: a token's logits do not depend on what else shares its
call): every product gets whole ROW_BLOCKs of rows, attention is written out rather than
`scaled_dot_product_attention`, and values are summed KEY_BLOCK keys at a time over whole blocks.
Why each holds it: docs/design/batch-invariance.md.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .kv_cache import KEY_BLOCK, key_blocks
from .rope import apply_rope

if TYPE_CHECKING:
    from .transformer import ModelArgs

ROW_BLOCK = 4  # every matrix product gets a multiple of this many rows (see the module docstring)


def attention(q, keys, values, visible):
    """softmax(q k^T) v over the visible keys; q already scaled by 1/sqrt(head_dim).
    q: (b, n_kv_heads, rows, head_dim); keys, values: (b, n_kv_heads, width, head_dim), width a
    multiple of KEY_BLOCK; visible: bool, broadcastable to (b, n_kv_heads, rows, width).
    Returns (b, n_kv_heads, rows, head_dim)."""
    if q.dtype != torch.float32:
        # Half precision promises no bit-for-bit batch invariance, and there the fused kernel is
        # faster (it reads the cache views as they are; oneDNN's bmm copies each block of values).
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=1.0)
    scores = torch.matmul(q, keys.transpose(-1, -2))  # (b, n_kv_heads, rows, width)
    probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)
    out = None
    for start in range(0, keys.shape[-2], KEY_BLOCK):  # block by block, always in this order
        part = torch.matmul(probs[..., start : start + KEY_BLOCK], values[..., start : start + KEY_BLOCK, :])
        out = part if out is None else out + part
    return out


def whole_blocks(n: int) -> int:
    """n rounded up to a multiple of ROW_BLOCK."""
    return -(-n // ROW_BLOCK) * ROW_BLOCK


def pad_rows(x: torch.Tensor, value=0) -> torch.Tensor:
    """x with rows of `value` added along dim -2 up to a multiple of ROW_BLOCK."""
    return F.pad(x, (0, 0, 0, whole_blocks(x.shape[-2]) - x.shape[-2]), value=value)


@dataclass
class Batch:
    """Where the tokens of one forward call go, built from its segments on the host (no device reads).

    A segment (row, start, length) is `length` consecutive tokens of the sequence in cache row `row`,
    at positions start.. . Tokens come segment after segment. Segments of one token (decoding) attend
    together over the cache rows 0..n_decode_rows-1; longer ones (prompts) attend one at a time.
    A row may have several one-token segments (speculative decoding verifies its guesses so): each
    takes a query slot of its row, so every one is computed as it would be decoding alone.
    """

    positions: torch.Tensor  # (tokens,)
    write_rows: torch.Tensor  # (tokens,): each token's cache row
    decode_tokens: torch.Tensor  # (d,): which tokens are one-token segments
    decode_row: torch.Tensor  # (d,): their rows, so row decode_row[i] ..
    decode_slot: torch.Tensor  # (d,): .. slot decode_slot[i] holds token decode_tokens[i]
    n_decode_rows: int  # the decode group spans cache rows 0..n_decode_rows-1
    decode_visible: torch.Tensor  # (n_decode_rows, 1, slots, 1, width): key p is visible to the slot's query
    prompts: list  # (first token, length, row, width, visible (length, width)) per longer segment
    chunk: "int | None" = None  # token-wise work (the linear layers) in pieces of at most this many rows

    @staticmethod
    def build(segments, device) -> "Batch":
        positions, rows, decode_tokens, decode_row, decode_slot, decode_pos, prompts = [], [], [], [], [], [], []
        slots = {}  # row -> its one-token segments so far
        for row, start, length in segments:
            if length == 1:
                decode_tokens.append(len(positions))
                decode_row.append(row)
                decode_slot.append(slots.get(row, 0))
                slots[row] = decode_slot[-1] + 1
                decode_pos.append(start)
            else:
                width = key_blocks(start + length)
                query_pos = torch.arange(start, start + length, device=device)
                visible = torch.arange(width, device=device)[None, :] <= query_pos[:, None]  # (length, width)
                prompts.append((len(positions), length, row, width, visible))
            positions.extend(range(start, start + length))
            rows.extend([row] * length)
        n_decode_rows = max(decode_row, default=-1) + 1
        width = key_blocks(max(decode_pos, default=0) + 1)
        # slots outside the group see key 0 only (their output is ignored)
        slot_pos = torch.zeros(n_decode_rows, max(slots.values(), default=1), dtype=torch.long)  # (n_decode_rows, slots)
        for row, slot, pos in zip(decode_row, decode_slot, decode_pos):
            slot_pos[row, slot] = pos
        slot_pos = slot_pos.to(device)
        visible = torch.arange(width, device=device) <= slot_pos[:, :, None]  # (n_decode_rows, slots, width)
        return Batch(
            positions=torch.tensor(positions, device=device),
            write_rows=torch.tensor(rows, device=device),
            decode_tokens=torch.tensor(decode_tokens, device=device, dtype=torch.long),
            decode_row=torch.tensor(decode_row, device=device, dtype=torch.long),
            decode_slot=torch.tensor(decode_slot, device=device, dtype=torch.long),
            n_decode_rows=n_decode_rows,
            decode_visible=visible[:, None, :, None, :],
            prompts=prompts,
        )


class Attention(nn.Module):
    def __init__(self, args: "ModelArgs"):
        super().__init__()
        world = parallel.world_size()  # under torchrun each rank holds n_heads / world of the heads
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // world, args.n_kv_heads // world, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads  # query heads per kv head
        self.wq = parallel.column_linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = parallel.row_linear(args.n_heads * self.head_dim, args.dim)
        self.wqkv = None  # wq, wk and wv as one int4 matrix (kernels.int4_modules), when they are

    def project(self, x, cos, sin):
        """Queries (scaled by 1/sqrt(head_dim)), keys and values of x (tokens, dim), rotated to their positions."""
        n = x.shape[0]
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv_heads, self.head_dim)
        v = v.view(n, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin) * self.head_dim**-0.5, apply_rope(k, cos, sin), v

    def attend(self, q, k, v, batch: Batch, cache_k, cache_v):
        """Store k, v in the cache and attend: (tokens, n_heads * head_dim) of this rank, before wo.
        q: (tokens, n_heads, head_dim); k, v: (tokens, n_kv_heads, head_dim) (padding tokens past the
        batch's own are not stored); cache_k, cache_v: (rows, n_kv_heads, positions, head_dim)."""
        n_real = batch.positions.shape[0]
        # index (tokens,) x (tokens,) picks (tokens, n_kv_heads, head_dim) places
        cache_k[batch.write_rows, :, batch.positions] = k[:n_real]
        cache_v[batch.write_rows, :, batch.positions] = v[:n_real]
        out = q.new_zeros(q.shape[0], self.n_kv_heads, self.n_rep, self.head_dim)
        # Grouped-query attention without copying K/V: the n_rep query heads that share a kv head
        # (query head h reads kv head h // n_rep) are n_rep query rows against it.
        q = q.view(-1, self.n_kv_heads, self.n_rep, self.head_dim)  # (tokens, n_kv_heads, n_rep, head_dim)
        if batch.n_decode_rows:
            # Each row's slots are query rows of whole blocks, so the products always get multiples of
            # ROW_BLOCK rows: a slot is computed as a one-token decode of its row would be.
            rows, slots, width = batch.n_decode_rows, batch.decode_visible.shape[2], batch.decode_visible.shape[-1]
            per_slot = whole_blocks(self.n_rep)
            q_rows = q.new_zeros(rows, self.n_kv_heads, slots, per_slot, self.head_dim)
            # (d, n_kv_heads, n_rep, head_dim) placed
            q_rows[batch.decode_row, :, batch.decode_slot, : self.n_rep] = q[batch.decode_tokens]
            visible = batch.decode_visible.expand(-1, -1, -1, per_slot, -1).flatten(2, 3)  # (rows, 1, slots * per_slot, width)
            attended = attention(q_rows.flatten(2, 3), cache_k[:rows, :, :width], cache_v[:rows, :, :width], visible)
            attended = attended.unflatten(2, (slots, per_slot))  # (rows, n_kv_heads, slots, per_slot, head_dim)
            out[batch.decode_tokens] = attended[batch.decode_row, :, batch.decode_slot, : self.n_rep]
        for first, length, row, width, visible in batch.prompts:
            n = length * self.n_rep  # query rows, ordered (position, rep)
            seg = q[first : first + length].transpose(0, 1).reshape(1, self.n_kv_heads, n, self.head_dim)
            visible = pad_rows(visible.repeat_interleave(self.n_rep, dim=0), value=True)  # (whole_blocks(n), width)
            attended = attention(pad_rows(seg), cache_k[row : row + 1, :, :width], cache_v[row : row + 1, :, :width], visible)
            # reshape, not view: a fused kernel's output need not be contiguous (on CUDA it is not)
            attended = attended[0, :, :n].reshape(self.n_kv_heads, length, self.n_rep, self.head_dim)
            out[first : first + length] = attended.transpose(0, 1)  # (length, n_kv_heads, n_rep, head_dim)
        return out.flatten(1)  # (tokens, n_heads * head_dim)
