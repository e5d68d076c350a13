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


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k=None, generator=None) -> torch.Tensor:
    """One token id per row of `logits` (bsz, vocab): greedy at temperature 0, else from
    softmax(logits / temperature) cut to the `top_k` likeliest, then to the smallest set of them
    whose probability reaches `top_p` (the likeliest token is always kept)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        probs_sorted, order = torch.topk(probs, top_k, dim=-1)  # sorted, likeliest first
    else:
        probs_sorted, order = torch.sort(probs, dim=-1, descending=True)
    if top_p < 1:
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)  # renormalises itself
    return torch.gather(order, -1, choice).squeeze(-1)
