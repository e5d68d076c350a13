"""Checkpoints to model arguments and Meta-named tensors: GGUF files, Hugging Face folders
(config.json + safetensors) and Meta folders (params.json + consolidated.*.pth).

`read_checkpoint` detects the format and reads only metadata; the returned `Checkpoint` then yields
one Meta-named tensor at a time, so the caller converts and places each before the next is read and
peak memory stays near the final weights' size. GGUF is parsed by `gguf_file.GGUFFile` (a memory
map) and dequantized with `gguf.quants` (every type llama.cpp's Python tools know, no
hand-written dequantizer); safetensors with `safetensors`; .pth with `torch.load(weights_only=True)`.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import parallel
from .errors import CheckpointError
from .gguf_file import REQUIRED, dequantize, gguf_field, open_gguf

# --- GGUF ----------------------------------------------------------------------------------------

# GGUF tensor names -> Meta's. Per-block names sit under blk.N. / layers.N.
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _meta_name(name: str, global_names=_GLOBAL_NAMES, block_tensor=_BLOCK_TENSOR, block_names=_BLOCK_NAMES):
    """A checkpoint's tensor name as Meta's (GGUF names by default; HF passes its own tables), or None."""
    if name in global_names:
        return global_names[name]
    m = block_tensor.fullmatch(name)
    if m and m.group(2) in block_names:
        return f"layers.{m.group(1)}.{block_names[m.group(2)]}.weight"
    return None


def gguf_model_args(reader) -> dict:
    """ModelArgs fields from `llama.*` metadata (no cache sizes)."""
    path = reader.path
    arch = gguf_field(reader, "general.architecture", kind=str)
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; llama_lite runs 'llama' GGUF models")

    def positive_int(key, default=REQUIRED):
        value = gguf_field(reader, f"llama.{key}", default, kind=int)
        if value <= 0:
            raise CheckpointError(f"{path}: metadata llama.{key} = {value!r} is not a positive integer")
        return value

    n_heads = positive_int("attention.head_count")
    dim = positive_int("embedding_length")
    args = dict(
        dim=dim,
        n_layers=positive_int("block_count"),
        n_heads=n_heads,
        n_kv_heads=positive_int("attention.head_count_kv", n_heads),
        hidden_dim=positive_int("feed_forward_length"),
        norm_eps=float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, kind=float)),
        rope_theta=float(gguf_field(reader, "llama.rope.freq_base", 10000.0, kind=float)),
        vocab_size=positive_int("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens", [], kind=list))),
        context_length=positive_int("context_length", 2048),
    )
    if dim % n_heads:
        raise CheckpointError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    rope_dims = gguf_field(reader, "llama.rope.dimension_count", dim // n_heads)
    if rope_dims != dim // n_heads:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dims}) are not supported")
    scaling = gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported; use a model without rope scaling")
    return args


def _gguf_tensors(reader) -> Iterator:
    """(Meta name, float32 tensor) for each tensor, dequantized one at a time."""
    for t in reader.tensors:
        name = _meta_name(t.name)
        if name is None:
            raise CheckpointError(f"{reader.path}: unexpected tensor {t.name!r}; this llama variant is not supported")
        try:
            tensor = dequantize(t)
        except NotImplementedError:
            raise CheckpointError(f"{reader.path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize; convert the model to another type") from None
        reader.release(t)
        yield name, tensor


# --- every format --------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What a checkpoint holds, read lazily: `tensors()` yields (Meta name, tensor) one at a time."""

    path: Path
    args: dict  # ModelArgs fields other than the cache sizes
    context_length: Optional[int]  # the longest sequence the model was trained for, if known
    tied: bool  # the output projection is the embedding (no output.weight is stored)
    tensors: Callable[[], Iterator]
    n_tensors: int
    size: int  # bytes on disk, to decide whether loading deserves a progress bar
    tokenizer_file: Optional[Path] = None  # the tokenizer beside the weights, if any
    gguf_reader: object = None  # a GGUF checkpoint's open reader: its vocabulary is the tokenizer


LAYOUTS = ("a .gguf file, a Hugging Face folder (config.json + *.safetensors) "
           "or a Meta folder (params.json + consolidated.*.pth)")


def read_checkpoint(path) -> Checkpoint:
    """Detect the checkpoint at `path` and read its metadata (no tensor data yet)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass {LAYOUTS}, or none for the default model")
    if path.is_dir():
        if (path / "params.json").is_file():
            return _meta_folder(path)
        if (path / "config.json").is_file():
            return _hf_folder(path)
        raise CheckpointError(f"{path} is a folder with neither params.json (Meta) nor config.json (Hugging Face); pass {LAYOUTS}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    if magic == b"GGUF":
        return _gguf_file(path)
    if path.suffix in (".safetensors", ".pth", ".json"):
        raise CheckpointError(f"{path} is one file of a checkpoint folder; pass the folder that holds it")
    raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass {LAYOUTS}")


def _gguf_file(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    args = gguf_model_args(reader)
    context_length = args.pop("context_length")
    names = {t.name for t in reader.tensors}
    return Checkpoint(path, args, context_length, tied="output.weight" not in names,
                      tensors=lambda: _gguf_tensors(reader), n_tensors=len(reader.tensors),
                      size=path.stat().st_size, gguf_reader=reader)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; fix or replace it")
    return value


def _number(config: dict, key: str, where: Path, default=None, kind=int):
    value = config.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and value != int(value)):
        raise CheckpointError(f"{where}: {key} = {value!r} is not a positive {'integer' if kind is int else 'number'}")
    return kind(value)


def _tokenizer_beside(folder: Path) -> Optional[Path]:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    return None


# --- Hugging Face folders ------------------------------------------------------------------------

_HF_BLOCK_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                    "lm_head.weight": "output.weight"}
_HF_BLOCK_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_to_meta_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the Q/K row permutation Hugging Face's converter applies for its rotate-half RoPE.

    In each head HF stores the first element of every rotary pair, then every second element;
    Meta (and this model) keeps each pair adjacent.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # (n_heads, 2, head_dim // 2, cols) -> (n_heads, head_dim // 2, 2, cols) -> (rows, cols)
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_folder(folder: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    where = folder / "config.json"
    config = _read_json(where)
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not supported; llama_lite runs 'llama' models")
    dim = _number(config, "hidden_size", where)
    n_heads = _number(config, "num_attention_heads", where)
    n_kv_heads = _number(config, "num_key_value_heads", where, n_heads)
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise CheckpointError(f"{where}: RoPE scaling {scaling!r} is not supported; use a model without rope_scaling")
    if config.get("head_dim", dim // n_heads) != dim // n_heads or dim % n_heads:
        raise CheckpointError(f"{where}: head_dim {config.get('head_dim')} differs from hidden_size / num_attention_heads; not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true; llama_lite's Llama has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    args = dict(
        dim=dim,
        n_layers=_number(config, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=_number(config, "vocab_size", where),
        hidden_dim=_number(config, "intermediate_size", where),
        norm_eps=_number(config, "rms_norm_eps", where, 1e-6, kind=float),
        rope_theta=_number(config, "rope_theta", where, rope.get("rope_theta", 10000.0), kind=float),
    )
    tied = bool(config.get("tie_word_embeddings", False))

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; fix or replace it")
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has config.json but no *.safetensors weights (pickled .bin files are not read); add them")
    keys = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys[file] = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download it again") from None

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in keys[file]:
                    name = _meta_name(key, _HF_GLOBAL_NAMES, _HF_BLOCK_TENSOR, _HF_BLOCK_NAMES)
                    if name is None:
                        if key.endswith("rotary_emb.inv_freq"):  # recomputed, not loaded
                            continue
                        raise CheckpointError(f"{file}: unexpected tensor {key!r}; this llama variant is not supported")
                    if tied and name == "output.weight":
                        continue
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:  # safetensors raises its own errors for bad offsets
                        raise CheckpointError(f"{file}: tensor {key} cannot be read ({e}); download it again") from None
                    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                        heads = n_heads if name.endswith("wq.weight") else n_kv_heads
                        if tensor.dim() != 2 or tensor.shape[0] % (2 * heads):
                            raise CheckpointError(f"{file}: {key} has shape {tuple(tensor.shape)}, which does not fit {heads} heads")
                        tensor = hf_to_meta_rows(tensor, heads)
                    yield name, tensor

    return Checkpoint(folder, args, config.get("max_position_embeddings"), tied, tensors,
                      n_tensors=sum(map(len, keys.values())), size=sum(f.stat().st_size for f in files),
                      tokenizer_file=_tokenizer_beside(folder))


# --- Meta folders --------------------------------------------------------------------------------

def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_folder(folder: Path) -> Checkpoint:
    where = folder / "params.json"
    params = _read_json(where)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder} has params.json but no consolidated.*.pth weights; add them")
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{where}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    dim = _number(params, "dim", where)
    n_heads = _number(params, "n_heads", where)
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = _number(params, "ffn_dim_multiplier", where, kind=float)
    loaded = []
    for shard in shards:
        try:  # weights_only: a .pth is a pickle, and a pickle can run code; this refuses anything but tensors
            loaded.append(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CheckpointError(f"{shard} is not a readable weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(loaded[-1], dict):
            raise CheckpointError(f"{shard} does not hold a state dict")
    first = loaded[0]
    if "output.weight" not in first:
        raise CheckpointError(f"{shards[0]} has no output.weight; is it a Llama checkpoint?")
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:  # Meta's Llama 2 files say -1: read it off the weights
        vocab_size = sum(sd["output.weight"].shape[0] for sd in loaded)
    args = dict(
        dim=dim,
        n_layers=_number(params, "n_layers", where),
        n_heads=n_heads,
        n_kv_heads=_number(params, "n_kv_heads", where, n_heads),
        vocab_size=vocab_size,
        hidden_dim=meta_hidden_dim(dim, _number(params, "multiple_of", where, 256), multiplier),
        norm_eps=_number(params, "norm_eps", where, 1e-5, kind=float),
        rope_theta=_number(params, "rope_theta", where, 10000.0, kind=float),
    )
    head_dim = dim // n_heads

    def full_shape(name):
        if name in ("tok_embeddings.weight", "output.weight"):
            return (vocab_size, dim)
        kind = name.split(".")[-2]
        return {
            "wq": (n_heads * head_dim, dim), "wk": (args["n_kv_heads"] * head_dim, dim),
            "wv": (args["n_kv_heads"] * head_dim, dim), "wo": (dim, n_heads * head_dim),
            "w1": (args["hidden_dim"], dim), "w3": (args["hidden_dim"], dim), "w2": (dim, args["hidden_dim"]),
        }.get(kind, (dim,))

    # Under torchrun with as many ranks as shards, each rank takes its own shard where it was cut
    # the way this model splits (mmap: the others are never read).
    same_split = parallel.world_size() == len(loaded) > 1

    def tensors():
        for name in first:
            if name == "rope.freqs":  # Meta's precomputed RoPE table; recomputed here
                continue
            try:
                parts = [sd[name] for sd in loaded]
            except KeyError:
                raise CheckpointError(f"{folder}: {name} is missing from some consolidated.*.pth shards") from None
            dim = _shard_dim(name, parts, full_shape(name), folder)
            if dim is None:
                yield name, parts[0]
            elif same_split and dim == parallel.split_dim(name):
                yield name, parts[parallel.rank()]  # this rank's part as saved: the other shards stay unread
            else:
                yield name, torch.cat(parts, dim=dim)

    return Checkpoint(folder, args, None, False, tensors, n_tensors=len(first),
                      size=sum(s.stat().st_size for s in shards), tokenizer_file=_tokenizer_beside(folder))


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
    raise CheckpointError(f"{folder}: the shards of {name} ({[tuple(p.shape) for p in parts]}) do not make its shape {tuple(full)}")
