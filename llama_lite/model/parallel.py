"""Model parallelism under `torchrun` with fairscale's layers, as Meta's reference does.

In one process nothing here starts distributed work: the model uses plain layers. With
WORLD_SIZE > 1, `setup` starts torch.distributed (gloo on CPU, nccl on CUDA) and fairscale's
model-parallel group; the model then splits heads, kv heads, FFN width and vocabulary across ranks
with `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding`.
"""

import atexit
import contextlib
import math
import os
import sys

import torch
from torch import nn

from .kernels import Linear


def world_size() -> int:
    """How many processes split the model (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process reads input and writes output (rank 0, or the only process)."""
    return rank() == 0


def check_divisible(world: int, n_heads: int, n_kv_heads: int, hidden_dim: int, vocab_size: int) -> None:
    """ValueError naming the allowed world sizes, before any weight is loaded."""
    common = math.gcd(math.gcd(n_heads, n_kv_heads), math.gcd(hidden_dim, vocab_size))
    if common % world:
        allowed = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"{world} processes cannot split this model (n_heads {n_heads}, n_kv_heads {n_kv_heads}, "
            f"FFN width {hidden_dim}, vocab {vocab_size}); use --nproc_per_node in {allowed}"
        )


def _process_group() -> None:
    """Start torch.distributed once: gloo for CPU tensors, and nccl for CUDA ones where there is CUDA."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        # Destroyed before the interpreter tears down: gloo's threads outliving it abort the process at
        # exit ("terminate called without an active exception", SIGABRT) now and then.
        atexit.register(_end_process_groups)


def _end_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def setup(device: torch.device) -> torch.device:
    """Start torch.distributed and fairscale's model-parallel group once; the device of this rank."""
    from fairscale.nn.model_parallel import initialize as mp

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    _process_group()
    if not mp.model_parallel_is_initialized():
        with contextlib.redirect_stdout(sys.stderr):  # fairscale prints its set-up; stdout is for results
            mp.initialize_model_parallel(world_size())
    return device


def broadcast(value):
    """`value` as rank 0 has it, on every rank (itself in one process)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    _process_group()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _no_init(weight):
    """No random init: every weight is replaced by the checkpoint's."""
    return weight


def column_linear(in_features: int, out_features: int, gather_output: bool = False, bias: bool = False) -> nn.Module:
    """y = x W^T (+ b) with W's rows (output features), and b, split across ranks."""
    if world_size() == 1:
        return Linear(in_features, out_features, bias)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    return ColumnParallelLinear(in_features, out_features, bias=bias, gather_output=gather_output, init_method=_no_init)


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """y = x W^T with W's columns split across ranks; the input arrives split, the sum is all-reduced."""
    if world_size() == 1:
        return Linear(in_features, out_features)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, init_method=_no_init)


def embedding(vocab_size: int, dim: int) -> nn.Module:
    """Token embeddings with the vocabulary's rows split across ranks."""
    if world_size() == 1:
        # _weight skips the random init: weights are assigned from the checkpoint (and a normal_ on
        # the meta device would import torch._dynamo, 0.8 s of cold start).
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    from fairscale.nn.model_parallel.layers import VocabParallelEmbedding

    return VocabParallelEmbedding(vocab_size, dim, init_method=_no_init)


# Which dimension of each Meta-named weight (or bias) is split across ranks (None: every rank holds it whole).
_SPLIT_ROWS = ("tok_embeddings", "wq", "wk", "wv", "w1", "w3", "output")
_SPLIT_COLUMNS = ("wo", "w2")


def split_dim(name: str):
    kind = name.split(".")[-2]
    return 0 if kind in _SPLIT_ROWS else 1 if kind in _SPLIT_COLUMNS else None


def shard(name: str, tensor: torch.Tensor, local_shape) -> torch.Tensor:
    """This rank's part of a Meta-named tensor: as given if it already has this rank's shape (one
    process, or a checkpoint shard saved for this rank), else cut from the full tensor."""
    if world_size() == 1 or tuple(tensor.shape) == tuple(local_shape) or split_dim(name) is None:
        return tensor
    return tensor.chunk(world_size(), dim=split_dim(name))[rank()].clone()
