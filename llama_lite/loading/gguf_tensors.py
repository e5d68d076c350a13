"""GGUF checkpoints: model arguments from `<architecture>.*` metadata, and the tensors under Meta's
names, dequantized to float32 or, for the names asked, kept as their Q4_0 / Q4_1 / Q8_0 blocks."""

from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import CheckpointError
from ..model.kernels import quantize_int8_rows
from ..model.rope import RopeScaling
from .checkpoint_types import Checkpoint, Int4Values, Int8Values
from .gguf_file import KEPT_TYPES, REQUIRED, dequantize, dequantized_rows, gguf_field, int4_values, open_gguf
from .meta_names import meta_name, rotate_half_to_pairs

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
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; "
                              f"llama_lite runs {' and '.join(map(repr, GGUF_ARCHITECTURES))} GGUF models")

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
        raise CheckpointError(f"{path}: RoPE scaling {kind!r} is not supported "
                              "(llama_lite reads 'linear' and rope_freqs.weight); use a model without it")
    factor = float(gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0, kind=float)) if kind == "linear" else 1.0
    if factor <= 0:  # llama.cpp reads a factor of 0 as none
        factor = 1.0
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    freq_factors = ()
    if freqs is not None:
        freq_factors = tuple(dequantize(freqs).flatten().tolist())
        if len(freq_factors) != head_dim // 2 or not all(f > 0 for f in freq_factors):
            raise CheckpointError(f"{path}: {ROPE_FREQS} holds {len(freq_factors)} values, "
                                  f"not {head_dim // 2} positive ones (one per rotary pair)")
    if factor == 1.0 and not freq_factors:
        return None
    return RopeScaling("linear", factor=factor, freq_factors=freq_factors)


def _gguf_tensors(reader, arch: str, args: dict, as_stored=frozenset(), dtype_of=None) -> Iterator:
    """(Meta name, tensor) for each tensor, one at a time: in dtype_of(name) (None: float32; torch.int8:
    Int8Values, quantized a few rows at a time), or for the names in `as_stored` the values as stored
    (Int4Values: Q4_0 / Q4_1 blocks)."""
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read with the metadata, into rope_scaling
            continue
        name = meta_name(t.name)
        if name is None:
            raise CheckpointError(f"{reader.path}: unexpected tensor {t.name!r}; this {arch} variant is not supported")
        try:
            if name in as_stored:
                tensor = Int4Values(*int4_values(t))
            elif dtype_of and dtype_of(name) == torch.int8:
                tensor = Int8Values(*quantize_int8_rows(dequantized_rows(t), t.shape))
            else:
                tensor = dequantize(t, dtype_of(name) if dtype_of else torch.float32)
        except NotImplementedError:
            raise CheckpointError(f"{reader.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  "which gguf cannot dequantize; convert the model to another type") from None
        reader.release(t)
        if arch in _ROTATE_HALF:
            tensor = _in_meta_pairs(name, tensor, args, f"{reader.path}: {t.name}")
        yield name, tensor


def _in_meta_pairs(name: str, tensor, args: dict, where: str):
    """rotate_half_to_pairs of a float tensor, or of each part of stored or quantized values (rows stay
    rows: per-row int8 commutes with the reordering)."""
    convert = lambda x: rotate_half_to_pairs(name, x, args["n_heads"], args["n_kv_heads"], where)  # noqa: E731
    return type(tensor)(*map(convert, tensor)) if isinstance(tensor, tuple) else convert(tensor)



def gguf_checkpoint(path: Path) -> Checkpoint:
    """A .gguf file's metadata, its tensors read on demand."""
    reader = open_gguf(path)
    args = gguf_model_args(reader)
    context_length = args.pop("context_length")
    names = {t.name for t in reader.tensors}
    arch = gguf_field(reader, "general.architecture")
    stored = {meta_name(t.name): KEPT_TYPES[t.tensor_type] for t in reader.tensors if t.tensor_type in KEPT_TYPES}
    return Checkpoint(path, args, context_length, tied="output.weight" not in names,
                      tensors=lambda as_stored=frozenset(), dtype_of=None: _gguf_tensors(reader, arch, args, as_stored, dtype_of),
                      n_tensors=len(names - {ROPE_FREQS}), size=path.stat().st_size, gguf_reader=reader,
                      stored={k: v for k, v in stored.items() if k is not None})
