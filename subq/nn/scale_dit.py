"""A Scale-DiT block (``hierarchical_local`` in DESIGN.md; Zhang & Tai, arXiv 2510.16325):
text, high-res and low-res tokens pass the same weights, with

* separate adaLN-Zero modulations: ``c`` for text and high-res tokens, ``c_lo`` (the clean
  low-res latent's own timestep embedding) for low-res tokens;
* a LoRA bridge (rank 16, alpha 16, A gaussian, B zero) on ``qkv``, ``proj`` and the MLP's
  output layer that is active **only on low-res tokens** (the high-res path is the frozen base
  model, as in the official code's ``enable_lora(..., False)`` around high-res projections);
* one joint attention call over ``[text | high-res | low-res]`` with Scale-DiT's hierarchical
  local mask (:func:`subq.ops.hierarchical_local.hierarchical_local_attention`).

    x = x + gate1 * Attn(modulate(LN(x), shift1, scale1))
    x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))        (per token group)

Tokens must already be in the layout's order (``window_first`` by default; reorder raster
tokens with :func:`subq.ops.token_order.grid_order`). Positional encoding is left to the caller;
:func:`subq.ops.token_order.grid_positions` with ``factor = downsample`` gives the low-res RoPE
anchors ``(i, j) -> (r i, r j)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.hierarchical_local import Layout, hierarchical_local_attention
from .dit import Mlp, merge_heads, modulate, split_heads


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B(A(x))`` where the LoRA term is switched per call."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor, lora: bool = False) -> torch.Tensor:
        out = self.base(x)
        if lora:
            out = out + self.scaling * (x @ self.lora_a.t()) @ self.lora_b.t()
        return out


class ScaleDiTBlock(nn.Module):
    """``forward(text (B, T, D), hi (B, Nh, D), lo (B, Nl, D), c (B, D), c_lo (B, D), layout)
    -> (text, hi, lo)``; ``layout`` describes ``T``, ``Nh``, ``Nl`` (``Nl = 0``: no guide)."""

    def __init__(self, dim: int, heads: int = 6, mlp_ratio: float = 4.0, rank: int = 16,
                 alpha: float = 16.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = LoRALinear(nn.Linear(dim, 3 * dim), rank, alpha)
        self.proj = LoRALinear(nn.Linear(dim, dim), rank, alpha)
        self.mlp = Mlp(dim, mlp_ratio)
        self.mlp_out = LoRALinear(self.mlp.fc2, rank, alpha)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The bridge's trainable parameters (everything else stays frozen in Scale-DiT)."""
        return [p for m in (self.qkv, self.proj, self.mlp_out) for p in (m.lora_a, m.lora_b)]

    def _mlp(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        return self.mlp_out(self.mlp.act(self.mlp.fc1(x)), lora)

    def forward(self, text: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, c: torch.Tensor,
                c_lo: torch.Tensor, layout: Layout
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = (text.shape[1], hi.shape[1], lo.shape[1])
        if sizes != (layout.text, layout.hi_count, layout.lo_count):
            raise ValueError(f"layout has (text, hi, lo) = ({layout.text}, {layout.hi_count}, "
                             f"{layout.lo_count}) tokens but the inputs have {sizes}")
        main = torch.cat([text, hi], dim=1)  # text and high-res: base weights, modulation c
        mod = self.adaLN_modulation(c).chunk(6, dim=-1)
        mod_lo = self.adaLN_modulation(c_lo).chunk(6, dim=-1)
        h_main = modulate(self.norm1(main), mod[0], mod[1])
        h_lo = modulate(self.norm1(lo), mod_lo[0], mod_lo[1])
        qkv = torch.cat([self.qkv(h_main), self.qkv(h_lo, lora=True)], dim=1)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        att = merge_heads(hierarchical_local_attention(q, k, v, layout=layout))
        n = main.shape[1]
        main = main + mod[2][:, None] * self.proj(att[:, :n])
        lo = lo + mod_lo[2][:, None] * self.proj(att[:, n:], lora=True)
        main = main + mod[5][:, None] * self._mlp(
            modulate(self.norm2(main), mod[3], mod[4]), lora=False)
        lo = lo + mod_lo[5][:, None] * self._mlp(
            modulate(self.norm2(lo), mod_lo[3], mod_lo[4]), lora=True)
        return main[:, :sizes[0]], main[:, sizes[0]:], lo
