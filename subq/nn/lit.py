"""LiT's attention layer (DESIGN key ``linear``): linear attention with a ReLU kernel and few
heads, plus a depthwise convolution of V on the token grid (spec section 1.2):

    q, k, v = W_q x, W_k x, W_v x                               (B, h, N, d)
    o = linear_attention(q, k, v) + DWC(v)                      (subq.ops.linear)
    out = W_proj(concat_heads(o))

DWC is a ``k x k`` depthwise ``Conv2d`` ('same' padding) on V reshaped row-major to the
``H x W`` grid: by default one ``(d, d, groups=d)`` convolution shared by all heads (FLatten's
form), with ``dwc_shared=False`` one filter per channel of the ``D = h d`` channels.
"""

from __future__ import annotations

import torch
from torch import nn

import subq

from .dit import DiTBlock, merge_heads, split_heads


class LiTAttention(nn.Module):
    """``LiTAttention(dim, heads=2, dwc_kernel=5)``, called as ``attn(x (B, N, D), H, W)`` with
    ``N = H W`` tokens in row-major order; returns ``(B, N, D)``.

    Options: ``qkv_bias=True`` (as DiT), ``dwc_shared=True`` (DWC weights shared across heads),
    ``feature_map="relu"`` (see :mod:`subq.ops.linear`).
    """

    def __init__(self, dim: int, heads: int = 2, dwc_kernel: int = 5, *, qkv_bias: bool = True,
                 dwc_shared: bool = True, feature_map: str = "relu") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f"dwc_kernel must be a positive odd int, got {dwc_kernel}")
        self.heads, self.dwc_shared, self.feature_map = heads, dwc_shared, feature_map
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        channels = dim // heads if dwc_shared else dim
        self.dwc = nn.Conv2d(channels, channels, dwc_kernel, padding=dwc_kernel // 2,
                             groups=channels)
        self.proj = nn.Linear(dim, dim)

    def dwc_branch(self, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``DWC(v)`` for ``v (B, h, N, d)`` on the row-major ``H x W`` grid -> ``(B, h, N, d)``."""
        batch, heads, tokens, dim = v.shape
        if tokens != height * width:
            raise ValueError(f"x has {tokens} tokens but the grid is {height} x {width}")
        if self.dwc_shared:
            grid = v.transpose(-1, -2).reshape(batch * heads, dim, height, width)
            return self.dwc(grid).reshape(batch, heads, dim, tokens).transpose(-1, -2)
        grid = merge_heads(v).transpose(1, 2).reshape(batch, heads * dim, height, width)
        return split_heads(self.dwc(grid).flatten(2).transpose(1, 2), heads)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        o = subq.attention(q, k, v, method="linear", feature_map=self.feature_map)
        return self.proj(merge_heads(o + self.dwc_branch(v, height, width)))


def lit_block(dim: int, heads: int = 2, dwc_kernel: int = 5, mlp_ratio: float = 4.0,
              **attn_options: object) -> DiTBlock:
    """A DiT block (adaLN-Zero) hosting :class:`LiTAttention` instead of softmax attention."""
    return DiTBlock(dim, heads, attn=LiTAttention(dim, heads, dwc_kernel, **attn_options),
                    mlp_ratio=mlp_ratio)
