"""Sampling: greedy, temperature, top-k and top-p, checked against the distributions they promise."""

import math

import pytest
import torch

from llama_lite.engine.sampling import check_sampling, sample


def draws(logits, n=4000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    batch = logits.expand(n, -1)
    return sample(batch, generator=g, **kw)


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, 0, 0.9), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.5, 1.0, top_k=1), logits.argmax(-1))


def test_temperature_follows_softmax():
    """softmax([2, 1, .5]) is [.63, .23, .14] at temperature 1; temperature 2 flattens it."""
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    for temperature in (1.0, 2.0, 0.5):
        want = torch.softmax(logits[0] / temperature, -1)
        got = torch.bincount(draws(logits, n=20000, temperature=temperature, top_p=1.0), minlength=3) / 20000
        assert (got - want).abs().max().item() < 0.02, (temperature, got, want)
    assert torch.allclose(torch.softmax(logits[0], -1), torch.tensor([0.63, 0.23, 0.14]), atol=0.01)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # 0.5 + 0.3 reaches 0.8: tokens 0 and 2 only.
    assert set(draws(logits, temperature=1.0, top_p=0.8).tolist()) == {0, 2}
    # Just past 0.8 the third (0.15) is needed as well.
    assert set(draws(logits, temperature=1.0, top_p=0.81).tolist()) == {0, 2, 3}
    # The top token is always kept, however small p is.
    assert set(draws(logits, temperature=1.0, top_p=1e-6).tolist()) == {0}
    # Within the kept set, probabilities are renormalised: 0.5/0.8 and 0.3/0.8.
    got = draws(logits, n=20000, temperature=1.0, top_p=0.8)
    assert abs((got == 0).float().mean().item() - 0.625) < 0.02


def test_top_k_limits_then_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, 2.5]])
    assert set(draws(logits, temperature=5.0, top_p=1.0, top_k=2).tolist()) == {1, 4}
    assert set(draws(logits, temperature=1.0, top_p=1e-6, top_k=3).tolist()) == {1}
    # top_k larger than the vocabulary keeps everything
    assert set(draws(logits, temperature=100.0, top_p=1.0, top_k=10).tolist()) == {0, 1, 2, 3, 4}


def test_seeded_sampling_repeats():
    logits = torch.randn(8, 500)
    a = sample(logits, 1.0, 0.95, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, 0.95, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "temperature, top_p, top_k, message",
    [
        (-0.1, 0.9, None, "temperature"),
        (math.nan, 0.9, None, "temperature"),
        ("hot", 0.9, None, "temperature"),
        (0.6, 0.0, None, "top_p"),
        (0.6, 1.01, None, "top_p"),
        (0.6, -1, None, "top_p"),
        (0.6, 0.9, 0, "top_k"),
        (0.6, 0.9, 2.5, "top_k"),
    ],
)
def test_bad_settings_are_refused(temperature, top_p, top_k, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(temperature, top_p, top_k)


def nucleus_frequencies(logits, temperature, top_p):
    """The reference: sort the whole vocabulary, keep the smallest prefix reaching top_p, renormalise."""
    probs = torch.softmax(logits[0] / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    want = torch.zeros_like(probs)
    want[order[keep]] = sorted_probs[keep] / sorted_probs[keep].sum()
    return want


@pytest.mark.parametrize("scale", [4.0, 0.05])  # a peaked row (nucleus in the candidates) and a flat one (beyond them)
def test_top_p_candidates_match_a_full_sort(scale):
    from llama_lite.engine.sampling import TOP_P_CANDIDATES

    logits = torch.randn(1, 3000, generator=torch.Generator().manual_seed(3)) * scale
    want = nucleus_frequencies(logits, 0.8, 0.9)
    n_kept = int((want > 0).sum())
    assert (n_kept < TOP_P_CANDIDATES) == (scale > 1)  # both paths are exercised
    got = torch.bincount(draws(logits, n=40000, temperature=0.8, top_p=0.9), minlength=3000).float() / 40000
    assert got[want == 0].sum() == 0  # nothing outside the nucleus
    assert (got - want).abs().max() < 0.01
    if scale < 1:  # flat: draws reach ranks far past the candidates
        ranks = torch.argsort(torch.argsort(logits[0], descending=True))
        assert ranks[got > 0].max() > 2 * TOP_P_CANDIDATES
