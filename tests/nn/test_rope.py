"""RoPE: relative positions only, norm preserved, offsets compose, and the explicit formula;
the multi-axis form (Scale-DiT / FLUX ids) against a hand-written rotation and its NTK factor."""

from __future__ import annotations

import math

import pytest
import torch

from subq.nn.rope import MultiAxisRotaryEmbedding, RotaryEmbedding, axes_split

from ..helpers import rel_rms


def test_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16, theta=100.0)
    q, k = torch.randn(2, 16, dtype=torch.float64)
    seq_q = q.expand(1, 1, 40, 16)
    seq_k = k.expand(1, 1, 40, 16)
    scores = rope(seq_q) @ rope(seq_k).transpose(-1, -2)  # (1, 1, 40, 40)
    for shift in (1, 7):
        assert torch.allclose(scores[..., shift:, shift:], scores[..., :-shift, :-shift],
                              atol=1e-10)
    assert not torch.allclose(scores[..., 0, 1], scores[..., 0, 5])


def test_offset_equals_slice_and_norm_is_kept():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 30, 8, dtype=torch.float64)
    full = rope(x)
    assert rel_rms(full[:, :, 10:], rope(x[:, :, 10:], offset=10)) <= 1e-14
    assert torch.allclose(full.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(full[:, :, 0], x[:, :, 0])  # position 0 is not rotated


def test_pair_rotation_formula():
    d, theta, p = 6, 50.0, 3
    rope = RotaryEmbedding(d, theta)
    x = torch.randn(1, 1, p + 1, d, dtype=torch.float64)
    y = rope(x)[0, 0, p]
    for c in range(d // 2):
        angle = torch.tensor(p * theta ** (-2 * c / d), dtype=torch.float64)
        a, b = x[0, 0, p, c], x[0, 0, p, c + d // 2]
        assert torch.allclose(y[c], a * angle.cos() - b * angle.sin())
        assert torch.allclose(y[c + d // 2], b * angle.cos() + a * angle.sin())


def test_odd_head_dim_raises():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7)


def hand_rope(x, ids, axes_dim, base):
    """Multi-axis RoPE written out pair by pair: ``x (..., N, D)``, ``ids`` a list of N id
    tuples; the pair (o + 2c, o + 2c + 1) of axis a (offset o, width d) is turned by
    ``ids[n][a] * base ** (-2c / d)``."""
    y = x.clone()
    offset = 0
    for a, d in enumerate(axes_dim):
        for c in range(d // 2):
            i, j = offset + 2 * c, offset + 2 * c + 1
            for n, p in enumerate(ids):
                phi = p[a] * base ** (-2 * c / d)
                cos, sin = math.cos(phi), math.sin(phi)
                y[..., n, i] = x[..., n, i] * cos - x[..., n, j] * sin
                y[..., n, j] = x[..., n, i] * sin + x[..., n, j] * cos
        offset += d
    return y


@pytest.mark.parametrize("axes_dim", [None, (2, 4, 6)])
def test_multi_axis_pair_rotation_formula(axes_dim):
    rope = MultiAxisRotaryEmbedding(12, axes_dim, theta=50.0)
    ids = [(0, 0, 0), (0, 3, 5), (2, 7, 1), (0, 12, 8), (1, 0, 9)]
    x = torch.randn(2, 3, len(ids), 12, dtype=torch.float64)
    expected = hand_rope(x, ids, axes_dim or (4, 4, 4), 50.0)
    assert rope.axes_dim == (axes_dim or (4, 4, 4))  # default: even split over the 3 axes
    assert torch.allclose(rope(x, torch.tensor(ids)), expected, atol=1e-13)
    assert torch.allclose(rope(x, torch.tensor(ids), ntk_factor=10.0),
                          hand_rope(x, ids, axes_dim or (4, 4, 4), 500.0), atol=1e-13)


def test_multi_axis_ntk_factor_multiplies_base_and_scores_are_relative():
    ids = torch.tensor([(0, 0, 0), (0, 3, 5), (0, 4, 1), (0, 8, 8)])
    x = torch.randn(1, 2, 4, 18, dtype=torch.float64)
    assert torch.equal(MultiAxisRotaryEmbedding(18, theta=100.0)(x, ids, ntk_factor=10.0),
                       MultiAxisRotaryEmbedding(18, theta=1000.0)(x, ids))
    rope = MultiAxisRotaryEmbedding(18, theta=100.0)
    q, k = torch.randn(2, 1, 1, 4, 18, dtype=torch.float64)
    shift = torch.tensor([3, -2, 7])
    scores = rope(q, ids) @ rope(k, ids).transpose(-1, -2)
    shifted = rope(q, ids + shift) @ rope(k, ids + shift).transpose(-1, -2)
    assert torch.allclose(scores, shifted, atol=1e-12)  # only id differences matter
    assert torch.allclose(rope(x, ids).norm(dim=-1), x.norm(dim=-1))


def test_multi_axis_split_and_bad_inputs():
    assert axes_split(12, 3) == (4, 4, 4) and axes_split(64, 3) == (20, 22, 22)
    assert axes_split(128, 3) == (42, 42, 44) and MultiAxisRotaryEmbedding(8).axes_dim == (2, 2, 4)
    with pytest.raises(ValueError, match="head_dim"):
        MultiAxisRotaryEmbedding(9)
    with pytest.raises(ValueError, match="axes_dim"):
        MultiAxisRotaryEmbedding(8, (2, 3, 3))
    with pytest.raises(ValueError, match="positions"):
        MultiAxisRotaryEmbedding(6)(torch.randn(1, 1, 4, 6), torch.zeros(4, 2, dtype=torch.long))
