"""The Llama transformer: tokens and their positions in, logits out. No I/O.

Meta's weight names and layout (interleaved RoPE pairs), grouped-query attention, SwiGLU, and a KV
cache preallocated as one fixed-shape tensor per K and V, addressed by (row, position): a row is one
sequence's memory, so any mix of sequences, each at its own point, can share a forward call.

Batch invariance (float32, eager: a token's logits do not depend on what else shares its call) is
explained in attention.py, where most of what makes it hold lives.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .attention import ROW_BLOCK, Attention, Batch, whole_blocks
from .kernels import THIN_ROWS, Linear
from .kv_cache import KVCache
from .rope import RopeScaling, rope_tables


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does. The mean as ATen takes
        # it (a sum, then a division), written out: a compiled step leaves sums to ATen (decode_step.ATEN_OPS).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / xf.shape[-1] + self.eps)
        return xf.type_as(x) * self.weight


def by_rows(fn, chunk, *xs):
    """fn(*xs) for token-wise work on xs (each (tokens, ...)), in pieces of at most `chunk` rows
    (None: at once), joined; fn returns a tensor or a tuple of them."""
    if chunk is None or xs[0].shape[0] <= chunk:
        return fn(*xs)
    parts = [fn(*piece) for piece in zip(*(x.split(chunk) for x in xs))]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(outs) for outs in zip(*parts))
    return torch.cat(parts)


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
    def __init__(self, params: ModelArgs, tokenizer_vocab_size: "int | None" = None):
        """`tokenizer_vocab_size`: ids from here on get -inf logits, so they are never picked (a
        tokenizer smaller than the model's vocabulary cannot write them); None: every id."""
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
        self.decode_step = None  # the step fed token by token: compiled (aot_step.py, decode_step.py) or its eager twin
        self.compiled_later = None  # a function: the compiled step once another process has built it, else None
        self.threads_later = None  # a function: True once it has given back threads lowered for others' niced work
        self.thin_decode = False
        self.tokenizer_vocab_size = tokenizer_vocab_size or params.vocab_size
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
        held = sum(length for _, _, length in segments)
        if held != len(tokens):  # compiled code would read past the tokens
            raise ValueError(f"the segments hold {held} tokens, but {len(tokens)} were given")
        kinds = {length == 1 for _, _, length in segments}
        step = self.decode_step if self.decode_step is not None and self.decode_step.ready else None
        if step is not None and (step.takes_prompts or kinds == {True}):
            logits = step(tokens, segments, logits_at)
        elif (self.thin_decode or step is not None) and len(kinds) == 2:  # decoding tokens get a pass of their own
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
        h = self.embed(tokens)  # (tokens, dim)
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

    def adopt_compiled_step(self) -> None:
        """Take the compiled step another process has built since this one started, if it has. Called
        between requests only (the engine), where switching cannot change a running request's tokens.
        After an eager twin (aot_step.EagerStep: the same bits) the K/V the cache holds stay valid;
        after the model's own eager pass (int8) they were computed otherwise: the prefix cache forgets them.
        Threads lowered for other processes' niced work come back here too, once it is gone (the thread
        count does not change a token: docs/performance.md#threads)."""
        if self.threads_later is not None and self.threads_later():
            self.threads_later = None
        if self.compiled_later is not None:
            step = self.compiled_later()
            if step is not None:
                if self.decode_step is None:
                    self.cache.writes += 1  # (PrefixCache.drop_if_overwritten)
                self.decode_step, self.compiled_later = step, None

    @property
    def tiled_chunks(self) -> "int | None":
        """The fewest tokens of a prompt chunk whose products the step computes otherwise than shorter
        chunks' (in tiles: aot_step.TokenwiseStep), or None where every chunk is computed alike. The
        engine keeps each prompt's chunks on one side of it (engine.prompt_chunk)."""
        step = self.decode_step
        return step.tiled_chunks if step is not None and step.ready and step.takes_prompts else None

    def draft_budget(self, n_decoding: int) -> "tuple[int, bool]":
        """(the most tokens `n_decoding` decoding rows may feed in one step, speculative guesses
        included (speculation.py); whether guesses within it are free). Eagerly they are: the rows
        every product pads to anyway (a memory-bound product of 4 rows costs what 1 does). The
        compiled step says what pays from its measured step times (AotStep.draft_budget); CUDA's
        takes none."""
        if self.decode_step is not None and self.decode_step.ready:
            return self.decode_step.draft_budget(n_decoding), False
        return whole_blocks(n_decoding), True

    def use_thin_decode(self, enabled: bool) -> None:
        """Decode through the thin product (kernels.py; float32 on a CPU, a cache of at most
        THIN_ROWS rows, so a decoding pass never outgrows it and every decoding token is computed
        the same way): decoding tokens then get a pass of their own, and prompt passes enough rows
        to take the usual product."""
        self.thin_decode = enabled
        for module in self.modules():
            if isinstance(module, Linear):
                module.thin = enabled

    def embed(self, tokens):
        """Token embeddings in the activations' dtype (the int4 path keeps its embedding bfloat16)."""
        return self.tok_embeddings(tokens).to(self.norm.weight.dtype)

    def head(self, h):
        return self.output(self.norm(h)).float()
