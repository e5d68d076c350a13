"""Meta checkpoint folders: params.json + consolidated.*.pth, one shard per model-parallel rank,
joined here (or, under torchrun with as many ranks as shards, each rank's own shard as saved)."""

from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from ..model import parallel
from ..model.rope import RopeScaling
from .checkpoint_types import Checkpoint
from .folder_config import positive_number, read_json, tokenizer_beside


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_rope_scaling(params: dict, where) -> Optional[RopeScaling]:
    """Llama 3.1+'s use_scaled_rope as Meta's reference applies it: factor 8 and high_freq_factor 4
    unless params.json names others, low_freq_factor 1, original context 8192 (Llama 3.2 1B/3B
    files name no factor, and Meta's code then uses 8 where their Hugging Face config says 32)."""
    if not params.get("use_scaled_rope"):
        return None
    return RopeScaling("llama3", factor=positive_number(params, "rope_scaling_factor", where, 8.0, kind=float),
                       high_freq_factor=positive_number(params, "rope_high_freq_factor", where, 4.0, kind=float))


def _load_shards(shards: list) -> list:
    """Each consolidated.*.pth's state dict, memory-mapped (tensors are read when used)."""
    loaded = []
    for shard in shards:
        try:  # weights_only: a .pth is a pickle, and a pickle can run code; this refuses anything but tensors
            loaded.append(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CheckpointError(f"{shard} is not a readable weights-only checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(loaded[-1], dict):
            raise CheckpointError(f"{shard} does not hold a state dict")
    if "output.weight" not in loaded[0]:
        raise CheckpointError(f"{shards[0]} has no output.weight; is it a Llama checkpoint?")
    return loaded


def _meta_model_args(params: dict, where: Path, dim: int, n_heads: int, multiplier, loaded: list) -> dict:
    """ModelArgs fields (no cache sizes) from params.json, the vocabulary size off the weights where
    the file does not give it."""
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:  # Meta's Llama 2 files say -1: read it off the weights
        vocab_size = sum(sd["output.weight"].shape[0] for sd in loaded)
    return dict(
        dim=dim,
        n_layers=positive_number(params, "n_layers", where),
        n_heads=n_heads,
        n_kv_heads=positive_number(params, "n_kv_heads", where, n_heads),
        vocab_size=vocab_size,
        hidden_dim=meta_hidden_dim(dim, positive_number(params, "multiple_of", where, 256), multiplier),
        norm_eps=positive_number(params, "norm_eps", where, 1e-5, kind=float),
        rope_theta=positive_number(params, "rope_theta", where, 10000.0, kind=float),
        rope_scaling=_meta_rope_scaling(params, where),
    )


def _full_shape(name: str, args: dict) -> tuple:
    """The shape tensor `name` has in the whole model (before any model-parallel split)."""
    dim, head_dim, hidden_dim = args["dim"], args["dim"] // args["n_heads"], args["hidden_dim"]
    if name in ("tok_embeddings.weight", "output.weight"):
        return (args["vocab_size"], dim)
    kind = name.split(".")[-2]
    return {
        "wq": (args["n_heads"] * head_dim, dim), "wk": (args["n_kv_heads"] * head_dim, dim),
        "wv": (args["n_kv_heads"] * head_dim, dim), "wo": (dim, args["n_heads"] * head_dim),
        "w1": (hidden_dim, dim), "w3": (hidden_dim, dim), "w2": (dim, hidden_dim),
    }.get(kind, (dim,))


def _meta_tensors(folder: Path, loaded: list, args: dict, same_split: bool):
    """(Meta name, whole tensor or this rank's part) for every tensor of the shards, one at a time;
    `same_split`: each rank takes its own shard where it was cut the way this model splits."""
    for name in loaded[0]:
        if name == "rope.freqs":  # Meta's precomputed RoPE table; recomputed here
            continue
        try:
            parts = [sd[name] for sd in loaded]
        except KeyError:
            raise CheckpointError(f"{folder}: {name} is missing from some consolidated.*.pth shards") from None
        dim = _shard_dim(name, parts, _full_shape(name, args), folder)
        if dim is None:
            yield name, parts[0]
        elif same_split and dim == parallel.split_dim(name):
            yield name, parts[parallel.rank()]  # this rank's part as saved: the other shards stay unread
        else:
            yield name, torch.cat(parts, dim=dim)


def meta_folder(folder: Path) -> Checkpoint:
    """A Meta folder's params and shards (memory-mapped); its tensors read on demand."""
    where = folder / "params.json"
    params = read_json(where)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder} has params.json but no consolidated.*.pth weights; add them")
    dim = positive_number(params, "dim", where)
    n_heads = positive_number(params, "n_heads", where)
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = positive_number(params, "ffn_dim_multiplier", where, kind=float)
    loaded = _load_shards(shards)
    args = _meta_model_args(params, where, dim, n_heads, multiplier, loaded)
    # Under torchrun with as many ranks as shards, each rank takes its own shard where it was cut
    # the way this model splits (mmap: the others are never read).
    same_split = parallel.world_size() == len(loaded) > 1

    def tensors(as_stored=frozenset(), dtype_of=None):  # nothing is stored quantized in these files; float32
        return _meta_tensors(folder, loaded, args, same_split)

    return Checkpoint(folder, args, None, False, tensors, n_tensors=len(loaded[0]),
                      size=sum(s.stat().st_size for s in shards), tokenizer_file=tokenizer_beside(folder))


def _shard_dim(name, parts, full, folder):
    """The dimension along which model-parallel shards of one tensor were cut: where each is a
    1/len(parts) slice (rows for column-parallel weights, columns for row-parallel ones and Llama 2's
    embedding); None where every shard holds it whole (norms)."""
    if len(parts) == 1 or tuple(parts[0].shape) == tuple(full):
        return None
    for dim in range(len(full)):
        shape = list(full)
        shape[dim] = full[dim] // len(parts)
        if full[dim] % len(parts) == 0 and all(list(p.shape) == shape for p in parts):
            return dim
    raise CheckpointError(f"{folder}: the shards of {name} ({[tuple(p.shape) for p in parts]}) "
                          f"do not make its shape {tuple(full)}")
