"""Pure functions from next-token logits to token ids."""

import torch


def check_sampling(temperature, top_p, top_k) -> None:
    """Raise ValueError for sampling settings that mean nothing, before any work is done."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1, or None for no limit; got {top_k!r}")


# Top-p first looks among this many likeliest tokens: finding them with topk costs ~0.6 ms for 8 rows of
# 49k, sorting the whole vocabulary ~14 ms (on 2 cores), and a nucleus rarely reaches past a few hundred.
TOP_P_CANDIDATES = 256


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k=None, generator=None) -> torch.Tensor:
    """One token id per row of `logits` (bsz, vocab): greedy at temperature 0, else from
    softmax(logits / temperature) cut to the `top_k` likeliest, then to the smallest set of them
    whose probability reaches `top_p` (the likeliest token is always kept)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    k = vocab if top_k is None else min(top_k, vocab)
    if top_p >= 1 and k == vocab:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    probs_sorted, order = torch.topk(probs, min(k, TOP_P_CANDIDATES) if top_p < 1 else k, dim=-1)  # likeliest first
    if probs_sorted.shape[-1] < k and not bool((probs_sorted.sum(-1) >= top_p).all()):
        # A flat distribution whose nucleus lies beyond the candidates: rank all k after all.
        probs_sorted, order = torch.topk(probs, k, dim=-1)
    if top_p < 1:
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)  # renormalises itself
    return torch.gather(order, -1, choice).squeeze(-1)
