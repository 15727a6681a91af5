"""NTK prefix parameters: zero start, parameter count, the op they call."""

from __future__ import annotations

import torch

import subq
from subq.nn.ntk import NTKPrefix, NTKSelfAttention
from subq.ops.ntk import magnitude

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


def test_every_prefix_parameter_trains_from_the_zero_start():
    """At the zero start (the layer equals softmax attention) the first backward reaches every
    entry of both summaries, ``Z`` and ``k`` (torch's derivative of ``|k|`` at 0 is 0: only
    ``Z`` would learn), and one optimiser step moves both."""
    attn = NTKSelfAttention(32, heads=4, causal=True)
    x = torch.randn(2, 10, 32)
    attn(x).pow(2).sum().backward()
    for name, p in attn.prefix.named_parameters():
        assert (p.grad != 0).all(), f"{name}: {(p.grad == 0).sum()} entries without gradient"
    assert attn.qkv.weight.grad is not None
    torch.optim.SGD(attn.prefix.parameters(), lr=1e-2).step()
    assert (attn.prefix.kz != 0).all() and (attn.prefix.z != 0).all()


def test_magnitude_is_abs_with_unit_slope_at_zero():
    x = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    y = magnitude(x)
    assert torch.equal(y, x.abs())
    y.sum().backward()
    assert x.grad.tolist() == [-1.0, 1.0, 1.0]
