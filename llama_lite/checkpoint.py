"""Checkpoint files to model arguments and a Meta-named state dict; the default model's fetch.

GGUF is read with gguf-py's memory-mapping `GGUFReader` and dequantized with `gguf.quants`, the
same code llama.cpp's own Python tools use, so every tensor type it knows loads without a
hand-written dequantizer here.
"""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that is corrupt, truncated or of an unsupported kind."""


# --- GGUF ----------------------------------------------------------------------------------------

def open_gguf(path) -> "gguf.GGUFReader":
    """A memory-mapped GGUF reader, or a one-line CheckpointError if the file is not a readable GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf checkpoint")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors... on damaged files
        raise CheckpointError(f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); download it again") from None


_MISSING = object()


def gguf_field(reader, key: str, default=_MISSING):
    """The Python value of metadata `key` (str, int, float, bool or list)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{reader.data.filename}: metadata {key!r} is missing; the file is not a complete GGUF model")
        return default
    return field.contents()


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


def _meta_name(gguf_name: str):
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def gguf_model_args(reader) -> dict:
    """ModelArgs fields from `llama.*` metadata (no cache sizes)."""
    path = reader.data.filename
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; llama_lite runs 'llama' GGUF models")

    def positive_int(key, default=_MISSING):
        value = gguf_field(reader, f"llama.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
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
        norm_eps=float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        vocab_size=positive_int("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens", []))),
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


def gguf_state_dict(reader, progress: bool = False) -> dict:
    """Meta-named float32 tensors, dequantized one by one; output tied to the embedding if absent."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    path = reader.data.filename
    state = {}
    for t in tqdm(reader.tensors, desc="loading", unit="tensor", disable=not progress, leave=False, file=sys.stderr):
        name = _meta_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r}; this llama variant is not supported")
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        # ggml lists dimensions fastest-first; torch wants them slowest-first: (out, in) for a weight.
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if not array.flags.writeable:  # a view of the read-only memory map
            array = array.copy()
        state[name] = torch.from_numpy(array)
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # tied: the same tensor, not a copy
    return state
