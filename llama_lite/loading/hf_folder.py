"""Hugging Face checkpoint folders: config.json + *.safetensors, of the model types whose layers are
Llama's (Mistral adds a sliding window, Qwen2 q/k/v biases), read as transformers reads them."""

import re
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from ..model.rope import RopeScaling
from .checkpoint_types import Checkpoint
from .folder_config import positive_number, read_json, tokenizer_beside
from .meta_names import meta_name, rotate_half_to_pairs

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
        return RopeScaling("linear", factor=positive_number(scaling, "factor", where, kind=float))
    if kind == "llama3":
        low, high = (positive_number(scaling, f"{band}_freq_factor", where, kind=float) for band in ("low", "high"))
        if high <= low:
            raise CheckpointError(f"{where}: high_freq_factor {high} is not above low_freq_factor {low}; fix config.json")
        return RopeScaling("llama3", factor=positive_number(scaling, "factor", where, kind=float), low_freq_factor=low,
                           high_freq_factor=high, original_context=positive_number(
                               scaling, "original_max_position_embeddings", where, config.get("max_position_embeddings")))
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported "
                          "(llama_lite reads 'linear' and 'llama3'); use a model without it")


def _hf_sliding_window(config: dict, n_layers: int, where) -> Optional[int]:
    """The attention window transformers puts on any layer of this config; None: every layer sees all keys."""
    if config.get("model_type") == "qwen2" and not config.get("use_sliding_window"):
        return None  # Qwen2 configs name a window they do not use unless use_sliding_window
    types = config.get("layer_types")
    if isinstance(types, list) and "sliding_attention" not in types:
        return None
    if not isinstance(types, list) and config.get("model_type") == "qwen2" and config.get("max_window_layers", 0) >= n_layers:
        return None  # Qwen2 slides from layer max_window_layers on
    return None if config.get("sliding_window") is None else positive_number(config, "sliding_window", where)


def _check_llama_layers(config: dict, dim: int, n_heads: int, where: Path) -> None:
    """Refuse a config whose layers differ from Llama's in a way the model cannot reproduce."""
    if config.get("head_dim", dim // n_heads) != dim // n_heads or dim % n_heads:
        raise CheckpointError(f"{where}: head_dim {config.get('head_dim')} differs from "
                              "hidden_size / num_attention_heads; not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true; llama_lite's Llama has no biases (only Qwen2's q/k/v ones)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")


def _hf_model_args(config: dict, where: Path) -> dict:
    """ModelArgs fields (no cache sizes) from a config.json, checked."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; "
                              f"llama_lite runs {', '.join(map(repr, HF_MODEL_TYPES))} models")
    dim = positive_number(config, "hidden_size", where)
    n_heads = positive_number(config, "num_attention_heads", where)
    n_kv_heads = positive_number(config, "num_key_value_heads", where, n_heads)
    n_layers = positive_number(config, "num_hidden_layers", where)
    _check_llama_layers(config, dim, n_heads, where)
    rope = config.get("rope_parameters") or {}
    return dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=positive_number(config, "vocab_size", where),
        hidden_dim=positive_number(config, "intermediate_size", where),
        norm_eps=positive_number(config, "rms_norm_eps", where, 1e-6, kind=float),
        rope_theta=positive_number(config, "rope_theta", where, rope.get("rope_theta", 10000.0), kind=float),
        rope_scaling=_hf_rope_scaling(config, where),
        qkv_bias=model_type == "qwen2",
        sliding_window=_hf_sliding_window(config, n_layers, where),
    )


def _safetensors_keys(folder: Path) -> dict:
    """Each weights file of the folder (by its index if there is one) -> the tensor names it holds."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; fix or replace it")
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has config.json but no *.safetensors weights "
                              "(pickled .bin files are not read); add them")
    keys = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys[file] = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    return keys


def _safetensors_tensors(keys: dict, args: dict, tied: bool, model_type):
    """(Meta name, tensor) for every tensor of the files, one at a time, Q/K rows in Meta's pairs."""
    from safetensors import safe_open

    for file, file_keys in keys.items():
        with safe_open(str(file), framework="pt") as f:
            for key in file_keys:
                name = meta_name(key, _HF_GLOBAL_NAMES, _HF_BLOCK_TENSOR, _HF_BLOCK_NAMES)
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
                yield name, rotate_half_to_pairs(name, tensor, args["n_heads"], args["n_kv_heads"], f"{file}: {key}")


def hf_folder(folder: Path) -> Checkpoint:
    """A Hugging Face folder's config and weights table; its tensors read on demand."""
    where = folder / "config.json"
    config = read_json(where)
    args = _hf_model_args(config, where)
    tied = bool(config.get("tie_word_embeddings", False))
    keys = _safetensors_keys(folder)

    def tensors(as_stored=frozenset(), dtype_of=None):  # nothing is stored quantized in these files; float32
        return _safetensors_tensors(keys, args, tied, config.get("model_type"))

    return Checkpoint(folder, args, config.get("max_position_embeddings"), tied, tensors,
                      n_tensors=sum(map(len, keys.values())), size=sum(f.stat().st_size for f in keys),
                      tokenizer_file=tokenizer_beside(folder))
