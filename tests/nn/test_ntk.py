"""NTK prefix parameters: zero start, parameter count, the op they call."""

from __future__ import annotations

import torch

import subq
from subq.nn.ntk import NTKPrefix, NTKSelfAttention

from ..helpers import rel_rms


def test_parameter_count_is_h_d2_plus_d():
    heads, dim = 6, 16
    prefix = NTKPrefix(heads, dim)
    assert sum(p.numel() for p in prefix.parameters()) == heads * (dim * dim + dim)


def test_zero_start_is_softmax_attention_and_trained_prefix_is_ntk():
    prefix = NTKPrefix(4, 8)
    q, k, v = (torch.randn(2, 4, 20, 8) for _ in range(3))
    for causal in (False, True):
        dense = subq.attention(q, k, v, causal=causal)
        assert rel_rms(dense, prefix(q, k, v, causal=causal)) <= 1e-6
    with torch.no_grad():
        prefix.z.normal_()
        prefix.kz.normal_()
    out = prefix(q, k, v, causal=True)
    expected = subq.reference(q, k, v, method="ntk", causal=True, z=prefix.z.detach(),
                              kz=prefix.kz.detach())
    assert rel_rms(expected, out) <= 1e-5
    assert rel_rms(dense, out) > 1e-2


def test_self_attention_gradients_reach_z():
    attn = NTKSelfAttention(32, heads=4, causal=True)
    x = torch.randn(2, 10, 32)
    attn(x).pow(2).sum().backward()
    assert attn.prefix.z.grad.abs().sum() > 0
    assert attn.qkv.weight.grad is not None
