"""Other formats' tensors as Meta's: their names mapped to Meta's, and Q/K rows stored for
rotate-half RoPE (Hugging Face, GGUF qwen2) put back in Meta's adjacent pairs."""

import re

import torch

from ..errors import CheckpointError

# GGUF tensor names -> Meta's. Per-block names sit under blk.N. / layers.N.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_BLOCK_NAMES = {
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
_GGUF_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_BIASED = ("attention.wq", "attention.wk", "attention.wv")  # Qwen2's q/k/v biases; no other tensor has one


def meta_name(name: str, global_names=_GGUF_GLOBAL_NAMES, block_tensor=_GGUF_BLOCK_TENSOR, block_names=_GGUF_BLOCK_NAMES):
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


def rotate_half_to_pairs(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int, where: str) -> torch.Tensor:
    """A Meta-named tensor of a checkpoint stored for rotate-half RoPE (Hugging Face, GGUF qwen2),
    with Q and K rows (weights and biases) back in Meta's pairs; every other tensor as it is."""
    kind = name.split(".")[-2]
    if kind not in ("wq", "wk"):
        return tensor
    heads = n_heads if kind == "wq" else n_kv_heads
    if tensor.dim() not in (1, 2) or tensor.shape[0] % (2 * heads):
        raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, which does not fit {heads} heads")
    return hf_to_meta_rows(tensor, heads)
