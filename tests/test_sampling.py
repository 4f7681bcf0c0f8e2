"""Logit filters and CFG against plain reference implementations (sort each row, walk it in Python)."""

import math

import pytest
import torch

from mmgen_pytorch.guidance import cfg_combine, guide
from mmgen_pytorch.sampling import (filter_logits, sample_from_logits, top_k_filter,
                                    top_p_filter)


def reference_top_k(logits, k):
    out = logits.clone()
    if 0 < k < logits.shape[-1]:
        for row in out:
            kth = sorted(row.tolist(), reverse=True)[k - 1]
            row[row < kth] = -math.inf
    return out


def reference_top_p(logits, p):
    """Keep the most likely tokens while the mass *before* a token is <= p (HF's shift-right rule)."""
    out = torch.full_like(logits, -math.inf)
    for row, kept_row in zip(logits, out):
        probs = row.double().softmax(-1).tolist()
        mass = 0.0
        for position, index in enumerate(sorted(range(len(probs)), key=lambda i: -probs[i])):
            if position > 0 and mass > p:
                break
            kept_row[index] = row[index]
            mass += probs[index]
    return out


def random_logits(seed, rows=6, vocab=50, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("k", [0, 1, 2, 7, 49, 50, 80])
def test_top_k_matches_sorting_reference(k):
    for seed in range(4):
        logits = random_logits(seed)
        assert torch.equal(top_k_filter(logits, k), reference_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_sorting_reference(p):
    for seed in range(4):
        logits = random_logits(seed)
        assert torch.equal(top_p_filter(logits, p), reference_top_p(logits, p))


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[True, False, False]]


def test_filter_order_is_temperature_then_top_k_then_top_p():
    logits = random_logits(11)
    expected = reference_top_p(reference_top_k(logits / 1.7, 9), 0.8)
    assert torch.equal(filter_logits(logits, temperature=1.7, top_k=9, top_p=0.8), expected)


def test_sampling_respects_the_filters():
    logits = random_logits(3, rows=64)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_from_logits(logits, top_k=1, generator=generator), logits.argmax(-1))
    allowed = torch.isfinite(reference_top_p(reference_top_k(logits, 5), 0.7))
    for _ in range(20):
        tokens = sample_from_logits(logits, top_k=5, top_p=0.7, generator=generator)
        assert allowed.gather(1, tokens[:, None]).all()
    assert torch.equal(sample_from_logits(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, temperature=0.0), logits.argmax(-1))


def test_cfg_takes_conditional_rows_first():
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    torch.testing.assert_close(guide(torch.cat((cond, uncond)), 4.0), uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    with pytest.raises(ValueError, match="even count"):
        guide(torch.randn(3, 10), 2.0)


def reference_min_p(logits, min_p):
    out = logits.clone()
    for row in out:
        probs = [math.exp(v) for v in row.double().log_softmax(-1).tolist()]
        for index, prob in enumerate(probs):
            if prob < min_p * max(probs):
                row[index] = -math.inf
    return out


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 0.99])
def test_min_p_matches_reference(min_p):
    from mmgen_pytorch.sampling import min_p_filter
    logits = random_logits(3)
    assert torch.equal(min_p_filter(logits, min_p), reference_min_p(logits, min_p))
    assert torch.isfinite(min_p_filter(logits, min_p)).sum(-1).min() >= 1  # the top token always stays


def test_annotations_are_checked_at_call_time():
    """beartype + jaxtyping on the public helpers: a wrong dtype or type names the argument."""
    with pytest.raises(TypeError, match="logits"):
        top_k_filter(torch.ones(2, 5, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="k"):
        top_k_filter(torch.ones(2, 5), 2.5)
    with pytest.raises(TypeError, match="uncond"):
        cfg_combine(torch.ones(2, 5), torch.ones(2, 4), 2)  # shapes must agree
    assert torch.equal(cfg_combine(torch.ones(2), torch.zeros(2), 3), torch.full((2,), 3.0))  # an int scale is fine
