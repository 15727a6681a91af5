"""Learned RPE table and the kernelized RPE attention layer (subq/nn/rpe.py)."""

from __future__ import annotations

import pytest
import torch

import subq
from subq.nn.dit import split_heads
from subq.nn.rpe import KernelizedRPEAttention, RelativePositionBias, RelativePositionBias2d

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


def test_2d_table_slice_layout_and_layer():
    rpe = RelativePositionBias2d(heads=2, max_height=4, max_width=5)
    assert torch.equal(rpe.table, torch.zeros(2, 7, 9))
    with torch.no_grad():  # b[d1, d2] = 10 d1 + d2
        rpe.table.copy_(10 * torch.arange(-3.0, 4.0)[:, None] + torch.arange(-4.0, 5.0))
    b = rpe(2, 3)
    assert b.shape == (2, 3, 5)
    assert torch.equal(b[1], 10 * torch.arange(-1.0, 2.0)[:, None] + torch.arange(-2.0, 3.0))
    with pytest.raises(ValueError, match="max_height"):
        rpe(5, 1)

    layer = KernelizedRPEAttention(16, heads=2, max_len=(4, 5)).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    q, k, v = (split_heads(t, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    plain = subq.attention(q, k, v, method="kernelized_rpe", projection=layer.projection)
    out = layer(x, 3, 4)
    assert rel_rms(layer.proj(plain.transpose(1, 2).reshape(2, 12, 16)), out) <= 1e-10
    out.pow(2).sum().backward()
    grad = layer.bias.table.grad
    assert grad[:, 1:6, 1:8].abs().amin() > 0  # the offsets of a 3 x 4 grid
    assert (grad[:, 0] == 0).all() and (grad[:, :, 0] == 0).all()
    with pytest.raises(ValueError, match="height"):
        layer(x, 3, 5)
    with pytest.raises(ValueError, match="non-causal"):
        KernelizedRPEAttention(16, heads=2, max_len=(4, 5), causal=True)
