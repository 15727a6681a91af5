"""LiT's attention layer (subq/nn/lit.py): the DWC branch, the pure linear-attention limit,
head concatenation, and the LiT block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subq
from subq.nn.dit import DiTBlock
from subq.nn.lit import LiTAttention, lit_block

from ..helpers import rel_rms


def _linear_attention(q, k, v):
    """ReLU + eps kernel, written out as the explicit row-normalised matrix."""
    a = (F.relu(q) + 1e-6) @ (F.relu(k) + 1e-6).transpose(-1, -2)
    return (a / a.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("shared", [True, False])
def test_dwc_branch_is_conv2d_on_row_major_grid(shared):
    attn = LiTAttention(24, heads=3, dwc_shared=shared).double()
    height, width = 5, 7
    v = torch.randn(2, 3, height * width, 8, dtype=torch.float64)
    out = attn.dwc_branch(v, height, width)
    w, b = attn.dwc.weight, attn.dwc.bias
    if shared:
        grid = v.transpose(-1, -2).reshape(6, 8, height, width)
        expected = F.conv2d(grid, w, b, padding=2, groups=8).reshape(2, 3, 8, -1)
    else:
        grid = v.permute(0, 1, 3, 2).reshape(2, 24, height, width)
        expected = F.conv2d(grid, w, b, padding=2, groups=24).reshape(2, 3, 8, -1)
    assert rel_rms(expected.transpose(-1, -2), out) <= 1e-12
    # Row-major: token r * W + c sits at (r, c); check one output by the neighbourhood sum.
    r, c, head, ch = 2, 3, 1, 5
    filt = w[ch if shared else head * 8 + ch, 0]
    total = b[ch if shared else head * 8 + ch].clone()
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            if 0 <= r + dr < height and 0 <= c + dc < width:
                total += filt[dr + 2, dc + 2] * v[0, head, (r + dr) * width + c + dc, ch]
    assert torch.allclose(out[0, head, r * width + c, ch], total)


def test_zero_conv_is_pure_linear_attention_and_heads_concatenate():
    dim, heads, height, width = 32, 4, 6, 6
    attn = LiTAttention(dim, heads=heads).double()
    torch.nn.init.zeros_(attn.dwc.weight)
    torch.nn.init.zeros_(attn.dwc.bias)
    x = torch.randn(2, height * width, dim, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    d = dim // heads
    per_head = [_linear_attention(q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d],
                                  v[..., h * d:(h + 1) * d]) for h in range(heads)]
    expected = attn.proj(torch.cat(per_head, dim=-1))
    out = attn(x, height, width)
    assert out.shape == (2, height * width, dim)
    assert rel_rms(expected, out) <= 1e-12


def test_conv_branch_changes_the_output():
    attn = LiTAttention(16, heads=2).double()
    x = torch.randn(1, 16, 16, dtype=torch.float64)
    with_dwc = attn(x, 4, 4)
    torch.nn.init.zeros_(attn.dwc.weight)
    torch.nn.init.zeros_(attn.dwc.bias)
    assert rel_rms(with_dwc, attn(x, 4, 4)) > 1e-3


def test_lit_block_differs_from_dit_block_only_in_attention():
    dit, lit = DiTBlock(32, heads=4), lit_block(32, heads=2)
    outside = {name: p.shape for name, p in dit.state_dict().items()
               if not name.startswith("attn.")}
    assert outside == {name: p.shape for name, p in lit.state_dict().items()
                       if not name.startswith("attn.")}
    assert isinstance(lit.attn, LiTAttention)
    lit.load_state_dict({n: p for n, p in dit.state_dict().items() if n in outside},
                        strict=False)
    for name, p in dit.state_dict().items():
        if name in outside:
            assert torch.equal(p, lit.state_dict()[name])


def test_grid_mismatch_raises():
    with pytest.raises(ValueError, match="grid"):
        LiTAttention(16)(torch.randn(1, 10, 16), 3, 3)
    with pytest.raises(ValueError, match="dwc_kernel"):
        LiTAttention(16, dwc_kernel=4)


def test_layer_is_linear_attention_via_subq():
    """The layer's core is the registered ``linear`` mechanism."""
    attn = LiTAttention(16, heads=2).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    q, k, v = (t.view(1, 9, 2, 8).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))
    core = subq.attention(q, k, v, method="linear") + attn.dwc_branch(v, 3, 3)
    assert rel_rms(attn.proj(core.transpose(1, 2).reshape(1, 9, 16)), attn(x, 3, 3)) <= 1e-12
