"""The decode step compiled ahead of time (AOTInductor), loaded without the compiler; and its eager twin.

The same step as decode_step.py (`_step`: embedding, every layer, the head), built by another
process into a shared library per range of token counts (one token alone, 2-8, 9 and up to a
token a row) and one for a prompt chunk (one row's tokens in order): aot_build.py. It takes every
token of a step, prompts' too, and runs the head only on the tokens whose logits are wanted
(`logits_at`). The libraries hold no weights: a process loads them with PyTorch's C++ loader (no
dynamo, no inductor imported, ~0.1 s) and hands them the model's own tensors and KV cache, so
nothing is copied. Why and what it promises: docs/design/compiled-step.md.
"""

import collections
import json
import time
from pathlib import Path

import torch

from .kernels import PROMPT_TILE, tiles_pay
from .kv_cache import KEY_BLOCK, key_blocks

MATVEC_ROWS = 8  # kernels' int8 products change form above this many rows: a graph of its own beyond
# A prompt chunk of at least this many tokens is computed in kernels.prompt_tiles (~80 ms a call of up to
# PROMPT_TILE tokens for SmolLM2 on 2 cores); a shorter one with the int4 kernel (~2 ms a token), as
# decoding computes its tokens: a chat turn or a served request's short prompt stays cheap.
TILED_CHUNK = 48
GUESS_WORTH = 0.5  # a speculative guess is fed where it costs at most this share of a decoding token's step time


def token_ranges(max_batch_size: int) -> list:
    """The (fewest, most) tokens of each graph: one token alone; 2 to MATVEC_ROWS (a few rows, or one
    row and its speculative guesses, even in a one-row cache); then up to a token a row. A step with
    more (a prompt's chunk) takes several calls. A graph of its own for prompt chunks in a few-row
    cache would add a minute or two to every build, for ~1.9 against ~1.3 ms a prompt token."""
    bounds = [(1, 1), (2, MATVEC_ROWS), (MATVEC_ROWS + 1, max_batch_size)]
    return [(low, high) for low, high in bounds if low <= high]


def has_eager_twin(model) -> bool:
    """Whether a process decodes `model` with EagerStep until (or without) its compiled step: where its
    weights are low precision (4-bit, bfloat16). float32 decodes eagerly its own way, bit for bit, and
    int8's compiled one-row products are fused loops that no eager step repeats."""
    from .kernels import Int8Linear

    low = any(t.dtype != torch.float32 for t in model.state_dict().values())
    return low and not any(isinstance(m, Int8Linear) for m in model.modules())


def takes_prompt_chunks(model) -> bool:
    """Whether the step (compiled, and its eager twin alike) takes prompt chunks: where the products are
    4-bit, whose rows do not depend on how many the call has (the int4 kernel's; kernels.prompt_tiles'
    GEMM of a fixed count). bfloat16's products change kernels with their rows (its compiled prompt
    chunks were found unlike themselves cut otherwise), so its prompts go through the model's own
    pass, in a process that has the compiled step and in one that has not."""
    from .kernels import Int4Linear

    return any(isinstance(m, Int4Linear) for m in model.modules())


def tiled_chunks(model) -> "int | None":
    """The fewest tokens of a prompt chunk the step computes in kernels.prompt_tiles (TILED_CHUNK), or
    None where it computes none so (no 4-bit layers, or the tiles do not pay on this CPU)."""
    return TILED_CHUNK if takes_prompt_chunks(model) and tiles_pay() else None


def _constants(model) -> dict:
    """The tensors a compiled step reads, by the names the export gives them."""
    named = {f"model.{name}": t for name, t in model.state_dict(keep_vars=False).items()}
    named.update({f"model.{name}": t for name, t in model.named_buffers()})
    for i, (k, v) in enumerate(zip(model.cache.k, model.cache.v)):
        named[f"cache_k{i}"], named[f"cache_v{i}"] = k, v
    return named


class TokenwiseStep:
    """A step that feeds every token as a one-token segment (see `__call__`); subclasses say how a call
    of at most `most_tokens` tokens is computed (`_call`)."""

    ready, error, takes_prompts, compiled = True, None, True, True
    most_tokens: int
    tiled_chunks: "int | None"  # the fewest tokens of a prompt chunk computed in tiles (None: none is)

    def __init__(self, model):
        self.model = model
        self.key_index = torch.arange(key_blocks(model.params.max_seq_len)).view(-1, KEY_BLOCK)  # by key block
        tiles_pay()  # probed now, outside any trace (an export would see fake tensors)

    def __call__(self, tokens, segments, logits_at):
        """Logits at `logits_at` of any step, in calls (`_calls`): a prompt chunk of `tiled_chunks` tokens
        or more through the prompt graph, its tokens attending through one read of its row's keys and
        its products in kernels.prompt_tiles; decoding tokens, guesses and short chunks together in
        calls of at most `most_tokens`, attending by cache row, their products the int4 kernel's (a short
        chunk that would make such a call's attention grid sparse goes through the prompt graph, the
        same numbers). Calls run in the tokens' order, so a token's logits and K/V depend neither on
        how its prompt was cut (the engine keeps a prompt's chunks on one side of `tiled_chunks`) nor
        on what shared its step."""
        # contiguous: compiled code reads its inputs as dense arrays (Meta's loop passes a column of its token grid)
        tokens = tokens.contiguous()
        calls = _calls(segments, self.most_tokens, self.tiled_chunks)
        if len(calls) == 1:
            return self._call(tokens, *calls[0][1:], logits_at)
        logits = None
        for first, rows, positions, one_row in calls:
            last = first + len(rows)
            wanted = (logits_at >= first) & (logits_at < last)
            out = self._call(tokens[first:last], rows, positions, one_row, logits_at[wanted] - first)
            if logits is None:
                logits = out.new_empty(len(logits_at), out.shape[1])
            logits[wanted] = out
        return logits

    def _call(self, tokens, rows: list, positions: list, one_row: bool, logits_at):
        """Logits at `logits_at` of one call's tokens: the head runs on those rows alone (a prompt
        chunk's other tokens need none; SmolLM2's vocabulary-wide head costs what a layer's products do)."""
        width = key_blocks(max(positions) + 1)  # the keys the call's furthest token sees, in whole blocks
        wanted = logits_at.contiguous() if len(logits_at) else logits_at.new_zeros(1)  # a graph takes at least one
        inputs = [tokens, torch.tensor(rows), torch.tensor(positions), self.key_index[: width // KEY_BLOCK], wanted]
        if not one_row:
            inputs += slot_grid(rows, positions)
        out = self._run(inputs, one_row)
        return out if len(logits_at) else out[:0]

    def _run(self, inputs: list, one_row: bool):
        raise NotImplementedError


def slot_grid(rows: list, positions: list) -> list:
    """[each token's slot in its row (its row's tokens before it in the call), the (row, slot) grid of
    positions over rows 0..max(rows)] for decode_layer's attention by row; unused cells position 0."""
    slots, taken = [], {}
    for row in rows:
        slots.append(taken.get(row, 0))
        taken[row] = slots[-1] + 1
    grid = torch.zeros(max(rows) + 1, max(taken.values()), dtype=torch.long)
    grid[rows, slots] = torch.tensor(positions)
    return [torch.tensor(slots), grid]


def _calls(segments, most_tokens: int, tiled_chunks: "int | None") -> list:
    """(first token, rows, positions, one_row) of each call a step's segments take, in order. A segment
    of `tiled_chunks` tokens or more goes in near-equal pieces of at most PROMPT_TILE (each over
    PROMPT_TILE / 2, so tiled too), each a call of its own through the prompt graph (one_row); where
    nothing is tiled, a segment longer than PROMPT_TILE goes in such pieces too. Shorter segments and
    pieces join the run of tokens before them in one call where `_joins` says they may (a prompt's
    tokens are computed there as decoding them one by one would: the bits of the prompt graph's int4
    products; and four short prompts cost one call, not four); one that may not takes a call of its
    own, through the prompt graph if it may not begin a run either. rows and positions are lists:
    a few torch calls a token cost more."""
    calls, first = [], 0
    for row, start, length in segments:
        tiled = tiled_chunks is not None and length >= tiled_chunks
        pieces = -(-length // PROMPT_TILE) if tiled or tiled_chunks is None else 1
        for i in range(pieces):
            low, high = length * i // pieces, length * (i + 1) // pieces
            rows, positions = [row] * (high - low), list(range(start + low, start + high))
            if not tiled and calls and not calls[-1][3] and _joins(calls[-1][1], row, high - low, most_tokens):
                calls[-1][1].extend(rows)
                calls[-1][2].extend(positions)
            else:  # a call of its own: a run's first tokens, or a piece through the prompt graph
                calls.append((first + low, rows, positions, tiled or not _joins([], row, high - low, most_tokens)))
        first += length
    return calls


GRID_SLACK = 4  # a run's attention grid may have this many (row, slot) cells a token


def _joins(run_rows: list, row: int, n: int, most_tokens: int) -> bool:
    """Whether n tokens of `row` may join a run of tokens at `run_rows` (or begin one: none): at most
    `most_tokens` in all, and for several tokens (a prompt's), an attention grid (decode_layer: rows
    0.. up to the highest, by the most slots a row takes) of at most GRID_SLACK cells a token, as every
    cell costs what a query does (2 cores: a 30-token prompt beside 40 decoding rows cost 211 ms in
    one call, 150 in two; four 13-token prompts 99 ms in one, 128 in four)."""
    tokens = len(run_rows) + n
    if n == 1 or tokens > most_tokens:
        return tokens <= most_tokens
    slots = max(collections.Counter(run_rows + [row] * n).values())
    return (max(run_rows + [row]) + 1) * slots <= GRID_SLACK * tokens


class AotStep(TokenwiseStep):
    """The compiled step loaded from its folder, bound to `model`'s tensors; called as DecodeStep is."""

    def __init__(self, model, folder: Path):
        super().__init__(model)
        started = time.perf_counter()
        listing = json.loads((folder / "graphs.json").read_text())
        self.build_seconds = listing["build_seconds"]
        constants = _constants(model)
        self.graphs = []
        for graph in listing["graphs"]:
            runner = torch._C._aoti.AOTIModelPackageLoader(str(folder / graph["file"]), "model", False, 1, -1)
            names = runner.get_constant_fqns()
            # the model's own tensors, not copies (user_managed): the cache the step writes is the engine's
            runner.load_constants({name: constants[name] for name in names}, False, True, True)
            self.graphs.append((graph["low"], graph["high"], graph.get("one_row", False), runner))
        self.most_tokens = max(high for _, high, one_row, _ in self.graphs if not one_row)  # decoding tokens in one call
        self.tiled_chunks = min((low for low, _, one_row, _ in self.graphs if one_row and low >= TILED_CHUNK), default=None)
        # milliseconds of a step by its tokens, as the build measured them (none: never guess)
        self.step_ms = {int(n): ms for n, ms in listing.get("step_ms", {}).items()}
        # prompts' tokens too, where the build found each token's logits alike in every graph (else prompts run eagerly)
        self.takes_prompts = listing.get("takes_prompts", False)
        self.load_seconds = time.perf_counter() - started

    def draft_budget(self, n_decoding: int) -> int:
        """The most tokens `n_decoding` decoding rows should feed, speculative guesses included: the
        most whose step costs at most GUESS_WORTH of a decoding token's share more per extra token (a
        guess accepted half the time or more then pays). The int4 kernel reads each weight once for
        up to a few rows, so one row's guesses cost little (SmolLM2, 2-core EPYC, one build: 1 token
        6.1 ms, 4: 8.0, 8: 11.8)."""
        base = self.step_ms.get(n_decoding)
        if base is None:
            return n_decoding
        per_token = GUESS_WORTH * base / n_decoding
        fits = [n for n, ms in self.step_ms.items() if n > n_decoding and ms - base <= per_token * (n - n_decoding)]
        return max(fits, default=n_decoding)

    def _run(self, inputs: list, one_row: bool):
        n = len(inputs[0])
        runner = next(r for low, high, prompt, r in self.graphs if prompt == one_row and low <= n <= high)
        return runner.run(inputs)[0]


class EagerStep(TokenwiseStep):
    """The compiled step's computation run eagerly: `decode_step._step` with ATen's kernels, the ones the
    build makes the compiled code call (decode_step.aten_kernels_in_compiled_code). What a low-precision
    path decodes with until its compiled step is built (or without one: compile=False), so a token's
    logits and K/V are bit for bit the compiled step's, and no text depends on when a compile finished."""

    build_seconds, compiled = None, False

    def __init__(self, model):
        super().__init__(model)
        self.most_tokens = max(high for _, high in token_ranges(model.params.max_batch_size))  # a call's, as compiled
        self.tiled_chunks = tiled_chunks(model)  # as its compiled step will
        self.takes_prompts = takes_prompt_chunks(model)  # as its compiled step will

    def draft_budget(self, n_decoding: int) -> int:
        return n_decoding  # unmeasured eagerly: no guesses until the compiled step says what they cost

    def _run(self, inputs: list, one_row: bool):
        from .decode_step import _step

        tokens, rows, positions, key_index, logits_at, *slots = inputs
        tiled = one_row and self.tiled_chunks is not None and len(tokens) >= self.tiled_chunks
        return _step(self.model, tokens, rows, positions, key_index, self.model.cache.k, self.model.cache.v, logits_at,
                     one_row, *slots, tiled=tiled)


def load(model, folder: Path) -> "AotStep | None":
    """The step built into `folder` (artifact_folder) for `model`, or None if there is none yet."""
    return AotStep(model, folder) if (folder / "graphs.json").is_file() else None
