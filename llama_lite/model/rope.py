"""Rotary position embeddings: each checkpoint family's frequencies, their cos/sin tables, the rotation.

Plain RoPE turns pair i of a head by position * theta^(-2i/head_dim). Llama 3.1+ and long-context
fine-tunes stretch the slow frequencies so that positions past the training context still look
familiar; `RopeScaling` says how, and `inverse_frequencies` computes each kind the way its reference
does (same float32 steps as transformers), so the angles match it and not only the idea.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint divides its inverse frequencies.

    "linear": all by `factor`, then frequency i by freq_factors[i] if given (llama.cpp's form: its
    converter stores Llama 3's scaling as per-frequency divisors, tensor rope_freqs.weight).
    "llama3": frequencies with wavelengths longer than original_context / low_freq_factor by
    `factor`, those shorter than original_context / high_freq_factor not at all, a smooth blend
    between (transformers' rope_type "llama3", Meta's `apply_scaling`).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    freq_factors: tuple = ()


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None, device=None) -> torch.Tensor:
    """float32 (head_dim // 2,): the angle per position of each rotary pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
        return inv_freq / torch.tensor(scaling.freq_factors, device=device) if scaling.freq_factors else inv_freq
    # llama3, step for step as transformers' _compute_llama3_parameters
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > s.original_context / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < s.original_context / s.high_freq_factor) * ~(wavelen > s.original_context / s.low_freq_factor)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, scaling: Optional[RopeScaling] = None, device=None):
    """cos and sin of every (position, frequency) pair: two float32 (max_seq_len, head_dim // 2)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its token's position's angle.

    This is Meta's (and GGUF's) interleaved convention; Hugging Face checkpoints (and GGUF qwen2)
    store Q/K rows permuted for a rotate-half layout instead, which a loader must undo.
    x: (tokens, n_heads, head_dim); cos, sin: (tokens, 1, head_dim // 2).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (tokens, n_heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (tokens, n_heads, head_dim)
