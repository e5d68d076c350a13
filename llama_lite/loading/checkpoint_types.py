"""What every checkpoint reader returns: a `Checkpoint` (metadata now, tensors one at a time) and
the value types of weights a GGUF holds in blocks llama_lite computes with as they are."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch


class Int4Values(NamedTuple):
    """A weight stored in 4 bits (GGUF Q4_0 / Q4_1), as it is: weight = q * scale + offset, with q
    (out, in) in 0..15 and scale, offset (out, in // 32) per group of 32."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


class Int8Values(NamedTuple):
    """A weight quantized by rows as it was read (kernels.quantize_int8): weight ~= q * scale, with q
    (out, in) int8 and scale (out, 1) float32."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self):
        return self.q.shape


@dataclass
class Checkpoint:
    """What a checkpoint holds, read lazily: `tensors()` yields (Meta name, tensor) one at a time."""

    path: Path
    args: dict  # ModelArgs fields other than the cache sizes
    context_length: Optional[int]  # the longest sequence the model was trained for, if known
    tied: bool  # the output projection is the embedding (no output.weight is stored)
    # (as_stored=frozenset(), dtype_of=None) -> (Meta name, tensor, or stored values for names in as_stored);
    # dtype_of(name), where a reader heeds it, is the dtype to yield a tensor in (a GGUF's are made in it
    # directly, with no float32 copy of the whole: the loader's peak memory); torch.int8 asks for
    # Int8Values, which a reader that does not heed it leaves to the loader
    tensors: Callable[..., Iterator]
    n_tensors: int
    size: int  # bytes on disk, to decide whether loading deserves a progress bar
    tokenizer_file: Optional[Path] = None  # the tokenizer beside the weights, if any
    gguf_reader: object = None  # a GGUF checkpoint's open reader: its vocabulary is the tokenizer
    stored: dict = field(default_factory=dict)  # Meta name -> "int4": weights a GGUF holds in such blocks
