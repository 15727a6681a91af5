"""NTK-Attention (spec ntk.md, section 4.5): the prefix summaries stand for an explicit prefix."""

from __future__ import annotations

import pytest
import torch

import subq
from subq.ops import ntk
from subq.ops.ntk import feature_map, ntk_attention, prefix_summaries

from ..helpers import random_qkv, rel_rms


def _explicit_prefix_attention(q, k, v, prefix_keys, prefix_values, causal):
    """Attention over [prefix; input]: phi(q).phi(k_p) scores on the prefix (always visible),
    exp(q.k/sqrt(d)) on the input (causal mask on the input part only)."""
    d = q.shape[-1]
    input_scores = torch.exp(q @ k.transpose(-1, -2) / d ** 0.5)
    if causal:
        input_scores = input_scores.tril()
    prefix_scores = feature_map(q) @ feature_map(prefix_keys).transpose(-1, -2)
    scores = torch.cat([prefix_scores, input_scores], dim=-1)
    values = torch.cat([prefix_values, v], dim=-2)
    return (scores @ values) / scores.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
def test_summaries_equal_an_explicit_long_prefix(causal):
    q, k, v = random_qkv(batch=2, q_heads=3, kv_heads=3, lq=40, dim=16, value_dim=8)
    prefix = torch.randn(2, 1, 1000, 24, dtype=torch.float64)
    w_k = torch.randn(3, 24, 16, dtype=torch.float64) / 24 ** 0.5
    w_v = torch.randn(3, 24, 8, dtype=torch.float64) / 24 ** 0.5
    prefix_keys, prefix_values = prefix @ w_k, prefix @ w_v  # (2, 3, 1000, d)
    z, kz = prefix_summaries(prefix_keys, prefix_values)
    out = subq.attention(q, k, v, method="ntk", causal=causal, z=z, kz=kz)
    expected = _explicit_prefix_attention(q, k, v, prefix_keys, prefix_values, causal)
    assert (out - expected).abs().max() <= 1e-12
    # The prefix matters: plain softmax attention is far from it.
    assert rel_rms(expected, subq.attention(q, k, v, causal=causal)) > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_zero_summaries_are_softmax_attention(causal):
    q, k, v = random_qkv(lq=700, dim=16)  # more rows than one query block
    zeros = {"z": torch.zeros(1, 4, 16, 16, dtype=q.dtype), "kz": torch.zeros(1, 4, 16,
                                                                               dtype=q.dtype)}
    expected = subq.attention(q, k, v, method="dense", causal=causal)
    for options in ({}, zeros):
        out = subq.attention(q, k, v, method="ntk", causal=causal, **options)
        assert rel_rms(expected, out) <= 1e-14


def test_output_is_a_convex_combination():
    """With phi > 0 the weights (prefix mass included) are positive and sum to 1: with every
    value and the prefix mean set to a constant c, the output is c."""
    q, k, _ = random_qkv(lq=30, dim=8)
    c = torch.randn(()).double()
    v = torch.full((2, 2, 30, 5), float(c), dtype=torch.float64)
    kz = torch.rand(2, 4, 8, dtype=torch.float64) * 50
    z = kz.abs()[..., None] * c * torch.ones(5, dtype=torch.float64)
    out = subq.attention(q, k, v, method="ntk", causal=True, z=z, kz=kz)
    assert torch.allclose(out, torch.full_like(out, float(c)), atol=1e-12)


def test_blocked_path_matches_reference_across_blocks():
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=1100, lk=900, dim=16,
                         dtype=torch.float32)
    z = torch.randn(1, 2, 16, 16) * 10
    kz = torch.randn(1, 1, 16) * 30
    for causal in (False, True):
        out = ntk_attention(q, k, v, causal=causal, cross=True, z=z, kz=kz)
        ref = subq.reference(q, k, v, method="ntk", causal=causal, z=z, kz=kz)
        assert rel_rms(ref, out) <= 1e-5


def test_key_only_prefix_mass_with_all_keys_padded():
    """A query whose input keys are all padding still sees the prefix: out = phi(q)Z/phi(q)|k|."""
    q, k, v = random_qkv(batch=1, lq=6, dim=8)
    z, kz = torch.randn(1, 4, 8, 8, dtype=q.dtype), torch.randn(1, 4, 8, dtype=q.dtype)
    mask = torch.ones(1, 6, dtype=torch.bool)
    out = subq.attention(q, k, v, method="ntk", key_padding_mask=mask, z=z, kz=kz)
    phi = feature_map(q)
    expected = (phi @ z) / (phi @ kz.abs()[..., None])
    assert rel_rms(expected, out) <= 1e-12


@pytest.mark.parametrize("name, bad", [("z", torch.zeros(1, 4, 8, 7)),
                                       ("kz", torch.zeros(3, 4, 8)),
                                       ("kz", torch.zeros(1, 4, 8, 1))])
def test_bad_summaries_raise(name, bad):
    q, k, v = random_qkv(lq=5, dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=name):
        subq.attention(q, k, v, method="ntk", **{name: bad})


def test_gradients_reach_the_summaries():
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=6, dim=4)
    z = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    kz = (torch.rand(1, 2, 4, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, kz: ntk_attention(q, k, v, causal=True, z=z, kz=kz), (z, kz))


def test_training_keeps_no_score_matrix():
    """With gradients the fused form saves only O(L) tensors for the backward (inputs, the
    output, log-sum-exps), never a block of the L x L scores (issue 22): the backward is the
    fused kernel's own, and its gradients are the reference's."""
    length, heads, dim = 1024, 2, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, length, dim, generator=g, requires_grad=True)
               for _ in range(3))
    z = (0.1 * torch.randn(1, heads, dim, dim, generator=g)).requires_grad_()
    kz = (0.1 * torch.randn(1, heads, dim, generator=g)).requires_grad_()
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = subq.attention(q, k, v, method="ntk", causal=True, z=z, kz=kz)
    assert max(sizes) <= heads * length * dim
    grads = torch.autograd.grad(out, (q, k, v, z, kz), torch.ones_like(out))
    ref = torch.autograd.grad(ntk.reference(q, k, v, causal=True, z=z, kz=kz), (q, k, v, z, kz),
                              torch.ones_like(out))
    for name, a, b in zip(["q", "k", "v", "z", "kz"], grads, ref, strict=True):
        assert rel_rms(b, a) <= 1e-5, name
