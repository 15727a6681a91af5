"""Scale-DiT's high-resolution model around a trained class-conditional DiT (Zhang & Tai,
"Scale-DiT", arXiv 2510.16325; spec ``scale_dit.md`` sections 2.1-2.2), for sampling at
``factor`` = 2 or 4 times the training resolution.

The sequence is ``[high-res (G x G) | low-res (g x g)]`` patch tokens (no text: the class
enters through adaLN as in DiT), ``g`` the training grid and ``G = factor g``:

* high-res tokens: the noisy ``R x R`` image through the base DiT's patch embedding, timestep
  ``t`` and class ``y`` in the modulation ``c``: the frozen base model;
* low-res tokens: the *clean* training-resolution image (the low-resolution pass's sample),
  with its own modulation ``c_lo = t_emb(0) + y_emb(y)`` and the LoRA bridge (rank 16, alpha
  16) on the patch embedding and in every block (:class:`subq.nn.scale_dit.ScaleDiTBlock`);
  only those LoRA tensors train (``subq train scale-dit``); the last block's low-res outputs
  are never read, so its ``proj`` and MLP bridges receive no gradient (as in Scale-DiT);
* positions: DiT's fixed 2-D sin-cos embedding evaluated at the tokens' coordinates.
  ``positions="anchors"`` (Scale-DiT's ``scale_PE``): high-res cell ``(i, j)`` at ``(i, j)``,
  low-res cell ``(i, j)`` at its anchor ``(factor i, factor j)``, the top-left high-res cell it
  summarises; ``"interpolate"``: the same geometry divided by ``factor``, so every coordinate
  lies in the training range. With the guide present the embedding's base is ``10000 *
  ntk_factor`` (Scale-DiT's NTK factor 10, which its code applies to RoPE; DiT's embedding is
  absolute, so here the factor stretches the sin-cos wavelengths the same way);
* attention (``attention``): ``hierarchical_local`` (Scale-DiT's mask, through the block-sparse
  :func:`~subq.ops.hierarchical_local.hierarchical_local_attention`: high-res neighbourhood of
  ``radius``, the low-res windows of the high-res ``window`` and its flat neighbours, low-res
  neighbourhood of ``lo_radius``) or ``softmax`` (dense attention over every token: the
  baseline). Tokens run in the layout's ``order`` (``window_first``, ``hilbert``, ``raster``)
  and return to raster order before the final layer.

Defaults scaled to the 7 x 7-token grid of the ``mini`` DiT: ``window`` 8 (a multiple of 2
and 4, so high-res windows map onto low-res windows of ``window / factor``), ``radius`` 4
(half the window, as Scale-DiT's 8 of 16), ``lo_radius`` 2, ``reach`` 1 (the paper's).

Without the guide (``guided=False`` in :meth:`ScaleDiT.forward`) and at ``factor`` 1 with
``softmax`` attention, the model computes exactly the base DiT.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.scale_dit import ScaleDiTBlock
from ..ops.hierarchical_local import Layout, hierarchical_local_attention
from ..ops.token_order import ORDERS, grid_order, grid_positions, inverse
from .dit import (
    DiT,
    DiTConfig,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    classifier_free_guidance,
    sincos_2d_at,
    unpatchify,
)

SCALE_ATTENTIONS = ("hierarchical_local", "softmax")
POSITIONS = ("anchors", "interpolate")


@dataclass(frozen=True)
class ScaleDiTConfig:
    """Scale-DiT's sampling geometry on top of a base :class:`~subq.models.dit.DiTConfig`
    (see the module docstring)."""

    resolution: int = 56
    attention: str = "hierarchical_local"
    window: int = 8
    radius: int = 4
    lo_radius: int = 2
    reach: int = 1
    order: str = "window_first"
    positions: str = "anchors"
    ntk_factor: float = 10.0
    rank: int = 16
    alpha: float = 16.0
    block_q: int = 64
    block_k: int = 32

    def check(self, base: DiTConfig) -> None:
        for name, value, allowed in (("attention", self.attention, SCALE_ATTENTIONS),
                                     ("order", self.order, ORDERS),
                                     ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.resolution < base.image_size or self.resolution % base.image_size:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of the base "
                             f"model's image size ({base.image_size})")
        factor = self.resolution // base.image_size
        if self.window % factor:
            raise ValueError(f"window ({self.window}) must be a multiple of the upscaling "
                             f"factor ({factor}) so high-res windows map onto low-res ones")
        for name in ("window", "rank", "block_q", "block_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ntk_factor <= 0:
            raise ValueError(f"ntk_factor must be > 0, got {self.ntk_factor}")


class ScaleDiT(nn.Module):
    """``forward(x (B, C, R, R), t (B,), y (B,), *, lo (B, C, r, r) | None, force_drop,
    generator) -> (B, C_out, R, R)``: the base DiT's noise (and variance) prediction at
    resolution ``R``, guided by the clean low-resolution image ``lo`` when given."""

    def __init__(self, base: DiTConfig, cfg: ScaleDiTConfig | None = None) -> None:
        super().__init__()
        cfg = ScaleDiTConfig() if cfg is None else cfg
        cfg.check(base)
        if base.attention != "softmax" or base.attention_heads not in (None, base.heads):
            raise ValueError("Scale-DiT samples from a softmax DiT (a `subq train dit "
                             f"--attention softmax` run); got attention {base.attention!r}")
        self.base, self.cfg = base, cfg
        self.factor = cfg.resolution // base.image_size
        self.grid = cfg.resolution // base.patch_size
        patch_inputs = base.in_channels * base.patch_size ** 2
        self.x_embedder = nn.Conv2d(base.in_channels, base.hidden, base.patch_size,
                                    base.patch_size)
        self.patch_lora_a = nn.Parameter(torch.randn(cfg.rank, patch_inputs) / cfg.rank)
        self.patch_lora_b = nn.Parameter(torch.zeros(base.hidden, cfg.rank))
        self.t_embedder = TimestepEmbedder(base.hidden, base.frequency_dim)
        self.y_embedder = LabelEmbedder(base.num_classes, base.hidden, base.class_dropout_prob)
        self.blocks = nn.ModuleList(
            ScaleDiTBlock(base.hidden, base.heads, base.mlp_ratio, cfg.rank, cfg.alpha,
                          rope=False) for _ in range(base.depth))
        self.final_layer = FinalLayer(base.hidden, base.patch_size, base.out_channels)
        g, w = base.grid, cfg.window
        self.register_buffer("hi_order", grid_order(self.grid ** 2, self.grid, w, cfg.order),
                             persistent=False)
        self.register_buffer("lo_order", grid_order(g * g, g, w // self.factor, cfg.order),
                             persistent=False)
        for guided in (False, True):
            hi, lo = self.positions(guided)
            self.register_buffer(f"pos_hi_{int(guided)}", hi, persistent=False)
            self.register_buffer(f"pos_lo_{int(guided)}", lo, persistent=False)

    # -- geometry --------------------------------------------------------------------------

    def layout(self, guided: bool) -> Layout:
        """The token layout: ``G x G`` high-res tokens, then ``g x g`` low-res ones if
        ``guided`` (none otherwise)."""
        g, cfg = self.base.grid, self.cfg
        return Layout(text=0, hi_count=self.grid ** 2, hi_width=self.grid,
                      lo_count=g * g if guided else 0, lo_width=g, window=cfg.window,
                      radius=cfg.radius, lo_window=cfg.window // self.factor,
                      lo_radius=cfg.lo_radius, reach=cfg.reach, order=cfg.order)

    def positions(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The sin-cos embeddings ``(G^2, D)`` and ``(g^2, D)`` of the high-res and low-res
        tokens in the layout's order (module docstring)."""
        unit = 1.0 if self.cfg.positions == "anchors" else 1.0 / self.factor
        base = 10000.0 * (self.cfg.ntk_factor if guided else 1.0)
        g = self.base.grid
        hi = grid_positions(self.grid, self.grid).double() * unit
        lo = grid_positions(g, g, self.factor).double() * unit
        return (sincos_2d_at(self.base.hidden, hi, base)[self.hi_order],
                sincos_2d_at(self.base.hidden, lo, base)[self.lo_order])

    # -- weights ---------------------------------------------------------------------------

    @classmethod
    def from_dit(cls, dit: DiT, cfg: ScaleDiTConfig | None = None) -> ScaleDiT:
        """A Scale-DiT carrying ``dit``'s weights (:meth:`load_dit`), LoRA at its init."""
        weight = next(dit.parameters())
        model = cls(dit.cfg, cfg).to(device=weight.device, dtype=weight.dtype)
        model.load_dit(dit)
        return model

    def load_dit(self, dit: DiT) -> list[str]:
        """Copy every weight of the base DiT (its attention's ``qkv`` and ``proj`` into the
        blocks' LoRA-wrapped linears), freeze them, and leave only the LoRA bridge trainable;
        returns the names loaded. Raises ValueError if the DiT's shapes differ."""
        if dit.cfg != self.base:
            raise ValueError("the DiT's config differs from this Scale-DiT's base config")
        renamed = {}
        for name, value in dit.state_dict().items():
            for old, new in ((".attn.qkv.", ".qkv.base."), (".attn.proj.", ".proj.base.")):
                name = name.replace(old, new)
            renamed[name] = value
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        aliases = (".mlp_out.base.", ".modulation.base.")  # same tensors as mlp.fc2, adaLN
        left = [n for n in missing if "lora_" not in n and not any(a in n for a in aliases)]
        if unexpected or left:
            raise ValueError(f"DiT weights do not fit: unexpected {unexpected}, missing {left}")
        for name, param in self.named_parameters():
            param.requires_grad_("lora_" in name)
        return list(renamed)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The bridge: the patch embedding's and every block's LoRA tensors."""
        return [self.patch_lora_a, self.patch_lora_b] + [
            p for block in self.blocks for p in block.lora_parameters()]

    # -- forward ---------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        """Patch tokens ``(B, N, D)`` in raster order; with ``lora`` the bridge's low-rank
        term on the flattened patches (the convolution is a linear map of them)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        if lora:
            p = self.base.patch_size
            patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, C p p) as the weight
            scaling = self.cfg.alpha / self.cfg.rank
            tokens = tokens + scaling * (patches @ self.patch_lora_a.t()) @ self.patch_lora_b.t()
        return tokens

    def _check(self, x: torch.Tensor, lo: torch.Tensor | None) -> None:
        base = self.base
        expect = (base.in_channels, self.cfg.resolution, self.cfg.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"x must be (B, {', '.join(map(str, expect))}), got "
                             f"{tuple(x.shape)}")
        small = (x.shape[0], base.in_channels, base.image_size, base.image_size)
        if lo is not None and tuple(lo.shape) != small:
            raise ValueError(f"lo must be {small} (the clean low-resolution images), got "
                             f"{tuple(lo.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                lo: torch.Tensor | None = None, force_drop: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(x, lo)
        guided = lo is not None
        batch, dim = x.shape[0], self.base.hidden
        hi = self._embed(x, lora=False)[:, self.hi_order]
        hi = hi + getattr(self, f"pos_hi_{int(guided)}").to(hi.dtype)
        label = self.y_embedder.embedding_table(self.y_embedder.drop(y, force_drop, generator))
        c = self.t_embedder(t).to(hi.dtype) + label
        c_lo = self.t_embedder(torch.zeros_like(t)).to(hi.dtype) + label
        if guided:
            low = self._embed(lo, lora=True)[:, self.lo_order]
            low = low + self.pos_lo_1.to(low.dtype)
        else:
            low = hi.new_zeros(batch, 0, dim)
        text = hi.new_zeros(batch, 0, dim)
        layout = self.layout(guided)
        if self.cfg.attention == "softmax":
            attend = F.scaled_dot_product_attention
        else:
            attend = functools.partial(hierarchical_local_attention, layout=layout,
                                       block_q=self.cfg.block_q, block_k=self.cfg.block_k)
        for block in self.blocks:
            text, hi, low = block(text, hi, low, c, c_lo, layout, attend=attend)
        out = self.final_layer(hi[:, inverse(self.hi_order)], c)
        return unpatchify(out, self.grid, self.base.patch_size, self.base.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float, *, lo: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance as :meth:`subq.models.dit.DiT.forward_with_cfg` (the
        guide image is the same for the conditional and the unconditional half)."""
        inputs = {} if lo is None else {"lo": lo}
        return classifier_free_guidance(self, x, t, y, cfg_scale, self.base.in_channels,
                                        **inputs)


__all__ = ["POSITIONS", "SCALE_ATTENTIONS", "ScaleDiT", "ScaleDiTConfig"]
