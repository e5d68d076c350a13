"""Prefix caching: a request reuses the K/V of its prompt's beginning that a KV-cache row still holds.

Rows keep their K/V after their request ends (evicted empty rows first, then least recently used); a
radix tree over token ids, one per key (the engine's: `cache_salt`, and how the prompt is prefilled),
finds the longest beginning any row holds, which is then used in place or copied into the admitted
request's row (`PrefixCache.plan`). Only K/V that a prefill wrote are reused, so the tokens are bit for
bit those with the cache off (float32): why, and what is never reused, in docs/design/prefix-cache.md.
"""

import itertools
from dataclasses import dataclass


def reusable(prompt, may_reuse=True, least=2) -> int:
    """The most positions a prompt may reuse: all but the last `least` (its pieces' fewest tokens,
    engine.prompt_chunk: two, as a one-token rest would be decoded)."""
    return max(0, len(prompt) - least) if may_reuse else 0


def common_length(edge: tuple, prompt, start: int) -> int:
    """How many first ids of `edge` equal prompt[start:]'s."""
    n = min(len(edge), len(prompt) - start)
    k = 0
    while k < n and edge[k] == prompt[start + k]:
        k += 1
    return k


class _Node:
    """An edge of ids below its parent, and the rows whose prompt runs through all of it."""

    __slots__ = ("ids", "children", "rows")

    def __init__(self, ids: tuple, rows):
        self.ids = ids
        self.children = {}  # a child's first id -> the child
        self.rows = set(rows)


class PrefixTree:
    """Rows' prompts as a radix tree over token ids: which rows share how many first ids with a prompt."""

    def __init__(self):
        self.root = _Node((), ())

    def __bool__(self):
        return bool(self.root.children)

    def insert(self, row: int, prompt) -> None:
        node, i = self.root, 0
        while i < len(prompt):
            child = node.children.get(prompt[i])
            if child is None:
                node.children[prompt[i]] = _Node(tuple(prompt[i:]), (row,))
                return
            k = common_length(child.ids, prompt, i)
            if k < len(child.ids):  # the prompt leaves this edge (or ends) inside it: split the edge there
                head = _Node(child.ids[:k], child.rows)
                child.ids = child.ids[k:]
                head.children[child.ids[0]] = child
                node.children[prompt[i]] = child = head
            child.rows.add(row)
            node, i = child, i + k

    def remove(self, row: int, prompt) -> None:
        node, i = self.root, 0
        while i < len(prompt):
            child = node.children[prompt[i]]
            child.rows.discard(row)
            if not child.rows:  # no row runs through it, so none runs below it either
                del node.children[prompt[i]]
                return
            node, i = child, i + len(child.ids)

    def shared(self, prompt) -> dict:
        """row -> how many first ids its prompt shares with `prompt` (rows that share none left out)."""
        found, node, i = {}, self.root, 0
        while i < len(prompt):
            child = node.children.get(prompt[i])
            if child is None:
                break
            k = common_length(child.ids, prompt, i)
            for row in child.rows:
                found[row] = i + k
            if k < len(child.ids):
                break
            node, i = child, i + k
        return found


@dataclass
class Reuse:
    """Where a request being admitted goes: the free row it takes; the positions 0..length-1 of row
    `source` whose K/V it reuses (source == row: in place; length 0: none); and the row `move_old_to`
    that the K/V `row` held move to first (None: nothing worth keeping, or nowhere to keep them)."""

    row: int
    source: int
    length: int
    move_old_to: "int | None" = None


class PrefixCache:
    """What each KV-cache row holds K/V of, and for a new request, which free row and what to reuse.

    The engine calls `plan` and `take` to admit a request, `prefilled` after each forward call,
    `release` when a request ends, and `drop_if_overwritten` before each step."""

    def __init__(self, kv_cache):
        self.kv = kv_cache
        self.trees = {}  # key (Engine._cache_key) -> PrefixTree of the prompts rows hold
        self.prompt_of = {}  # row -> (key, prompt) whose K/V it holds, from position 0 ..
        self.n_prefilled = {}  # row -> .. up to this position (not included), all written by prefill
        self.last_used = {}  # free row -> when it was last used (a tick), for least-recently-used eviction
        self.clock = itertools.count()
        self.writes_seen = kv_cache.writes
        self.hits = self.misses = self.reused_tokens = 0  # over admitted requests, for /metrics

    def plan(self, prompt, salt, free_rows, may_reuse=True, least=2) -> "Reuse | None":
        """Where a request with this prompt and cache_salt goes, and what it reuses; None when it should
        wait: a running row is still prefilling a shared beginning of half its prompt or more (so `n`
        copies of one prompt prefill it once).

        It takes the lowest free row, as without the cache: decoding attends over rows 0.. up to the
        highest decoding row, so busy rows stay together. The K/V that row holds beyond this prompt's
        beginning move to the row to evict (one holding nothing, else the least recently used), so
        eviction goes by use, not by row number. Copies cost a few milliseconds; a prefill, seconds."""
        limit = reusable(prompt, may_reuse, least)
        tree = self.trees.get(salt)
        shared = tree.shared(prompt) if tree and limit > 0 else {}
        usable = {row: min(n, self.n_prefilled[row], limit) for row, n in shared.items()}
        length = max(usable.values(), default=0)
        coming = max((min(n, len(self.prompt_of[row][1]), limit) for row, n in shared.items() if row not in free_rows), default=0)
        if 2 * (coming - length) >= len(prompt):
            return None
        row = min(free_rows)
        candidates = [r for r, n in usable.items() if n == length > 0]
        source = row if row in candidates or not candidates else candidates[0]
        others = [r for r in free_rows if r not in (row, source)]
        if not others or self.n_prefilled.get(row, 0) <= shared.get(row, 0):  # nowhere to keep it, or nothing is lost
            return Reuse(row, source, length)
        evict = min(others, key=lambda r: (self.n_prefilled.get(r, 0) > 0, self.last_used.get(r, -1), r))
        return Reuse(row, source, length, evict)

    def take(self, reuse: Reuse, prompt, salt, may_reuse=True, least=2) -> None:
        """A request with this prompt now holds reuse.row: what the row held moves out (if asked), and
        the row gets the reused K/V (a copy unless in place). A one-token prompt is decoded, so its
        row holds nothing. Each step forgets before it copies, so an interruption leaves no lie."""
        if reuse.move_old_to is not None:
            self._forget(reuse.move_old_to)
            (old_salt, old_prompt), n = self.prompt_of[reuse.row], self.n_prefilled[reuse.row]
            self.kv.copy_prefix(reuse.row, reuse.move_old_to, n)
            self._hold(reuse.move_old_to, old_salt, old_prompt, n)
            self.last_used[reuse.move_old_to] = self.last_used.get(reuse.row, -1)
        self._forget(reuse.row)
        if reuse.source != reuse.row and reuse.length:
            self.kv.copy_prefix(reuse.source, reuse.row, reuse.length)
            if reuse.source in self.last_used:  # a free row just used: the last to evict
                self.last_used[reuse.source] = next(self.clock)
        if len(prompt) >= 2:
            self._hold(reuse.row, salt, tuple(prompt), reuse.length)
        if reusable(prompt, may_reuse, least):
            self.hits += reuse.length > 0
            self.misses += reuse.length == 0
            self.reused_tokens += reuse.length

    def prefilled(self, rows_written) -> None:
        """After a forward call of the engine: (row, its request's tokens with K/V written) pairs; the
        prompt positions among them count as prefilled (generated tokens' K/V are decoding's, never reused)."""
        self.writes_seen = self.kv.writes
        for row, n in rows_written:
            if row in self.prompt_of:
                self.n_prefilled[row] = min(n, len(self.prompt_of[row][1]))

    def release(self, row: int) -> None:
        """The row's request ended: the row keeps its K/V until it is needed again."""
        self.last_used[row] = next(self.clock)

    def drop_if_overwritten(self) -> None:
        """Forget every row's K/V if anything but the engine wrote the cache since (`generate`, a direct
        model call): they may no longer be what the index says."""
        if self.kv.writes != self.writes_seen:
            for row in list(self.prompt_of):
                self._forget(row)
            self.writes_seen = self.kv.writes

    def _hold(self, row: int, salt, prompt: tuple, n_prefilled: int) -> None:
        self.prompt_of[row] = (salt, prompt)
        self.n_prefilled[row] = n_prefilled
        self.trees.setdefault(salt, PrefixTree()).insert(row, prompt)

    def _forget(self, row: int) -> None:
        if row in self.prompt_of:
            salt, prompt = self.prompt_of.pop(row)
            del self.n_prefilled[row]
            self.trees[salt].remove(row, prompt)
            if not self.trees[salt]:
                del self.trees[salt]
        self.last_used.pop(row, None)
