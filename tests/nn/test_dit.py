"""DiT block with adaLN-Zero (subq/nn/dit.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subq.nn.dit import DiTBlock, Mlp, SoftmaxAttention, merge_heads, modulate, split_heads

from ..helpers import rel_rms


def test_modulate_formula():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    expected = torch.stack([x[b] * (1 + scale[b]) + shift[b] for b in range(2)])
    assert torch.allclose(modulate(x, shift, scale), expected)


def test_split_and_merge_heads_invert():
    x = torch.randn(2, 7, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 7, 4)
    assert torch.equal(heads[:, 1], x[..., 4:8])
    assert torch.equal(merge_heads(heads), x)


def test_block_is_identity_at_init():
    block = DiTBlock(16, heads=2)
    x, c = torch.randn(2, 9, 16), torch.randn(2, 16)
    assert torch.equal(block(x, c, 3, 3), x)


def test_block_follows_adaln_equations():
    block = DiTBlock(16, heads=2).double()
    torch.nn.init.normal_(block.adaLN_modulation[1].weight)
    x, c = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    s1, sc1, g1, s2, sc2, g2 = (t[:, None] for t in
                                block.adaLN_modulation[1](F.silu(c)).chunk(6, dim=-1))
    h = F.layer_norm(x, (16,), eps=1e-6) * (1 + sc1) + s1
    q, k, v = (t.view(2, 9, 2, 8).transpose(1, 2) for t in block.attn.qkv(h).chunk(3, -1))
    att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    x1 = x + g1 * block.attn.proj(att.transpose(1, 2).reshape(2, 9, 16))
    h2 = F.layer_norm(x1, (16,), eps=1e-6) * (1 + sc2) + s2
    mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(h2), approximate="tanh"))
    assert rel_rms(x1 + g2 * mlp, block(x, c, 3, 3)) <= 1e-12


def test_parts_have_dit_shapes():
    assert Mlp(16).fc1.out_features == 64
    attn = SoftmaxAttention(24, heads=6)
    assert attn.qkv.out_features == 72 and attn.qkv.bias is not None
