"""The KV cache: keys and values of every layer, preallocated at a fixed shape and addressed by
(row, position), a row being one sequence's memory."""

import math
import mmap
from typing import TYPE_CHECKING

import torch

from . import parallel
from .devices import check_fits

if TYPE_CHECKING:
    from .transformer import ModelArgs

KEY_BLOCK = 128  # attention reads whole blocks of this many keys, and sums their values block by block


def key_blocks(n: int) -> int:
    """n keys rounded up to whole KEY_BLOCKs."""
    return -(-n // KEY_BLOCK) * KEY_BLOCK


def zeros_resident_when_written(shape, dtype, device) -> torch.Tensor:
    """Zeros that take memory only where written, on CPU: an anonymous mapping's pages are the
    system's shared zero page until first written. A 2048-position cache holds a short chat's few
    positions resident, not all of them (torch.zeros writes every page: 94 MB at batch 1 for
    SmolLM2, llama.cpp's whole peak being ~175)."""
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MAP_PRIVATE"):  # (Windows has no such mapping)
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    # private, as torch's own memory is: a forked process gets a copy, and reading a page never written
    # maps the zero page (a shared anonymous mapping would allocate it). The tensor keeps the mapping alive.
    pages = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


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
        self.k = [zeros_resident_when_written(shape, dtype, device) for _ in range(params.n_layers)]
        self.v = [zeros_resident_when_written(shape, dtype, device) for _ in range(params.n_layers)]
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
