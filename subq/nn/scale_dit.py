"""A Scale-DiT block (``hierarchical_local`` in DESIGN.md; Zhang & Tai, arXiv 2510.16325):
text, high-res and low-res tokens pass the same weights, with

* separate adaLN-Zero modulations: ``c`` for text and high-res tokens, ``c_lo`` (the clean
  low-res latent's own timestep embedding) for low-res tokens;
* a LoRA bridge (rank 16, alpha 16, A gaussian, B zero) on the adaLN modulation linear (the
  official code's ``norm1.linear``), ``qkv``, ``proj`` and the MLP's output layer that is
  active **only on low-res tokens** (the high-res path is the frozen base model, as in the
  official code's ``enable_lora(..., False)`` around high-res projections):
  ``W x + b + (alpha / r) B A x`` on low-res tokens, ``W x + b`` on text and high-res tokens;
* multi-axis RoPE on q and k over the concatenated ids of ``[text | high-res | low-res]``
  (:func:`scale_dit_positions`): text ``(0, 0, 0)``, high-res token at grid cell ``(i, j)``
  ``(0, i, j)``, low-res token ``(i, j)`` the anchor ``(0, r i, r j)`` (``r = anchor_factor``,
  4: the top-left high-res token of the ``r x r`` patch it summarises), with the rotary base
  ``theta * 10`` (the NTK factor) whenever low-res guidance is present, ``theta`` otherwise;
* one joint attention call over ``[text | high-res | low-res]`` with Scale-DiT's hierarchical
  local mask (:func:`subq.ops.hierarchical_local.hierarchical_local_attention`).

    (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))
                                              (c_lo and Linear + LoRA for low-res tokens)
    q, k, v = qkv(modulate(LN(x), shift1, scale1));   q, k <- RoPE(q, ids), RoPE(k, ids)
    x = x + gate1 * proj(Attn(q, k, v))
    x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))        (per token group)

Tokens must already be in the layout's order (``window_first`` by default; reorder raster
tokens with :func:`subq.ops.token_order.grid_order`); the RoPE ids follow the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ops.hierarchical_local import Layout, hierarchical_local_attention
from ..ops.token_order import grid_order, grid_positions
from .dit import Mlp, merge_heads, modulate, split_heads
from .lora import LoRALinear
from .rope import MultiAxisRotaryEmbedding


def scale_dit_positions(layout: Layout, factor: int = 4,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, 3)`` int64 RoPE ids of ``[text | high-res | low-res]`` in the layout's token order
    (Scale-DiT, spec section 2.1.4; FLUX's ``(0, row, col)`` ids in token units): text
    ``(0, 0, 0)``; the high-res token in grid cell ``(i, j)`` ``(0, i, j)``; the low-res token
    in cell ``(i, j)`` ``(0, factor i, factor j)`` (``scale_PE``: the anchors of
    :func:`subq.ops.token_order.grid_positions`)."""
    parts = [torch.zeros(layout.text, 2, dtype=torch.long, device=device)]
    for count, width, window, scale in ((layout.hi_count, layout.hi_width, layout.window, 1),
                                        (layout.lo_count, layout.lo_width, layout.lo_window,
                                         factor)):
        grid = grid_positions(-(-count // width), width, scale, device)[:count]
        parts.append(grid[grid_order(count, width, window, layout.order, device)])
    ids = torch.cat(parts)
    return torch.cat([torch.zeros_like(ids[:, :1]), ids], dim=1)


class ScaleDiTBlock(nn.Module):
    """``forward(text (B, T, D), hi (B, Nh, D), lo (B, Nl, D), c (B, D), c_lo (B, D), layout,
    positions=None, attend=None) -> (text, hi, lo)``; ``layout`` describes ``T``, ``Nh``,
    ``Nl`` (``Nl = 0``: no guide). ``attend(q, k, v)`` replaces the attention core (default:
    :func:`~subq.ops.hierarchical_local.hierarchical_local_attention` with ``layout``; dense
    attention over every token is the baseline of ``subq sample dit --attention softmax``).

    RoPE (``rope=True``, as the paper): ids ``positions (N, 3)``, by default
    :func:`scale_dit_positions` with ``anchor_factor``; the head dimension is split over the
    three id axes by ``rope_axes_dim``. The spec does not state the split, so the default is the
    standard even split, ``D_head / 3`` channels per axis (when ``D_head`` is not a multiple of
    6, the channel pairs are dealt as evenly as possible: :func:`subq.nn.rope.axes_split`);
    FLUX.1's own weights would need ``rope_axes_dim=(16, 56, 56)`` at head dim 128. The base is
    ``rope_theta * ntk_factor`` (10) when ``layout.lo_count > 0``, else ``rope_theta``
    (:meth:`rope_base`). ``rope=False`` leaves positional encoding to the caller.
    """

    def __init__(self, dim: int, heads: int = 6, mlp_ratio: float = 4.0, rank: int = 16,
                 alpha: float = 16.0, rope: bool = True, rope_theta: float = 10000.0,
                 ntk_factor: float = 10.0, anchor_factor: int = 4,
                 rope_axes_dim: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.rope = (MultiAxisRotaryEmbedding(dim // heads, rope_axes_dim, 3, rope_theta)
                     if rope else None)
        self.ntk_factor = ntk_factor
        self.anchor_factor = anchor_factor
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = LoRALinear(nn.Linear(dim, 3 * dim), rank, alpha)
        self.proj = LoRALinear(nn.Linear(dim, dim), rank, alpha)
        self.mlp = Mlp(dim, mlp_ratio)
        self.mlp_out = LoRALinear(self.mlp.fc2, rank, alpha)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)
        # LoRA on the modulation linear (``norm1.linear``), sharing its base weights.
        self.modulation = LoRALinear(self.adaLN_modulation[1], rank, alpha)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The bridge's trainable parameters (everything else stays frozen in Scale-DiT)."""
        return [p for m in (self.modulation, self.qkv, self.proj, self.mlp_out)
                for p in m.lora_parameters()]

    def rope_base(self, layout: Layout) -> float:
        """The rotary base: ``theta * ntk_factor`` with low-res guidance (``lo_count > 0``),
        ``theta`` without (spec sections 2.1.4 and 2.6.5)."""
        if self.rope is None:
            raise ValueError("this block applies no RoPE (rope=False)")
        return self.rope.theta * (self.ntk_factor if layout.lo_count > 0 else 1.0)

    def _mlp(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        return self.mlp_out(self.mlp.act(self.mlp.fc1(x)), lora)

    def forward(self, text: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, c: torch.Tensor,
                c_lo: torch.Tensor, layout: Layout, positions: torch.Tensor | None = None,
                attend: Callable[..., torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = (text.shape[1], hi.shape[1], lo.shape[1])
        if sizes != (layout.text, layout.hi_count, layout.lo_count):
            raise ValueError(f"layout has (text, hi, lo) = ({layout.text}, {layout.hi_count}, "
                             f"{layout.lo_count}) tokens but the inputs have {sizes}")
        main = torch.cat([text, hi], dim=1)  # text and high-res: base weights, modulation c
        mod = self.adaLN_modulation(c).chunk(6, dim=-1)
        mod_lo = self.modulation(self.adaLN_modulation[0](c_lo), lora=True).chunk(6, dim=-1)
        h_main = modulate(self.norm1(main), mod[0], mod[1])
        h_lo = modulate(self.norm1(lo), mod_lo[0], mod_lo[1])
        qkv = torch.cat([self.qkv(h_main, lora=False), self.qkv(h_lo, lora=True)], dim=1)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        if self.rope is not None:
            if positions is None:
                positions = scale_dit_positions(layout, self.anchor_factor, q.device)
            kappa = self.ntk_factor if layout.lo_count > 0 else 1.0
            q, k = self.rope(q, positions, kappa), self.rope(k, positions, kappa)
        if attend is None:
            att = hierarchical_local_attention(q, k, v, layout=layout)
        else:
            att = attend(q, k, v)
        att = merge_heads(att)
        n = main.shape[1]
        main = main + mod[2][:, None] * self.proj(att[:, :n], lora=False)
        lo = lo + mod_lo[2][:, None] * self.proj(att[:, n:], lora=True)
        main = main + mod[5][:, None] * self._mlp(
            modulate(self.norm2(main), mod[3], mod[4]), lora=False)
        lo = lo + mod_lo[5][:, None] * self._mlp(
            modulate(self.norm2(lo), mod_lo[3], mod_lo[4]), lora=True)
        return main[:, :sizes[0]], main[:, sizes[0]:], lo
