"""DiT's transformer block with adaLN-Zero (Peebles & Xie; the host of LiT, DESIGN key
``linear``), with the attention module as a parameter, so that a softmax DiT and a LiT differ
only in that module:

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)   (zero-initialised)
    x = x + gate1 * attn(modulate(LN(x), shift1, scale1), H, W)
    x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))
    modulate(x, shift, scale) = x * (1 + scale) + shift

LN has no affine parameters; the MLP is Linear -> GELU(tanh) -> Linear with ratio 4. Tokens
``x (B, N, D)`` lie on an ``H x W`` grid in row-major order, conditioning ``c (B, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

import subq


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` for ``x (B, N, D)`` and per-sample ``shift, scale (B, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, h * d) -> (B, h, N, d)``."""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, heads, dim // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d) -> (B, N, h * d)``, heads concatenated."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class Mlp(nn.Module):
    """DiT's MLP: ``Linear(D, r D) -> GELU(tanh) -> Linear(r D, D)``."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SoftmaxAttention(nn.Module):
    """DiT's multi-head softmax self attention, called as ``attn(x, H, W)`` like LiT's layer
    (the grid is unused): ``qkv = Linear(D, 3D)``, ``subq.attention(method)``, ``proj``."""

    def __init__(self, dim: int, heads: int = 6, qkv_bias: bool = True,
                 method: str = "dense") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.method = heads, method
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, height: int | None = None,
                width: int | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(self.attend(q, k, v)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core on ``(B, heads, L, head_dim)``; subclasses change only this."""
        return subq.attention(q, k, v, method=self.method)


class DiTBlock(nn.Module):
    """One adaLN-Zero block around any ``attn(x, H, W)`` module (default: softmax).

    ``forward(x (B, N, D), c (B, D), H, W) -> (B, N, D)``; the identity at initialisation.
    """

    def __init__(self, dim: int, heads: int = 6, attn: nn.Module | None = None,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SoftmaxAttention(dim, heads) if attn is None else attn
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), height, width)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
