"""Vision backbones for 28 x 28 single-channel images (Fashion-MNIST) in 10 classes: a
GroupMamba fitted to that input and a ViT whose attention is any of several ``subq``
mechanisms, sized to GroupMamba's parameter count.

ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021), pre-norm, with a global-average-pooled head (the paper's
alternative to the class token, its appendix D.3), so that every mechanism sees exactly the
``H x W`` patch grid::

    image = pad(image, P pixels of background -1)    (28 + 2P a side; P = 0 or 2)
    x = Conv(p x p, stride p)(image) + pos            (B, H W, D), H = W = (28 + 2P) / p, raster
    x = x + Attn(LN(x), H, W)                         depth times, with
    x = x + MLP(LN(x))                                MLP: Linear(D, h), GELU, Linear(h, D)
    logits = Linear(D, 10)(mean_tokens(LN(x)))

``Attn`` is noncausal multi-head self attention through ``subq.attention(method=...)``:

* ``dense``: exact softmax attention;
* ``linear``: LiT's layer (:class:`subq.nn.lit.LiTAttention`: ReLU linear attention plus a
  depthwise convolution of V on the grid);
* ``combiner``: Combiner's axial factorisation with rows of the grid's width (``span = W``);
* ``hierarchical_local``: Scale-DiT's mask with the patch grid as the high-res grid and its
  ``2 x 2`` average pool (of q, k and v) as the low-res guide appended after it; no text
  tokens; 4 x 4 windows, radius 2 (5 x 5 neighbourhood), low-res radius 1, raster order; only
  the high-res outputs are kept;
* ``local``: 1-D sliding-window attention over the raster sequence, ``W`` keys on each side
  (one grid row above and below).

The width ``D`` (a multiple of the heads) and the MLP's hidden width ``h`` are solved per
mechanism (:func:`matched_vit_config`) so that the ViT's parameter count equals GroupMamba's at
the same preset (within a fraction of a percent), at the preset's fixed depth, heads and patch.

GroupMamba (Shaker et al. 2024, "GroupMamba: Parameter-Efficient and Accurate Group Visual
State Space Model", arXiv:2407.13772; :class:`subq.models.groupmamba.GroupMamba`): the released
four-stage network with a one-channel stem (Conv7x7/2 ... Conv3x3/2: 28 -> 7 tokens a side,
then 4, 2, 1) and one 10-class head, plus the distillation head ``dist_head`` when it trains
with a teacher (``build_backbone(..., distillation=True)``; :mod:`subq.recipes.vision`).
Presets (:data:`GROUPMAMBA_PRESETS`): ``micro`` is the spec's CPU configuration (dims
32/64/128/160, depths 1/1/2/1, 1.21 M parameters here); ``tiny`` a much smaller one for tests.

``cnn``: :class:`subq.models.cnn.FeatureCNN`, a small plain CNN classifier (the feature
network of FID-FMNIST and the teacher candidate of GroupMamba's distillation); it is NOT sized
to GroupMamba's parameter count (micro: 468,010 parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import subq

from ..nn.dit import merge_heads, split_heads
from ..nn.lit import LiTAttention
from .cnn import cnn_backbone
from .counting import count_on_meta
from .groupmamba import FFN, GroupMamba, init_weights

IMAGE_SIZE = 28
IN_CHANS = 1
NUM_CLASSES = 10

ATTENTIONS = ("dense", "linear", "combiner", "hierarchical_local", "local")
"""The mechanisms a ViT backbone can use (``vit-<name>``)."""
# ``cnn`` is not parameter-matched to GroupMamba (the ViTs are); see subq/models/cnn.py.
BACKBONES = ("groupmamba", *(f"vit-{name}" for name in ATTENTIONS), "cnn")
PRESETS = ("tiny", "micro")

GROUPMAMBA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(stem_hidden_dim=8, embed_dims=(16, 16, 32, 32), mlp_ratios=(2, 2, 2, 2),
                 depths=(1, 1, 1, 1)),
    "micro": dict(stem_hidden_dim=16, embed_dims=(32, 64, 128, 160), mlp_ratios=(4, 4, 4, 4),
                  depths=(1, 1, 2, 1)),
}
"""GroupMamba sizes for 28 x 28 x 1 images (``micro``: the spec's section 3.6.6 one)."""

VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(depth=2, heads=2, patch=2),
    "micro": dict(depth=6, heads=4, patch=4, pad=2),
}
"""The ViT's fixed shape per preset; its width and MLP width are solved to match GroupMamba.
``micro`` pads the image to 32 x 32 and cuts 4 x 4 patches: an 8 x 8 grid (64 tokens, as
many as GroupMamba's first stage sees after its stem, 7 x 7, give or take; even, as Scale-DiT's
2 x 2 pooled guide needs), about 4x cheaper to train than 2 x 2 patches' 196 tokens."""


def groupmamba_backbone(preset: str, distillation: bool = False) -> GroupMamba:
    """GroupMamba at ``preset`` for one-channel 28 x 28 images, 10 classes, one head (and the
    distillation head ``dist_head`` with ``distillation``)."""
    _check_preset(preset)
    return GroupMamba(in_chans=IN_CHANS, num_classes=NUM_CLASSES, distillation=distillation,
                      **GROUPMAMBA_PRESETS[preset])


@cache
def groupmamba_parameters(preset: str) -> int:
    """The parameter count of :func:`groupmamba_backbone` (built once on the meta device)."""
    return count_on_meta(lambda: groupmamba_backbone(preset))


@dataclass(frozen=True)
class ViTConfig:
    """A ViT: ``dim`` wide (a multiple of ``heads``), ``depth`` blocks with ``hidden``-wide
    MLPs, ``patch x patch`` patches of an ``image x image x in_chans`` input, and the named
    attention with its ``options`` (merged over the defaults of :func:`attention_options`).
    ``pad``: pixels of background (-1, the normalised black) added on each side of the
    ``image`` before patching."""

    attention: str = "dense"
    dim: int = 64
    depth: int = 2
    heads: int = 2
    hidden: int = 256
    patch: int = 2
    image: int = IMAGE_SIZE
    in_chans: int = IN_CHANS
    num_classes: int = NUM_CLASSES
    options: dict[str, Any] = field(default_factory=dict)
    pad: int = 0

    @property
    def grid(self) -> int:
        return (self.image + 2 * self.pad) // self.patch


def attention_options(attention: str, grid: int) -> dict[str, Any]:
    """The default ``subq.attention`` options of ``attention`` on a ``grid x grid`` patch
    grid (``linear``: LiT's layer options)."""
    if attention == "combiner":
        return {"variant": "axial", "span": grid}
    if attention == "hierarchical_local":
        return {"text": 0, "width": grid, "downsample": 2, "window": 4, "radius": 2,
                "lo_radius": 1, "order": "raster"}
    if attention == "local":
        return {"window": grid}
    if attention == "linear":
        return {"dwc_kernel": 5}
    return {}


class GridAttention(nn.Module):
    """Multi-head noncausal self attention ``attn(x (B, H W, D), H, W) -> (B, H W, D)``:
    ``qkv = Linear(D, 3 D)``, ``subq.attention(q, k, v, method, **options)``, ``proj``.

    ``hierarchical_local`` appends the ``2 x 2`` average pool of q, k and v on the grid as the
    low-res guide (``H``, ``W`` even) and keeps the first ``H W`` outputs.
    """

    def __init__(self, dim: int, heads: int, method: str, options: dict[str, Any]) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.method, self.options = heads, method, dict(options)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _with_guide(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``t (B, h, H W, d)`` followed by its ``r x r`` pooled grid (``r = downsample``)."""
        r = self.options.get("downsample", 2)
        if height % r or width % r:
            raise ValueError(f"hierarchical_local needs a grid divisible by {r}, got "
                             f"{height} x {width}")
        batch, heads, _, dim = t.shape
        grid = t.transpose(-1, -2).reshape(batch * heads, dim, height, width)
        low = F.avg_pool2d(grid, r).reshape(batch, heads, dim, -1).transpose(-1, -2)
        return torch.cat([t, low], dim=2)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        tokens = q.shape[2]
        if self.method == "hierarchical_local":
            q, k, v = (self._with_guide(t, height, width) for t in (q, k, v))
        o = subq.attention(q, k, v, method=self.method, causal=False, cross=False,
                           **self.options)
        return self.proj(merge_heads(o[:, :, :tokens]))


class ViTBlock(nn.Module):
    """``x + Attn(LN(x), H, W)``, then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        options = {**attention_options(cfg.attention, cfg.grid), **cfg.options}
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        if cfg.attention == "linear":
            self.attn = LiTAttention(cfg.dim, cfg.heads, **options)
        else:
            self.attn = GridAttention(cfg.dim, cfg.heads, cfg.attention, options)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = FFN(cfg.dim, cfg.hidden)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT classifier ``(B, in_chans, image, image) -> logits (B, num_classes)``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}; got "
                             f"{cfg.attention!r}")
        if (cfg.image + 2 * cfg.pad) % cfg.patch or cfg.pad < 0:
            raise ValueError(f"patch ({cfg.patch}) must divide the padded image side "
                             f"({cfg.image} + 2 x {cfg.pad})")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch, cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.dim))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        if self.cfg.pad:
            x = F.pad(x, (self.cfg.pad,) * 4, value=-1.0)
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x, height, width)
        return self.head(self.norm(x).mean(dim=1))


def vit_parameters(cfg: ViTConfig) -> int:
    """The parameter count of ``ViT(cfg)`` (built on the meta device: no memory, no init)."""
    return count_on_meta(lambda: ViT(cfg))


def matched_vit_config(attention: str, target: int, *, depth: int, heads: int, patch: int,
                       mlp_ratio: float = 4.0, **kwargs: Any) -> ViTConfig:
    """The ViT with ``attention`` whose parameter count is nearest ``target``: the width
    ``dim`` (a multiple of ``heads``) whose count at ``hidden = mlp_ratio * dim`` is nearest,
    then the MLP width moved by whole units (``depth * (2 dim + 1)`` parameters each) to close
    the rest of the gap."""
    base = ViTConfig(attention=attention, depth=depth, heads=heads, patch=patch, **kwargs)

    def at(dim: int) -> ViTConfig:
        return replace(base, dim=dim, hidden=max(1, round(mlp_ratio * dim)))

    dim, best = heads, None
    while True:
        count = vit_parameters(at(dim))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (dim, count)
        if count > target:
            break
        dim += heads
    cfg = at(best[0])
    per_unit = depth * (2 * cfg.dim + 1)
    hidden = max(1, cfg.hidden + round((target - best[1]) / per_unit))
    return replace(cfg, hidden=hidden)


def vit_config(preset: str, attention: str, **kwargs: Any) -> ViTConfig:
    """The ViT with ``attention`` at ``preset``, matched to GroupMamba's parameter count."""
    _check_preset(preset)
    return matched_vit_config(attention, groupmamba_parameters(preset),
                              **{**VIT_PRESETS[preset], **kwargs})


def build_backbone(name: str, preset: str, distillation: bool = False) -> nn.Module:
    """``groupmamba``, ``vit-<attention>`` or ``cnn`` (not parameter-matched) at ``preset``
    (see :data:`BACKBONES`); ``distillation`` adds GroupMamba's second head (GroupMamba
    only)."""
    if distillation:
        check_distillable(name)
    if name == "groupmamba":
        return groupmamba_backbone(preset, distillation)
    if name.startswith("vit-") and name[4:] in ATTENTIONS:
        return ViT(vit_config(preset, name[4:]))
    if name == "cnn":
        _check_preset(preset)
        return cnn_backbone(preset)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}")


def check_distillable(name: str) -> None:
    """``ValueError`` unless backbone ``name`` has a distillation head (GroupMamba only)."""
    if name != "groupmamba":
        raise ValueError(f"distillation (a teacher) takes backbone 'groupmamba', whose second "
                         f"head learns the teacher's labels; got {name!r}")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
