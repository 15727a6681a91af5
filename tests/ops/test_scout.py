"""SCOUT's spec tests (specs/scout.md): S = 1 is dense causal attention, row i sees
floor(i/S) + 1 keys, the fast path (rows regrouped by their offset in the segment, the self
term on an extra coordinate) equals the checkpoint-mask reference for whole and partial last
segments, in values and gradients, and the decode cache holds only the checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import subq
from subq.ops import scout

from ..helpers import random_qkv, rel_rms


def test_segment_one_is_dense_causal():
    q, k, v = random_qkv(lq=97)
    out = subq.attention(q, k, v, method="scout", causal=True, segment=1)
    dense = subq.attention(q, k, v, method="dense", causal=True)
    assert rel_rms(dense, out) <= 1e-12


@pytest.mark.parametrize("segment", [3, 10])
def test_support_is_self_and_earlier_checkpoints(segment):
    q, k, _ = random_qkv(lq=50)
    a = subq.weights(q, k, method="scout", causal=True, segment=segment)
    support = a > 0
    rows = torch.arange(50)
    assert torch.equal(support.sum(-1), (rows // segment + 1).expand(2, 4, 50))
    assert support[..., rows, rows].all()
    j = torch.arange(50)
    off_diagonal = support & ~torch.eye(50, dtype=torch.bool)
    assert not off_diagonal[..., (j % segment) != segment - 1].any()
    assert torch.allclose(a.sum(-1), torch.ones(2, 4, 50, dtype=a.dtype))


@pytest.mark.parametrize("segment, length", [(3, 600), (16, 777), (256, 700), (700, 600)])
def test_fast_equals_reference_with_partial_segments(segment, length):
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=length, dim=8)
    out = subq.attention(q, k, v, method="scout", causal=True, segment=segment)
    ref = subq.reference(q, k, v, method="scout", causal=True, segment=segment)
    assert rel_rms(ref, out) <= 1e-10


def test_key_padding_hides_checkpoints_and_selves():
    q, k, v = random_qkv(batch=2, q_heads=2, kv_heads=1, lq=530, dim=8)
    mask = torch.rand(2, 530) < 0.4
    out = subq.attention(q, k, v, method="scout", causal=True, segment=5, key_padding_mask=mask)
    ref = subq.reference(q, k, v, method="scout", causal=True, segment=5, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert rel_rms(ref, out) <= 1e-10


@pytest.mark.parametrize("segment, length", [(5, 53), (1, 20), (8, 8), (6, 61)])
def test_gradients_equal_reference(segment, length):
    q, k, v = random_qkv(batch=2, q_heads=4, kv_heads=2, lq=length, dim=8, value_dim=5,
                         requires_grad=True)
    g = torch.randn(2, 4, length, 5, dtype=torch.float64)
    grads = {}
    for name in ("attention", "reference"):
        out = getattr(subq, name)(q, k, v, method="scout", causal=True, segment=segment)
        grads[name] = torch.autograd.grad(out, (q, k, v), g)
    for fast, ref in zip(grads["attention"], grads["reference"], strict=True):
        assert rel_rms(ref, fast) <= 1e-10


@pytest.mark.parametrize("self_gain", [40.0, -40.0])
def test_extreme_self_logits(self_gain):
    # q_i = +-40 k_i: the self weight is ~1 (or ~0, the checkpoints take all the mass), which
    # the fast path reads from the extra output column; it must stay exact at both ends.
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=2, lq=90, dim=8)
    q = self_gain * k + 0.1 * q
    out = subq.attention(q, k, v, method="scout", causal=True, segment=4)
    ref = subq.reference(q, k, v, method="scout", causal=True, segment=4)
    assert rel_rms(ref, out) <= 1e-10


def test_padding_before_any_visible_key_outputs_zero():
    q, k, v = random_qkv(batch=2, q_heads=2, kv_heads=1, lq=40, dim=8)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :23] = True  # rows 0..22 of batch 0 see only padding (checkpoints 3, 7, ..., 19)
    out = subq.attention(q, k, v, method="scout", causal=True, segment=4, key_padding_mask=mask)
    ref = subq.reference(q, k, v, method="scout", causal=True, segment=4,
                         key_padding_mask=mask)
    assert torch.equal(out[0, :, :23], torch.zeros_like(out[0, :, :23]))
    assert not out[0, :, 23:].eq(0).all(-1).any()
    assert rel_rms(ref, out) <= 1e-10


def test_segment_none_is_sqrt_length():
    q, k, v = random_qkv(lq=150)
    auto = subq.attention(q, k, v, method="scout", causal=True, segment=None)
    fixed = subq.attention(q, k, v, method="scout", causal=True,
                           segment=round(math.sqrt(150)))
    assert rel_rms(fixed, auto) <= 1e-14
    assert rel_rms(subq.reference(q, k, v, method="scout", causal=True, segment=None),
                   auto) <= 1e-10


@pytest.mark.parametrize("segment", [1, 4, 7])
def test_decode_cache_holds_only_checkpoints(segment):
    length = 45
    q, k, v = random_qkv(lq=length, value_dim=8)
    prefill = subq.attention(q, k, v, method="scout", causal=True, segment=segment)
    state = subq.init_state("scout", batch=2, kv_heads=2, head_dim=16, value_dim=8,
                            dtype=q.dtype, segment=segment)
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="scout", segment=segment)
        seen = t + 1
        assert state.keys.shape[2] == state.values.shape[2] == seen // segment
        assert torch.equal(state.keys, k[:, :, segment - 1:seen:segment])
        assert torch.equal(state.values, v[:, :, segment - 1:seen:segment])
        assert rel_rms(prefill[:, :, t:t + 1], out_t) <= 1e-10


def test_decoding_needs_a_fixed_segment():
    with pytest.raises(ValueError, match="segment"):
        subq.init_state("scout", batch=1, kv_heads=1, head_dim=4, segment=None)


def test_only_causal_self():
    q, k, v = random_qkv(lq=10)
    with pytest.raises(NotImplementedError, match="scout.*noncausal self"):
        subq.attention(q, k, v, method="scout", causal=False)


def test_checkpoint_mask_formula():
    s = 4
    m = scout.checkpoint_mask(13, s)
    for i in range(13):
        for j in range(13):
            assert bool(m[i, j]) == (j == i or (j < i and j % s == s - 1))
