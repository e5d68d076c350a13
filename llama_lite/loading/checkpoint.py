"""Checkpoints to model arguments and Meta-named tensors: GGUF files, Hugging Face folders
(config.json + safetensors) and Meta folders (params.json + consolidated.*.pth), of the families
that are Llama's layers with small additions: Llama 1-3.x (RoPE scaling), Mistral (a sliding
window) and Qwen2/2.5 (q/k/v biases). Anything else, or any variant the model cannot reproduce
exactly, is refused with a one-line CheckpointError.

`read_checkpoint` detects the format and reads only metadata; the returned `Checkpoint` then yields
one Meta-named tensor at a time, so the caller converts and places each before the next is read and
peak memory stays near the final weights' size. GGUF is parsed by `gguf_file.GGUFFile` (a memory
map) and dequantized with `gguf.quants` (every type llama.cpp's Python tools know, no
hand-written dequantizer); safetensors with `safetensors`; .pth with `torch.load(weights_only=True)`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from ..errors import CheckpointError
from ..model import parallel
from ..model.rope import RopeScaling
from .gguf_file import KEPT_TYPES, REQUIRED, dequantize, gguf_field, kept_values, open_gguf

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
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_BIASED = ("attention.wq", "attention.wk", "attention.wv")  # Qwen2's q/k/v biases; no other tensor has one


def _meta_name(name: str, global_names=_GLOBAL_NAMES, block_tensor=_BLOCK_TENSOR, block_names=_BLOCK_NAMES):
    """A checkpoint's tensor name as Meta's (GGUF names by default; HF passes its own tables), or None."""
    if name in global_names:
        return global_names[name]
    m = block_tensor.fullmatch(name)
    if m and m.group(2) in block_names and (m.group(3) == "weight" or block_names[m.group(2)] in _BIASED):
        return f"layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_meta_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the Q/K row permutation Hugging Face's converter applies for its rotate-half RoPE (of a
    weight or a bias: rows are what moves).

    In each head HF stores the first element of every rotary pair, then every second element;
    Meta (and this model) keeps each pair adjacent.
    """
    rows, rest = tensor.shape[0], tensor.shape[1:]
    head_dim = rows // n_heads
    # (n_heads, 2, head_dim // 2, *rest) -> (n_heads, head_dim // 2, 2, *rest) -> (rows, *rest)
    return tensor.view(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _rotate_half_to_pairs(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int, where: str) -> torch.Tensor:
    """A Meta-named tensor of a checkpoint stored for rotate-half RoPE (Hugging Face, GGUF qwen2),
    with Q and K rows (weights and biases) back in Meta's pairs; every other tensor as it is."""
    kind = name.split(".")[-2]
    if kind not in ("wq", "wk"):
        return tensor
    heads = n_heads if kind == "wq" else n_kv_heads
    if tensor.dim() not in (1, 2) or tensor.shape[0] % (2 * heads):
        raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, which does not fit {heads} heads")
    return hf_to_meta_rows(tensor, heads)


# GGUF architectures read. llama.cpp's converter permutes Q/K of "llama" (Llama, Mistral) into
# Meta's pairs; "qwen2" keeps Hugging Face's rotate-half rows (llama.cpp runs it with NEOX RoPE).
GGUF_ARCHITECTURES = ("llama", "qwen2")
_ROTATE_HALF = ("qwen2",)
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.1+)


def gguf_model_args(reader) -> dict:
    """ModelArgs fields from `<architecture>.*` metadata (no cache sizes), with the context length."""
    path = reader.path
    arch = gguf_field(reader, "general.architecture", kind=str)
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; llama_lite runs {' and '.join(map(repr, GGUF_ARCHITECTURES))} GGUF models")

    def positive_int(key, default=REQUIRED):
        value = gguf_field(reader, f"{arch}.{key}", default, kind=int)
        if value <= 0:
            raise CheckpointError(f"{path}: metadata {arch}.{key} = {value!r} is not a positive integer")
        return value

    n_heads = positive_int("attention.head_count")
    dim = positive_int("embedding_length")
    names = {t.name for t in reader.tensors}
    args = dict(
        dim=dim,
        n_layers=positive_int("block_count"),
        n_heads=n_heads,
        n_kv_heads=positive_int("attention.head_count_kv", n_heads),
        hidden_dim=positive_int("feed_forward_length"),
        norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, kind=float)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0, kind=float)),
        rope_scaling=_gguf_rope_scaling(reader, arch, dim // n_heads),
        qkv_bias="blk.0.attn_q.bias" in names,
        vocab_size=positive_int("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens", [], kind=list))),
        context_length=positive_int("context_length", 2048),
    )
    if dim % n_heads:
        raise CheckpointError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    rope_dims = gguf_field(reader, f"{arch}.rope.dimension_count", dim // n_heads)
    if rope_dims != dim // n_heads:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dims}) are not supported")
    return args


def _gguf_rope_scaling(reader, arch: str, head_dim: int) -> Optional[RopeScaling]:
    """RoPE scaling as llama.cpp applies it: a linear rope.scaling.factor and/or rope_freqs.weight."""
    path = reader.path
    kind = gguf_field(reader, f"{arch}.rope.scaling.type", "none", kind=str)
    if kind not in ("none", "linear"):
        raise CheckpointError(f"{path}: RoPE scaling {kind!r} is not supported (llama_lite reads 'linear' and rope_freqs.weight); use a model without it")
    factor = float(gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0, kind=float)) if kind == "linear" else 1.0
    if factor <= 0:  # llama.cpp reads a factor of 0 as none
        factor = 1.0
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    freq_factors = ()
    if freqs is not None:
        freq_factors = tuple(dequantize(freqs).flatten().tolist())
        if len(freq_factors) != head_dim // 2 or not all(f > 0 for f in freq_factors):
            raise CheckpointError(f"{path}: {ROPE_FREQS} holds {len(freq_factors)} values, not {head_dim // 2} positive ones (one per rotary pair)")
    if factor == 1.0 and not freq_factors:
        return None
    return RopeScaling("linear", factor=factor, freq_factors=freq_factors)


class Int4Values(NamedTuple):
    """A weight stored in 4 bits (GGUF Q4_0 / Q4_1), as it is: weight = q * scale + offset, with q
    (out, in) in 0..15 and scale, offset (out, in // 32) per group of 32."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


class Int8Values(NamedTuple):
    """A weight stored as int8 (GGUF Q8_0), as it is: weight = q * scale, with q (out, in) and scale
    (out, in // 32) per group of 32."""

    q: torch.Tensor
    scale: torch.Tensor


def _gguf_tensors(reader, arch: str, args: dict, keep=frozenset()) -> Iterator:
    """(Meta name, tensor) for each tensor, one at a time: float32, or for the names in `keep` the
    values as stored (Int4Values for Q4_0 / Q4_1, Int8Values for Q8_0)."""
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read with the metadata, into rope_scaling
            continue
        name = _meta_name(t.name)
        if name is None:
            raise CheckpointError(f"{reader.path}: unexpected tensor {t.name!r}; this {arch} variant is not supported")
        try:
            if name in keep:
                values = kept_values(t)
                tensor = (Int4Values if len(values) == 3 else Int8Values)(*values)
            else:
                tensor = dequantize(t)
        except NotImplementedError:
            raise CheckpointError(f"{reader.path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize; convert the model to another type") from None
        reader.release(t)
        if arch in _ROTATE_HALF:
            where = f"{reader.path}: {t.name}"
            convert = lambda x: _rotate_half_to_pairs(name, x, args["n_heads"], args["n_kv_heads"], where)  # noqa: E731
            tensor = type(tensor)(*map(convert, tensor)) if isinstance(tensor, tuple) else convert(tensor)
        yield name, tensor


# --- every format --------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What a checkpoint holds, read lazily: `tensors()` yields (Meta name, tensor) one at a time."""

    path: Path
    args: dict  # ModelArgs fields other than the cache sizes
    context_length: Optional[int]  # the longest sequence the model was trained for, if known
    tied: bool  # the output projection is the embedding (no output.weight is stored)
    tensors: Callable[..., Iterator]  # (keep=frozenset()) -> (Meta name, tensor, or stored values for names in keep)
    n_tensors: int
    size: int  # bytes on disk, to decide whether loading deserves a progress bar
    tokenizer_file: Optional[Path] = None  # the tokenizer beside the weights, if any
    gguf_reader: object = None  # a GGUF checkpoint's open reader: its vocabulary is the tokenizer
    stored: dict = field(default_factory=dict)  # Meta name -> "int4" / "int8": weights a GGUF holds in such blocks


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
    arch = gguf_field(reader, "general.architecture")
    stored = {_meta_name(t.name): KEPT_TYPES[t.tensor_type] for t in reader.tensors if t.tensor_type in KEPT_TYPES}
    return Checkpoint(path, args, context_length, tied="output.weight" not in names,
                      tensors=lambda keep=frozenset(): _gguf_tensors(reader, arch, args, keep),
                      n_tensors=len(names - {ROPE_FREQS}), size=path.stat().st_size, gguf_reader=reader,
                      stored={k: v for k, v in stored.items() if k is not None})


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
_HF_BLOCK_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Hugging Face model types read: Llama's layers; Mistral's add a sliding window, Qwen2's q/k/v biases.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _hf_rope_scaling(config: dict, where) -> Optional[RopeScaling]:
    """config.json's rope_scaling (transformers 5: rope_parameters) as transformers reads it; None: plain RoPE."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: rope_scaling {scaling!r} is not an object; fix or replace it")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    where = f"{where} rope_scaling"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=_number(scaling, "factor", where, kind=float))
    if kind == "llama3":
        low, high = (_number(scaling, f"{band}_freq_factor", where, kind=float) for band in ("low", "high"))
        if high <= low:
            raise CheckpointError(f"{where}: high_freq_factor {high} is not above low_freq_factor {low}; fix config.json")
        return RopeScaling("llama3", factor=_number(scaling, "factor", where, kind=float), low_freq_factor=low,
                           high_freq_factor=high, original_context=_number(
                               scaling, "original_max_position_embeddings", where, config.get("max_position_embeddings")))
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (llama_lite reads 'linear' and 'llama3'); use a model without it")


def _hf_sliding_window(config: dict, n_layers: int, where) -> Optional[int]:
    """The attention window transformers puts on any layer of this config; None: every layer sees all keys."""
    if config.get("model_type") == "qwen2" and not config.get("use_sliding_window"):
        return None  # Qwen2 configs name a window they do not use unless use_sliding_window
    types = config.get("layer_types")
    if isinstance(types, list) and "sliding_attention" not in types:
        return None
    if not isinstance(types, list) and config.get("model_type") == "qwen2" and config.get("max_window_layers", 0) >= n_layers:
        return None  # Qwen2 slides from layer max_window_layers on
    return None if config.get("sliding_window") is None else _number(config, "sliding_window", where)


def _hf_folder(folder: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    where = folder / "config.json"
    config = _read_json(where)
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; llama_lite runs {', '.join(map(repr, HF_MODEL_TYPES))} models")
    dim = _number(config, "hidden_size", where)
    n_heads = _number(config, "num_attention_heads", where)
    n_kv_heads = _number(config, "num_key_value_heads", where, n_heads)
    n_layers = _number(config, "num_hidden_layers", where)
    if config.get("head_dim", dim // n_heads) != dim // n_heads or dim % n_heads:
        raise CheckpointError(f"{where}: head_dim {config.get('head_dim')} differs from hidden_size / num_attention_heads; not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true; llama_lite's Llama has no biases (only Qwen2's q/k/v ones)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    rope = config.get("rope_parameters") or {}
    args = dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=_number(config, "vocab_size", where),
        hidden_dim=_number(config, "intermediate_size", where),
        norm_eps=_number(config, "rms_norm_eps", where, 1e-6, kind=float),
        rope_theta=_number(config, "rope_theta", where, rope.get("rope_theta", 10000.0), kind=float),
        rope_scaling=_hf_rope_scaling(config, where),
        qkv_bias=model_type == "qwen2",
        sliding_window=_hf_sliding_window(config, n_layers, where),
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

    def tensors(keep=frozenset()):  # nothing is kept quantized from these files
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in keys[file]:
                    name = _meta_name(key, _HF_GLOBAL_NAMES, _HF_BLOCK_TENSOR, _HF_BLOCK_NAMES)
                    if name is None:
                        if key.endswith("rotary_emb.inv_freq"):  # recomputed, not loaded
                            continue
                        raise CheckpointError(f"{file}: unexpected tensor {key!r}; this {model_type} variant is not supported")
                    if tied and name == "output.weight":
                        continue
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:  # safetensors raises its own errors for bad offsets
                        raise CheckpointError(f"{file}: tensor {key} cannot be read ({e}); download it again") from None
                    yield name, _rotate_half_to_pairs(name, tensor, n_heads, n_kv_heads, f"{file}: {key}")

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


def _meta_rope_scaling(params: dict, where) -> Optional[RopeScaling]:
    """Llama 3.1+'s use_scaled_rope as Meta's reference applies it: factor 8 and high_freq_factor 4
    unless params.json names others, low_freq_factor 1, original context 8192 (Llama 3.2 1B/3B
    files name no factor, and Meta's code then uses 8 where their Hugging Face config says 32)."""
    if not params.get("use_scaled_rope"):
        return None
    return RopeScaling("llama3", factor=_number(params, "rope_scaling_factor", where, 8.0, kind=float),
                       high_freq_factor=_number(params, "rope_high_freq_factor", where, 4.0, kind=float))


def _meta_folder(folder: Path) -> Checkpoint:
    where = folder / "params.json"
    params = _read_json(where)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder} has params.json but no consolidated.*.pth weights; add them")
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
        rope_scaling=_meta_rope_scaling(params, where),
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

    def tensors(keep=frozenset()):  # nothing is kept quantized from these files
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
