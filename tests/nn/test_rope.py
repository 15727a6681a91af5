"""RoPE: relative positions only, norm preserved, offsets compose, and the explicit formula."""

from __future__ import annotations

import pytest
import torch

from subq.nn.rope import RotaryEmbedding

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
