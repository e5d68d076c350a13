"""The Llama transformer: tokens and their positions in, logits out. No I/O.

Meta's weight names and layout (interleaved RoPE pairs), grouped-query attention, SwiGLU, and a KV
cache preallocated as one fixed-shape tensor per K and V, addressed by (row, position): a row is one
sequence's memory, so any mix of sequences, each at its own point, can share a forward call.

Batch invariance (float32, eager): a token's logits do not depend on what else shares its call.
Three things make that hold on CPU:
- MKL computes rows in blocks of four and takes other kernels for one to three left-over rows
  (GEMV for a single row), which round differently: every product gets a multiple of ROW_BLOCK rows.
  (With the thin product for decoding, see use_thin_decode, decoding and prompt tokens never share
  a product, and each kind always gets its own kernel.)
- Attention is written out (scores, softmax, weighted sum) instead of calling
  `scaled_dot_product_attention`, whose kernel blocks its sums by how many keys and queries share
  the call; written out, keys past a query's position weigh exactly zero.
- MKL also blocks a long sum by its length, so the weighted sum of values runs KEY_BLOCK keys at a
  time in a fixed order, over a width padded to whole blocks: more keys only add exact zeros.
(Found by measuring MKL's AVX-512 kernels; tests/test_engine.py says if another machine's differ.)
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .devices import check_fits
from .kernels import THIN_ROWS, Linear
from .rope import RopeScaling, apply_rope, rope_tables

ROW_BLOCK = 4  # every matrix product gets a multiple of this many rows (see the module docstring)
KEY_BLOCK = 128  # attention reads whole blocks of this many keys, and sums their values block by block


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
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1+'s or linear; None: plain RoPE
    qkv_bias: bool = False  # Qwen2's q, k and v projections add a bias
    sliding_window: Optional[int] = None  # keys this many positions back or more are hidden (Mistral); None: none is
    max_seq_len: int = 2048  # KV-cache length
    max_batch_size: int = 8  # KV-cache rows

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class KVCache:
    """Keys and values of every layer: one (rows, n_kv_heads, positions, head_dim) tensor per layer for
    each, with max_seq_len rounded up to whole KEY_BLOCKs of positions, plus one spare position.

    A token's K/V is written at (its sequence's row, its position); a query reads its row up to its
    position. One tensor per layer, not views of one: a compiled step that writes a view of a shared
    tensor copies all of it. The spare position (never used: widths stop at whole key blocks) keeps
    every attention width a true slice of the tensor (the compiler's dynamic shapes specialise a slice
    that spans a whole dimension). Zero-filled, not empty: attention multiplies masked-out values by
    zero, and garbage memory could hold NaN."""

    def __init__(self, params: "ModelArgs", dtype, device):
        shape = self.shape(params)[1:]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(params.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(params.n_layers)]
        self.rows, self.max_seq_len = params.max_batch_size, params.max_seq_len
        self.writes = 0  # forward calls so far: the engine's prefix cache notices K/V written by others

    def copy_prefix(self, src_row: int, dst_row: int, n: int) -> None:
        """Positions 0..n-1 of row src_row into row dst_row, in every layer: a shared prompt beginning's
        K/V (a position's K/V depend only on the tokens up to it), at a fraction of a prefill's cost."""
        for layer in (*self.k, *self.v):
            layer[dst_row, :, :n] = layer[src_row, :, :n]

    @staticmethod
    def shape(p: "ModelArgs") -> tuple:
        """(layers, rows, this process's share of the kv heads, whole key blocks of positions + 1, head_dim)."""
        return (p.n_layers, p.max_batch_size, p.n_kv_heads // parallel.world_size(), key_blocks(p.max_seq_len) + 1, p.head_dim)

    @staticmethod
    def check_fits(p: "ModelArgs", dtype, device) -> None:
        """Refuse, naming its size, a cache larger than the memory free (before loading any weights)."""
        n_bytes = 2 * math.prod(KVCache.shape(p)) * dtype.itemsize  # keys and values; Python ints never overflow
        check_fits(n_bytes, f"the KV cache of {p.max_batch_size} rows x {p.max_seq_len} positions",
                   "lower max_batch_size or max_seq_len", torch.device(device))


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


def key_blocks(n: int) -> int:
    """n keys rounded up to whole KEY_BLOCKs."""
    return -(-n // KEY_BLOCK) * KEY_BLOCK


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
    together over the cache rows 0..decode_rows-1; longer ones (prompts) attend one at a time.
    A row may have several one-token segments (speculative decoding verifies its guesses so): each
    takes a query slot of its row, so every one is computed as it would be decoding alone.
    """

    positions: torch.Tensor  # (tokens,)
    write_rows: torch.Tensor  # (tokens,): each token's cache row
    decode_tokens: torch.Tensor  # (d,): which tokens are one-token segments
    decode_at: torch.Tensor  # (d,): their rows, so row decode_at[i] ..
    decode_slot: torch.Tensor  # (d,): .. slot decode_slot[i] holds token decode_tokens[i]
    decode_rows: int  # the decode group spans cache rows 0..decode_rows-1
    decode_visible: torch.Tensor  # (decode_rows, 1, slots, 1, width): key p is visible to the slot's query
    prompts: list  # (first token, length, row, width, visible (length, width)) per longer segment
    chunk: "int | None" = None  # token-wise work (the linear layers) in pieces of at most this many rows

    @staticmethod
    def build(segments, device) -> "Batch":
        positions, rows, decode_tokens, decode_at, decode_slot, decode_pos, prompts = [], [], [], [], [], [], []
        slots = {}  # row -> its one-token segments so far
        for row, start, length in segments:
            if length == 1:
                decode_tokens.append(len(positions))
                decode_at.append(row)
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
        decode_rows = max(decode_at, default=-1) + 1
        width = key_blocks(max(decode_pos, default=0) + 1)
        # slots outside the group see key 0 only (their output is ignored)
        slot_pos = torch.zeros(decode_rows, max(slots.values(), default=1), dtype=torch.long)  # (decode_rows, slots)
        for row, slot, pos in zip(decode_at, decode_slot, decode_pos):
            slot_pos[row, slot] = pos
        slot_pos = slot_pos.to(device)
        visible = torch.arange(width, device=device) <= slot_pos[:, :, None]  # (decode_rows, slots, width)
        return Batch(
            positions=torch.tensor(positions, device=device),
            write_rows=torch.tensor(rows, device=device),
            decode_tokens=torch.tensor(decode_tokens, device=device, dtype=torch.long),
            decode_at=torch.tensor(decode_at, device=device, dtype=torch.long),
            decode_slot=torch.tensor(decode_slot, device=device, dtype=torch.long),
            decode_rows=decode_rows,
            decode_visible=visible[:, None, :, None, :],
            prompts=prompts,
        )


def by_rows(fn, chunk, *xs):
    """fn(*xs) for token-wise work on xs (each (tokens, ...)), in pieces of at most `chunk` rows
    (None: at once), joined; fn returns a tensor or a tuple of them."""
    if chunk is None or xs[0].shape[0] <= chunk:
        return fn(*xs)
    parts = [fn(*piece) for piece in zip(*(x.split(chunk) for x in xs))]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(outs) for outs in zip(*parts))
    return torch.cat(parts)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
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
        if batch.decode_rows:
            # Each row's slots are query rows of whole blocks, so the products always get multiples of
            # ROW_BLOCK rows: a slot is computed as a one-token decode of its row would be.
            rows, slots, width = batch.decode_rows, batch.decode_visible.shape[2], batch.decode_visible.shape[-1]
            per_slot = whole_blocks(self.n_rep)
            q_rows = q.new_zeros(rows, self.n_kv_heads, slots, per_slot, self.head_dim)
            q_rows[batch.decode_at, :, batch.decode_slot, : self.n_rep] = q[batch.decode_tokens]  # (d, n_kv_heads, n_rep, head_dim) placed
            visible = batch.decode_visible.expand(-1, -1, -1, per_slot, -1).flatten(2, 3)  # (rows, 1, slots * per_slot, width)
            attended = attention(q_rows.flatten(2, 3), cache_k[:rows, :, :width], cache_v[:rows, :, :width], visible)
            attended = attended.unflatten(2, (slots, per_slot))  # (rows, n_kv_heads, slots, per_slot, head_dim)
            out[batch.decode_tokens] = attended[batch.decode_at, :, batch.decode_slot, : self.n_rep]
        for first, length, row, width, visible in batch.prompts:
            n = length * self.n_rep  # query rows, ordered (position, rep)
            seg = q[first : first + length].transpose(0, 1).reshape(1, self.n_kv_heads, n, self.head_dim)
            visible = pad_rows(visible.repeat_interleave(self.n_rep, dim=0), value=True)  # (whole_blocks(n), width)
            attended = attention(pad_rows(seg), cache_k[row : row + 1, :, :width], cache_v[row : row + 1, :, :width], visible)
            # reshape, not view: a fused kernel's output need not be contiguous (on CUDA it is not)
            attended = attended[0, :, :n].reshape(self.n_kv_heads, length, self.n_rep, self.head_dim)
            out[first : first + length] = attended.transpose(0, 1)  # (length, n_kv_heads, n_rep, head_dim)
        return out.flatten(1)  # (tokens, n_heads * head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_linear(dim, hidden_dim)
        self.w2 = parallel.row_linear(hidden_dim, dim)
        self.w3 = parallel.column_linear(dim, hidden_dim)
        self.w13 = None  # w1 and w3 as one int4 matrix (kernels.int4_modules), when they are

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def project(self, x, cos, sin):
        return self.attention.project(self.attention_norm(x), cos, sin)

    def finish(self, x, attended):
        h = x + self.attention.wo(attended)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x, cos, sin, batch, cache_k, cache_v):
        q, k, v = by_rows(self.project, batch.chunk, x, cos, sin)
        return by_rows(self.finish, batch.chunk, x, self.attention.attend(q, k, v, batch, cache_k, cache_v))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.dim % params.n_heads or params.n_heads % params.n_kv_heads:
            raise ValueError(
                f"n_heads={params.n_heads} must divide dim={params.dim} and be a multiple of "
                f"n_kv_heads={params.n_kv_heads}"
            )
        if params.sliding_window is not None and params.sliding_window < params.max_seq_len:
            # A window at least max_seq_len wide hides no key the cache can hold; a narrower one needs a mask.
            raise ValueError(
                f"this model attends through a sliding window of {params.sliding_window} positions, which "
                f"llama_lite does not implement; build with max_seq_len <= {params.sliding_window}"
            )
        self.params = params
        self.tok_embeddings = parallel.embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = parallel.column_linear(params.dim, params.vocab_size, gather_output=True)
        self.decode_step = None  # the compiled one-token step, once built (decode_step.py)
        self.thin_decode = False
        self.tokenizer_vocab_size = params.vocab_size  # logits of ids from here on are -inf (see Llama.build)
        self.setup_cache()

    def setup_cache(self):
        """(Re)allocate the KV cache and RoPE tables on the weights' device, in their dtype.

        Called by __init__, and again after weights built on the meta device were loaded with
        `assign=True`, since tensors made on the meta device hold no memory.
        """
        p = self.params
        weight = self.norm.weight  # in the activations' dtype, even when the matrices are int8
        # Computed on the CPU and moved: arithmetic on the meta device would import torch._dynamo (0.6 s).
        cos, sin = rope_tables(p.head_dim, p.max_seq_len, p.rope_theta, p.rope_scaling, device="cpu")
        self.register_buffer("rope_cos", cos.to(weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device), persistent=False)
        self.cache = KVCache(p, weight.dtype, weight.device)

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits (float32, (bsz, seqlen, vocab_size)) for `tokens` (bsz, seqlen) at positions start_pos..;
        writes their K/V into cache rows 0..bsz-1. `last_only` computes the output projection for the
        last position alone ((bsz, 1, vocab_size)): a long prompt's full logits would cost seqlen x
        vocab floats that generation never reads."""
        bsz, seqlen = tokens.shape
        segments = [(row, start_pos, seqlen) for row in range(bsz)]
        logits_at = torch.arange(bsz * seqlen, device=tokens.device).view(bsz, seqlen)  # (bsz, seqlen)
        if last_only:
            logits_at = logits_at[:, -1:]
        logits = self.forward_segments(tokens.reshape(-1), segments, logits_at.reshape(-1))
        return logits.view(bsz, -1, logits.shape[-1])  # (bsz, seqlen or 1, vocab_size)

    def forward_segments(self, tokens: torch.Tensor, segments, logits_at: torch.Tensor) -> torch.Tensor:
        """Logits (float32, (len(logits_at), vocab_size)) at the chosen tokens of a flat batch.

        tokens: (n,), laid out as `segments`: (cache row, start position, length) each, in order,
        lengths summing to n (see Batch). Writes every token's K/V at its row and position.
        logits_at: indices into tokens, the only positions whose logits are computed.
        """
        p = self.params
        self.cache.writes += 1
        for row, start, length in segments:
            if not (0 <= row < p.max_batch_size and 0 <= start and length >= 1 and start + length <= p.max_seq_len):
                raise ValueError(
                    f"{length} token(s) at positions {start}.. of row {row} do not fit the KV cache "
                    f"({p.max_batch_size} rows x {p.max_seq_len} positions); build with a larger max_batch_size or max_seq_len"
                )
        kinds = {length == 1 for _, _, length in segments}
        compiled = self.decode_step is not None and self.decode_step.ready
        if kinds == {True} and compiled:
            logits = self.decode_step(tokens, segments, logits_at)
        elif (self.thin_decode or compiled) and len(kinds) == 2:  # decoding tokens get a pass of their own
            return self._two_passes(tokens, segments, logits_at)
        else:
            logits = self._eager(tokens, segments, logits_at)
        if self.tokenizer_vocab_size < p.vocab_size:  # ids the tokenizer cannot turn into text are never picked
            logits[:, self.tokenizer_vocab_size :] = float("-inf")
        return logits

    def _eager(self, tokens, segments, logits_at):
        batch = Batch.build(segments, tokens.device)
        if self.thin_decode and not batch.prompts:  # a decoding pass of any size keeps the thin product
            batch.chunk = THIN_ROWS
        # whole row blocks; with the thin product for decoding, a prompt pass stays above its reach
        least = THIN_ROWS + ROW_BLOCK if self.thin_decode and batch.prompts else 0
        rows, out_rows = (max(least, whole_blocks(len(x))) for x in (tokens, logits_at))
        n_out = len(logits_at)
        tokens = F.pad(tokens, (0, rows - len(tokens)))  # padding tokens: id 0 at position 0, in no segment
        positions = F.pad(batch.positions, (0, rows - len(batch.positions)))
        cos = self.rope_cos[positions][:, None]  # (tokens, 1, head_dim // 2)
        sin = self.rope_sin[positions][:, None]
        h = self.tok_embeddings(tokens)  # (tokens, dim)
        for layer, cache_k, cache_v in zip(self.layers, self.cache.k, self.cache.v):
            h = layer(h, cos, sin, batch, cache_k, cache_v)
        h = h[F.pad(logits_at, (0, out_rows - n_out))]  # (out_rows, dim)
        return by_rows(self.head, batch.chunk, h)[:n_out]

    def _two_passes(self, tokens, segments, logits_at):
        """forward_segments as one pass over the one-token segments and one over the rest (the
        sequences are independent, so only the order of work changes); logits in logits_at's order."""
        starts, first = [], 0
        for _, _, length in segments:
            starts.append(first)
            first += length
        logits = torch.empty(len(logits_at), self.params.vocab_size, device=tokens.device)
        wanted = logits_at.tolist()  # on the host: this path serves CPUs alone
        for decoding in (True, False):
            chosen = [i for i, s in enumerate(segments) if (s[2] == 1) == decoding]
            index, where = [], {}  # the pass's tokens, and each original token's place among them
            for i in chosen:
                for j in range(starts[i], starts[i] + segments[i][2]):
                    where[j] = len(index)
                    index.append(j)
            mine = [k for k, t in enumerate(wanted) if t in where]
            out = self.forward_segments(tokens[index], [segments[i] for i in chosen],
                                        torch.tensor([where[wanted[k]] for k in mine], dtype=torch.long, device=tokens.device))
            logits[mine] = out
        return logits

    def draft_budget(self, n_decoding: int) -> int:
        """The most tokens `n_decoding` decoding rows may feed in one step, speculative guesses included
        (speculation.py), at about the cost of their own: eagerly, the rows every product pads to anyway
        (a memory-bound product of 4 rows costs what 1 does). The compiled step has none to spare: each
        token more costs ~4 ms there (SmolLM2, 2-core EPYC: 1 token 8.9 ms, 2: 13.4, 4: 21.7, 8: 39.5;
        its int4 kernel is compute-bound past one row)."""
        if self.decode_step is not None and self.decode_step.ready:
            return n_decoding
        return whole_blocks(n_decoding)

    def use_thin_decode(self, enabled: bool) -> None:
        """Decode through the thin product (kernels.py; float32 on a CPU, a cache of at most
        THIN_ROWS rows, so a decoding pass never outgrows it and every decoding token is computed
        the same way): decoding tokens then get a pass of their own, and prompt passes enough rows
        to take the usual product."""
        self.thin_decode = enabled
        for module in self.modules():
            if isinstance(module, Linear):
                module.thin = enabled

    def head(self, h):
        return self.output(self.norm(h)).float()
