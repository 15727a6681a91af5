"""Learned RPE table and the kernelized RPE attention layer (subq/nn/rpe.py)."""

from __future__ import annotations

import pytest
import torch

import subq
from subq.nn.dit import split_heads
from subq.nn.rpe import KernelizedRPEAttention, RelativePositionBias

from ..helpers import rel_rms


def test_table_slice_follows_the_bias_layout():
    rpe = RelativePositionBias(heads=2, max_len=10)
    assert torch.equal(rpe.table, torch.zeros(2, 19))
    with torch.no_grad():
        rpe.table.copy_(torch.arange(-9.0, 10.0).expand(2, 19))  # b_t = t
    b = rpe(4, 6)
    assert b.shape == (2, 9)
    assert torch.equal(b[0], torch.arange(-3.0, 6.0))  # entry t + lq - 1 holds offset t
    with pytest.raises(ValueError, match="max_len"):
        rpe(11, 3)


def test_zero_table_is_plain_kernelized_attention_and_learns():
    layer = KernelizedRPEAttention(16, heads=2, max_len=32, causal=True).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    q, k, v = (split_heads(t, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    plain = subq.attention(q, k, v, method="kernelized_rpe", causal=True,
                           projection=layer.projection)
    expected = layer.proj(plain.transpose(1, 2).reshape(2, 20, 16))
    out = layer(x)
    assert rel_rms(expected, out) <= 1e-10
    out.pow(2).sum().backward()
    grad = layer.bias.table.grad
    assert grad is not None and grad[:, :31].abs().sum() > 0
    assert (grad[:, 32:] == 0).all()  # causal: future offsets never used


def test_redraw_policy():
    fixed = KernelizedRPEAttention(16, heads=2, max_len=8)
    before = fixed.projection.clone()
    fixed(torch.randn(1, 8, 16))
    assert torch.equal(before, fixed.projection)
    redraw = KernelizedRPEAttention(16, heads=2, max_len=8, redraw=True)
    before = redraw.projection.clone()
    redraw(torch.randn(1, 8, 16))
    assert not torch.equal(before, redraw.projection)
    redraw.eval()
    before = redraw.projection.clone()
    redraw(torch.randn(1, 8, 16))
    assert torch.equal(before, redraw.projection)
