"""LiT linear attention (subq/ops/linear.py) beyond the contract: associativity, the chunked
causal form against the recurrence, causal cross, padding, half precision."""

from __future__ import annotations

import pytest
import torch

import subq
from subq.ops import linear
from subq.ops.feature_maps import deterministic_features

from ..helpers import random_qkv, rel_rms


def _explicit(q, k, v, feature_map="relu", causal=False):
    """``A = phi(Q) phi(K)^T`` (masked), divided by its row sums, times V; one head group."""
    pq = deterministic_features(q, feature_map, linear.DEFAULT_EPS)
    pk = deterministic_features(k, feature_map, linear.DEFAULT_EPS)
    a = pq @ pk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a / a.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("feature_map", ["relu", "elu1"])
def test_associative_form_equals_explicit_matrix(feature_map):
    q, k, v = random_qkv(q_heads=2, kv_heads=2, lq=150, dim=16, value_dim=8)
    out = subq.attention(q, k, v, method="linear", feature_map=feature_map)
    assert rel_rms(_explicit(q, k, v, feature_map), out) <= 1e-12


def test_range_trick_keeps_result_for_large_inputs():
    """The Lk^-1/2 scaling of phi(K) and V cancels; large values do not overflow float32."""
    q, k, v = random_qkv(q_heads=2, kv_heads=2, lq=1500, dim=16, dtype=torch.float64)
    q, k, v = q * 1e3, k * 1e3, v * 1e15
    out = subq.attention(q.float(), k.float(), v.float(), method="linear")
    assert torch.isfinite(out).all()
    assert rel_rms(_explicit(q, k, v), out) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 16, 64, 200])
def test_chunked_causal_equals_recurrence_and_reference(chunk):
    length = 77  # a multiple of none of the chunks
    q, k, v = random_qkv(lq=length, value_dim=12)
    out = subq.attention(q, k, v, method="linear", causal=True, chunk=chunk)
    assert rel_rms(subq.reference(q, k, v, method="linear", causal=True), out) <= 1e-12
    groups = q.shape[1] // k.shape[1]
    expl = _explicit(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                     causal=True)
    assert rel_rms(expl, out) <= 1e-12
    state = subq.init_state("linear", batch=2, kv_heads=2, head_dim=16, value_dim=12,
                            dtype=q.dtype, device=q.device)
    steps = []
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="linear")
        steps.append(out_t)
    assert rel_rms(out, torch.cat(steps, dim=2)) <= 1e-12


def test_causal_cross_is_noncausal_cross():
    q, k, v = random_qkv(lq=40, lk=90)
    causal = subq.attention(q, k, v, method="linear", causal=True)
    assert rel_rms(subq.attention(q, k, v, method="linear"), causal) == 0.0
    q2 = q.clone()
    q2[:, :, 20:] = torch.randn_like(q2[:, :, 20:])
    assert rel_rms(causal[:, :, :20],
                   subq.attention(q2, k, v, method="linear", causal=True)[:, :, :20]) == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_padding_keys_drop_out_of_the_sums(causal):
    q, k, v = random_qkv(batch=1, lq=50)
    keep = torch.rand(50) < 0.6
    keep[0] = True
    out = subq.attention(q, k, v, method="linear", causal=causal,
                         key_padding_mask=~keep[None])
    kept = [subq.attention(q[:, :, i:i + 1], k[:, :, keep[:i + 1].nonzero()[:, 0]],
                           v[:, :, keep[:i + 1].nonzero()[:, 0]], method="linear")
            if causal else None for i in range(50)]
    expected = (torch.cat(kept, dim=2) if causal else
                subq.attention(q, k[:, :, keep], v[:, :, keep], method="linear"))
    assert rel_rms(expected, out) <= 1e-12


def test_query_that_sees_no_key_outputs_zero():
    q, k, v = random_qkv(batch=1, lq=30)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :10] = True
    out = subq.attention(q, k, v, method="linear", causal=True, key_padding_mask=mask)
    assert (out[:, :, :10] == 0).all()
    assert (out[:, :, 10:].abs() > 0).any()


def test_half_precision_keeps_state_in_float32():
    q, k, v = random_qkv(lq=100, dtype=torch.float32)
    state = subq.init_state("linear", batch=2, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    assert state.kv.dtype == torch.float32
    out_t, state = subq.step(q[:, :, :1].bfloat16(), k[:, :, :1].bfloat16(),
                             v[:, :, :1].bfloat16(), state, method="linear")
    assert out_t.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    out16 = subq.attention(q.half(), k.half(), v.half(), method="linear", causal=True)
    assert out16.dtype == torch.float16
    assert rel_rms(subq.attention(q, k, v, method="linear", causal=True), out16) <= 2e-3


def test_weights_rows_sum_to_one_and_are_causal():
    q, k, _ = random_qkv(lq=20)
    a = subq.weights(q, k, method="linear", causal=True)
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)))
    lower = torch.ones(20, 20, dtype=torch.bool).tril()
    assert (a[..., ~lower] == 0).all() and (a[..., lower] > 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_tiles_equal_one_pass_with_padding_gqa_and_gradients(causal):
    """The tiled core (tiles much shorter than L, L a multiple of neither the tile nor the
    chunk) equals the explicit matrix, values and gradients, with padding keys and GQA."""
    q, k, v = random_qkv(batch=2, q_heads=4, kv_heads=2, lq=157, value_dim=12)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.rand(2, 157) < 0.3
    mask[:, 0] = False
    phi = linear._feature_map("relu", linear.DEFAULT_EPS, q.dtype)
    out = linear.kernel_attention(q, k, v, phi, phi, causal=causal, key_padding_mask=mask,
                                  chunk=8, tile=40)
    ref = subq.reference(q, k, v, method="linear", causal=causal, key_padding_mask=mask)
    assert rel_rms(ref, out) <= 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    for g, e in zip(got, expected, strict=True):
        assert rel_rms(e, g) <= 1e-10
