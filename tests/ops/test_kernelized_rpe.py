"""Kernelized attention with RPE (subq/ops/kernelized_rpe.py) beyond the contract: the FFT
path against the O(L^2) reference with drawn features, b = 0 against plain kernelized
attention, unbiasedness of the features, the softmax limit, gradients of the bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subq
from subq.ops.feature_maps import draw_projection, random_features

from ..helpers import random_qkv, rel_rms

CASES = [(False, None), (True, None), (False, True), (True, True)]  # (causal, cross)


@pytest.mark.parametrize("causal, cross", CASES)
@pytest.mark.parametrize("options", [{}, {"feature_map": "trf"}, {"normalize": False},
                                     {"num_features": 8, "seed": 7}])
def test_fft_path_equals_reference_with_seeded_features(causal, cross, options):
    q, k, v = random_qkv(lq=70, lk=95 if cross else 70, value_dim=12)
    bias = torch.randn(q.shape[1], q.shape[2] + k.shape[2] - 1, dtype=torch.float64)
    kwargs = dict(method="kernelized_rpe", causal=causal, cross=cross, bias=bias, **options)
    ref = subq.reference(q, k, v, **kwargs)
    assert rel_rms(ref, subq.attention(q, k, v, **kwargs)) <= 1e-10


def test_shared_bias_broadcasts_over_heads():
    q, k, v = random_qkv(lq=50)
    bias = torch.randn(99, dtype=torch.float64)
    out = subq.attention(q, k, v, method="kernelized_rpe", bias=bias)
    per_head = subq.attention(q, k, v, method="kernelized_rpe", bias=bias.expand(4, 99))
    assert rel_rms(per_head, out) <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_zero_bias_is_plain_kernelized_attention(causal):
    q, k, v = random_qkv(lq=90)
    zero = torch.zeros(q.shape[1], 179, dtype=torch.float64)
    fft = subq.attention(q, k, v, method="kernelized_rpe", causal=causal, bias=zero)
    linear_path = subq.attention(q, k, v, method="kernelized_rpe", causal=causal)
    assert rel_rms(linear_path, fft) <= 1e-10
    # phi(Q) (phi(K)^T V) / phi(Q) sum phi(K), written out, with the same seed-0 features.
    w = draw_projection(32, 16, 0, dtype=torch.float64, device="cpu")
    pq = random_features(F.normalize(q, dim=-1), w, "prf")
    pk = random_features(F.normalize(k, dim=-1), w, "prf").repeat_interleave(2, 1)
    vv = v.repeat_interleave(2, 1)
    if causal:
        a = (pq @ pk.transpose(-1, -2)).tril()
        expected = (a @ vv) / a.sum(-1, keepdim=True)
    else:
        expected = (pq @ (pk.transpose(-1, -2) @ vv)) / (pq @ pk.sum(2)[..., None])
    assert rel_rms(expected, linear_path) <= 1e-12


def test_seed_fixes_the_draw():
    q, k, v = random_qkv(lq=30)
    a = subq.attention(q, k, v, method="kernelized_rpe", seed=3)
    assert torch.equal(a, subq.attention(q, k, v, method="kernelized_rpe", seed=3))
    assert rel_rms(a, subq.attention(q, k, v, method="kernelized_rpe", seed=4)) > 1e-3
    w = draw_projection(32, 16, 3, dtype=torch.float64, device="cpu")
    assert torch.equal(a, subq.attention(q, k, v, method="kernelized_rpe", projection=w))


def test_positive_features_are_unbiased_on_unit_vectors():
    """E_w[phi(q) . phi(k)] = exp(q . k): the ratio estimate / exact averages to 1 over pairs
    (seeded draw, m = 4096), and its spread shrinks like m^-1/2 (Lemma 2)."""
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(64, 64, generator=generator, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(64, 64, generator=generator, dtype=torch.float64), dim=-1)
    y[:8] = x[:8]  # some pairs with q . k = 1
    exact = torch.exp((x * y).sum(-1))

    def ratio(m):
        w = torch.randn(m, 64, generator=generator, dtype=torch.float64)
        return (random_features(x, w, "prf") * random_features(y, w, "prf")).sum(-1) / exact

    many, few = ratio(4096), ratio(64)
    assert abs(many.mean() - 1) <= 0.05
    assert (many - 1).pow(2).mean().sqrt() < (few - 1).pow(2).mean().sqrt() / 4


def test_many_features_approach_softmax_with_bias():
    """NPRF + RPE -> softmax(q^ . k^ + b_{j-i}) as m grows."""
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=2, lq=24, dim=8)
    bias = 2 * torch.randn(2, 47, dtype=torch.float64)
    i, j = torch.arange(24)[:, None], torch.arange(24)[None, :]
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) + bias[:, j - i + 23]
    softmax = torch.softmax(logits, dim=-1) @ v
    approx = subq.attention(q, k, v, method="kernelized_rpe", bias=bias, num_features=8192)
    coarse = subq.attention(q, k, v, method="kernelized_rpe", bias=bias, num_features=4)
    assert rel_rms(softmax, approx) <= 0.05
    assert rel_rms(softmax, approx) < rel_rms(softmax, coarse)


def test_gradients_reach_the_bias():
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=9, dim=4)
    bias = torch.randn(2, 17, dtype=torch.float64, requires_grad=True)

    def fn(bias):
        return subq.attention(q, k, v, method="kernelized_rpe", causal=True, bias=bias,
                              num_features=6)

    assert torch.autograd.gradcheck(fn, (bias,))


def test_bad_bias_and_projection_shapes_raise():
    q, k, v = random_qkv(lq=10)
    with pytest.raises(ValueError, match="bias"):
        subq.attention(q, k, v, method="kernelized_rpe", bias=torch.zeros(4, 18))
    with pytest.raises(ValueError, match="bias"):
        subq.attention(q, k, v, method="kernelized_rpe", bias=torch.zeros(3, 19))
    with pytest.raises(ValueError, match="projection"):
        subq.attention(q, k, v, method="kernelized_rpe", projection=torch.zeros(8, 15))
