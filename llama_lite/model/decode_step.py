"""The decode step compiled whole: embedding, every layer (its K/V written into the cache and attention
over it) and the output head as one region. Its tokens are independent one-token segments, or
(`one_row`) one row's prompt chunk in order, attending through one read of the row's keys (a long
chunk's products in kernels.prompt_tiles); a prompt fed in order is a prefill (aot_step.AotStep takes prompts so).

Run eagerly, one token a sequence is ~500 small operators whose overhead dwarfs reading the weights;
compiled, they fuse into a few loops. On a CPU `_step` is compiled ahead of time in another process
(aot_step.py); on CUDA `DecodeStep` compiles it in the process, as CUDA graphs. Shapes stay dynamic
(tokens, attention width in key blocks) and the layer body is traced once for every layer
(`nested_compile_region`). Measurements and what it promises: docs/design/compiled-step.md.
"""

import contextlib
import os
import time
import types

import torch
import torch.nn.functional as F

from ..cache import cache_dir
from .attention import ROW_BLOCK
from .kernels import prompt_tiles
from .kv_cache import KEY_BLOCK, key_blocks


def grid_attention(q, keys, values, visible):
    """softmax(q k^T) v for query tokens laid out by cache row and slot, as two batched products per
    row and key head (no (tokens, width, head_dim) temporary) and ATen's softmax: the same kernels
    eager and compiled. A query's numbers do not depend on the slots beside it: a product's row does
    not depend on how many rows it has, from ROW_BLOCK rows on (MKL on a Zen 4 EPYC takes another
    kernel below 4: one slot's 3 rows and two slots' 6 rounded a query differently), so every product
    gets at least that many (a fixed number of zero rows, which adds no shape guard to the export);
    checked where a step is built: aot_build.alike_in_every_graph.
    q: (rows, n_kv_heads, slots, n_rep, head_dim), scaled; keys, values: (rows, n_kv_heads, width,
    head_dim); visible: (rows, slots, width // KEY_BLOCK, KEY_BLOCK) bool. Returns q's shape and dtype.
    The values are summed block by block, in order (as attention.attention does): one product over
    the whole width rounds by its width (MKL splits a long sum), so a query's numbers would depend on
    the furthest token of its call -- on what shares its step, past 256 keys."""
    n_rows, n_kv, n_slots, n_rep, head_dim = q.shape
    n = n_slots * n_rep
    extra = (0, 0, 0, max(ROW_BLOCK - n_rep, 0))  # zero query rows: at least ROW_BLOCK in every product
    grouped = F.pad(q.float().reshape(n_rows, n_kv, n, head_dim), extra)  # a key head's queries together
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2))[:, :, :n].view(n_rows, n_kv, n_slots, n_rep, -1)
    n_blocks = visible.shape[-2]
    probs = torch.softmax(scores.masked_fill(~visible.flatten(-2)[:, None, :, None, :], float("-inf")), dim=-1)
    blocks = F.pad(probs.view(n_rows, n_kv, n, -1), extra).view(n_rows, n_kv, n + extra[-1], n_blocks, KEY_BLOCK)
    parts = torch.matmul(blocks.transpose(2, 3), values.float().view(n_rows, n_kv, n_blocks, KEY_BLOCK, head_dim))
    return parts.sum(2)[:, :, :n].view(q.shape).to(q.dtype)  # (rows, n_kv, blocks, n, head_dim) summed in order


def _project_and_store(layer, h, cos, sin, rows, positions, cache_k, cache_v):
    """The layer's q, k, v for tokens h, k and v written into the cache at (rows, positions). The
    cache is written whole, not through a view cut to the width: the compiled graph would copy such
    a view (every row of the cache) back each step, a cost that grows with the cache's rows (64
    rows: 30 ms a step). q: (tokens, n_kv_heads, n_rep, head_dim)."""
    attention = layer.attention
    q, k, v = layer.project(h, cos, sin)  # (tokens, heads, head_dim) each
    cache_k[rows, :, positions] = k
    cache_v[rows, :, positions] = v
    return q.view(q.shape[0], attention.n_kv_heads, attention.n_rep, attention.head_dim)


@torch.compiler.nested_compile_region
def decode_layer(layer, h, cos, sin, rows, positions, visible, cache_k, cache_v, slots=None):
    """One transformer block for independent tokens h (tokens, dim); cache_k / cache_v: this layer's
    whole cache, (rows, n_kv_heads, positions, head_dim), written at (rows, positions). With `slots`
    (each token's query slot in its row: a row's guesses take several) the tokens attend by cache
    row over rows 0.. up to visible's (rows, slots, key blocks, KEY_BLOCK), through a view of the cache: a copy of
    its row's keys per token cost 4x the products at 64 rows. Without (CUDA's step), each token
    attends through such a copy (visible: (tokens, key blocks, KEY_BLOCK))."""
    q = _project_and_store(layer, h, cos, sin, rows, positions, cache_k, cache_v)
    width = visible.shape[-2] * KEY_BLOCK
    if slots is None:
        keys, values = cache_k[rows, :, :width], cache_v[rows, :, :width]
        attended = grid_attention(q[:, :, None], keys, values, visible[:, None])[:, :, 0]
    else:
        n_rows, n_slots = visible.shape[:2]
        grid = q.new_zeros(n_rows, q.shape[1], n_slots, *q.shape[2:])  # (rows, n_kv_heads, slots, n_rep, head_dim)
        grid[rows, :, slots] = q
        keys, values = cache_k[:n_rows, :, :width], cache_v[:n_rows, :, :width]
        attended = grid_attention(grid, keys, values, visible)[rows, :, slots]
    return layer.finish(h, attended.flatten(1))  # (tokens, n_heads * head_dim) -> (tokens, dim)


@torch.compiler.nested_compile_region
def prompt_layer(layer, h, cos, sin, rows, positions, visible, cache_k, cache_v):
    """decode_layer for tokens of one row (rows all alike: a prompt chunk), its tokens the slots of
    one row, attending through one read of the row's keys: the same numbers."""
    q = _project_and_store(layer, h, cos, sin, rows, positions, cache_k, cache_v)
    width = visible.shape[1] * KEY_BLOCK
    row = rows[:1]  # (1,): a tensor index, as a number would be data the exported graph cannot hold
    grid = q.transpose(0, 1)[None]  # (1, n_kv_heads, tokens, n_rep, head_dim)
    attended = grid_attention(grid, cache_k[row, :, :width], cache_v[row, :, :width], visible[None])
    return layer.finish(h, attended[0].transpose(0, 1).flatten(1))


def _step(model, tokens, rows, positions, key_index, cache_k, cache_v, logits_at=None, one_row=False, slots=None,
          slot_positions=None, tiled=False):
    """Logits (float32, (tokens, vocab)) of independent tokens; see decode_layer. cache_k, cache_v:
    the layers' cache tensors. logits_at: the tokens whose logits are wanted (None: all); the head,
    a vocabulary-wide product, runs on those rows alone (a prompt's other tokens need none).
    one_row: the tokens are one row's, in order (a prompt chunk), and attend through prompt_layer;
    `tiled`: their products in kernels.prompt_tiles (at most PROMPT_TILE tokens).
    slots, slot_positions: each token's query slot in its row, and the position of each (row, slot)
    (rows 0.., slots; unused ones any position), for decode_layer's attention by row."""
    if slot_positions is None:
        visible = key_index[None] <= positions[:, None, None]  # (tokens, key blocks, KEY_BLOCK)
    else:
        visible = key_index[None, None] <= slot_positions[:, :, None, None]  # (rows, slots, key blocks, KEY_BLOCK)
    cos = model.rope_cos[positions][:, None]  # (tokens, 1, head_dim // 2)
    sin = model.rope_sin[positions][:, None]
    h = model.embed(tokens)  # (tokens, dim)
    with prompt_tiles(model) if tiled else contextlib.nullcontext():
        for layer, k, v in zip(model.layers, cache_k, cache_v):
            if one_row:
                h = prompt_layer(layer, h, cos, sin, rows, positions, visible, k, v)
            else:
                h = decode_layer(layer, h, cos, sin, rows, positions, visible, k, v, slots)
    return model.head(h if logits_at is None else h.index_select(0, logits_at))


# Ops whose compiled loops would round otherwise than ATen's kernels: reductions add in another order,
# and inductor writes silu as x * sigmoid(x) where ATen divides. (Elementwise float32 arithmetic rounds
# the same either way: inductor compiles with -ffp-contract=off.)
ATEN_OPS = ("sum.dim_IntList", "_softmax.default", "silu.default")


def aten_kernels_in_compiled_code(eager_twin: bool):
    """With `eager_twin` (aot_step.has_eager_twin), have inductor call ATen's kernels for ATEN_OPS, and
    round low-precision results where eager rounds them (the int4 kernel, integer_kernels.q4_mm, is an
    operator of its own, which the compiled code calls as it is; the int8 head's `_int_mm` sums
    integers, exact in any kernel): so the compiled step's numbers are the eager step's, bit for bit,
    and a process decoding eagerly until its step is built (aot_step.EagerStep) gives the tokens the
    built step will. For the build process alone: it changes inductor for good."""
    from torch._inductor import config, decomposition, lowering

    aten = torch.ops.aten
    ops = []
    if eager_twin:
        config.emulate_precision_casts = True
        ops += [getattr(getattr(aten, name.split(".")[0]), name.split(".")[1]) for name in ATEN_OPS]
    for op in ops:
        if not getattr(lowering.lowerings.get(op), "_llama_lite", False):
            decomposition.decompositions.pop(op, None)
            lowering.lowerings.pop(op, None)
            lowering.lowerings.pop(op.overloadpacket, None)
            # warn=False: with CI set in the environment, inductor refuses a fallback for an op that has
            # a decomposition in torch's table (it wants one for its own tests), which is the point here.
            lowering.make_fallback(op, warn=False)
            lowering.lowerings[op]._llama_lite = True


class DecodeStep:
    """The model's decode step compiled in this process as CUDA graphs; call it with a decode-only
    step's tokens and segments. `build` compiles it now."""

    error = None
    compiled = True
    takes_prompts = False  # decoding tokens alone: a CUDA graph per padded count of a prompt's tokens would not pay
    tiled_chunks = None

    def __init__(self, model):
        self.model = model
        self.device = model.rope_cos.device
        self.ready = False
        self.build_seconds = None
        self.key_index = torch.arange(key_blocks(model.params.max_seq_len), device=self.device).view(-1, KEY_BLOCK)
        # Inductor's compiled code outlives /tmp: a later start then only traces. A user's own setting wins.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        for t in (*model.cache.k, *model.cache.v):  # CUDA graphs copy their inputs each call, unless told these stay put
            torch._dynamo.mark_static_address(t)
        # The weights never change once loaded: no guard needs to check each of them on every call
        # (~1 ms a step for SmolLM2's ~300 tensors). Without those guards a graph must never meet
        # another model, and dynamo keeps graphs per code object: so each model gets its own copy.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}
        own_step = types.FunctionType(_step.__code__.replace(), _step.__globals__, "decode_step")
        self.compiled = torch.compile(own_step, fullgraph=True, dynamic=False, mode="reduce-overhead", options=options)

    def draft_budget(self, n_decoding: int) -> int:
        return n_decoding  # unmeasured on CUDA: no guesses

    def __call__(self, tokens, segments, logits_at):
        n = len(segments)
        rows = [row for row, _, _ in segments]
        positions = [start for _, start, _ in segments]
        width = key_blocks(max(positions) + 1)
        # few shapes, few CUDA graphs: pad the tokens (repeating the first) and width to powers of two
        n_padded = 1 << (n - 1).bit_length()
        width = min(KEY_BLOCK << (width // KEY_BLOCK - 1).bit_length(), self.key_index.numel())
        tokens = torch.cat((tokens, tokens[:1].expand(n_padded - n)))
        rows, positions = rows + rows[:1] * (n_padded - n), positions + positions[:1] * (n_padded - n)
        rows, positions = (torch.tensor(x, device=self.device) for x in (rows, positions))
        return self._run(tokens, rows, positions, width)[logits_at]

    def _run(self, tokens, rows, positions, width):
        key_index = self.key_index[: width // KEY_BLOCK]
        if tokens.shape[0] > 1:  # one graph for every count of tokens above one (dynamo keeps one apart)
            for t in (tokens, rows, positions):
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(key_index, 0)  # and for every width
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(self.model, tokens, rows, positions, key_index, self.model.cache.k, self.model.cache.v)

    @torch.inference_mode()
    def build(self) -> None:
        """Compile now: run the step once per graph on throw-away tokens (their K/V land at position 0
        of the first rows, which every request overwrites before reading)."""
        started = time.perf_counter()
        for n in sorted({1, min(2, self.model.params.max_batch_size)}):
            zeros = torch.zeros(n, dtype=torch.long, device=self.device)
            self._run(zeros, zeros.clone(), zeros.clone(), KEY_BLOCK)
        torch.cuda.synchronize(self.device)
        self.build_seconds = time.perf_counter() - started
        self.ready = True
