"""A class-conditional DiT for 28 x 28 single-channel images (Fashion-MNIST, 10 classes) whose
self attention is chosen by name: the softmax teacher or LiT's linear attention.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", ICCV 2023), written
here from the paper's description (spec ``lit.md`` section 1.3)::

    x = Conv(p x p, stride p)(image) + pos         (B, N, D), N = (28 / p)^2 tokens, raster
                                                   pos: fixed 2-D sin-cos (not trained)
    c = MLP(sincos_freq(t)) + Embed(y)             MLP: Linear(F, D), SiLU, Linear(D, D);
                                                   Embed has num_classes + 1 rows, the last
                                                   one the "null" class of classifier-free
                                                   guidance (labels are dropped to it with
                                                   probability class_dropout_prob in training)
    x = DiTBlock(x, c, H, W)                       depth times (subq.nn.dit: adaLN-Zero)
    shift, scale = Linear(SiLU(c)).chunk(2)        final layer, zero-initialised
    out = Linear(modulate(LN(x), shift, scale))    (B, N, p p C_out), zero-initialised
    image_out = unpatchify(out)                    (B, C_out, 28, 28)

``C_out = 2 C`` with ``learn_sigma`` (the noise ``eps`` then the variance values ``v``),
``C`` otherwise. Being adaLN-Zero with a zero final layer, the model outputs exactly 0 at
initialisation.

Attention (:data:`ATTENTIONS`), every one called as ``attn(x (B, N, D), H, W)`` inside
:class:`subq.nn.dit.DiTBlock`:

* ``softmax``: DiT's multi-head softmax attention (:class:`subq.nn.dit.SoftmaxAttention`,
  ``subq.attention(method="dense")``): the teacher;
* ``linear``: LiT (Wang et al. 2025, "LiT: Delving into a Simplified Linear Diffusion
  Transformer for Image Generation", arXiv 2501.12976): ReLU linear attention plus a 5 x 5
  depthwise convolution of V (:class:`subq.nn.lit.LiTAttention`), typically with fewer heads
  (``attention_heads``; LiT-S/2 uses 2);
* ``hierarchical_local``: Scale-DiT's hierarchical local *mask* only, through
  :class:`subq.models.vit.GridAttention` (the patch grid as the high-res grid, its 2 x 2 pool as
  the low-res guide, no text, windows 4, radius 2, low-res radius 1, raster order). Scale-DiT's
  own block (:class:`subq.nn.scale_dit.ScaleDiTBlock`: separate low-res tokens and timestep,
  LoRA bridge, RoPE) has a different call signature and is not used here.

The softmax, linear and hierarchical_local models share the names and shapes of every
parameter outside ``blocks.*.attn``; LiT's layer also keeps ``qkv`` and ``proj`` and adds
``dwc`` (:func:`shared_parameter_names`). LiT initialises a student from the teacher's
non-attention weights (spec section 1.4).

Presets (:data:`DIT_PRESETS`; counts measured for softmax attention, ``learn_sigma=True``):

* ``tiny`` (tests): hidden 48, depth 2, heads 4, patch 2, frequency dim 64: 95,720 parameters
  (``linear``: 96,344; ``linear`` with 2 attention heads: 96,968);
* ``mini`` (the CPU experiments of ``docs/diffusion.md``): hidden 96, depth 4, heads 4, patch
  4 (49 tokens), frequency dim 128: 715,424 parameters (``linear`` with 2 attention heads:
  720,416);
* ``small``: hidden 192, depth 6, heads 6, patch 2, frequency dim 256:
  4,163,720 parameters (``linear``: 4,168,712; with 2 attention heads: 4,178,696).

``hierarchical_local`` has the softmax counts (same ``qkv`` and ``proj``). The fixed positional
embedding is a buffer, not a parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..nn.dit import DiTBlock, SoftmaxAttention, modulate
from ..nn.lit import LiTAttention
from .counting import count_on_meta

ATTENTIONS = ("softmax", "linear", "hierarchical_local")
"""The attention names a :class:`DiT` accepts."""

DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=48, depth=2, heads=4, frequency_dim=64),
    "mini": dict(hidden=96, depth=4, heads=4, frequency_dim=128, patch_size=4),
    "small": dict(hidden=192, depth=6, heads=6, frequency_dim=256),
}
"""DiT sizes for 28 x 28 x 1 images (see the module docstring for their parameter counts)."""


@dataclass(frozen=True)
class DiTConfig:
    """A DiT on ``image_size x image_size x in_channels`` images cut into ``patch_size``
    patches, ``hidden`` wide (a multiple of 4 and of the heads), ``depth`` adaLN-Zero blocks
    with MLP ratio ``mlp_ratio``, ``num_classes`` classes plus the null class, and the named
    ``attention`` with ``attention_heads`` heads (``None``: ``heads``) and ``attention_options``
    (LiT's layer options for ``linear``, ``subq.attention`` options for
    ``hierarchical_local``, merged over the defaults of :func:`attention_defaults`)."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 2
    hidden: int = 48
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    frequency_dim: int = 256
    attention: str = "softmax"
    attention_heads: int | None = None
    attention_options: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


def dit_config(preset: str, **kwargs: Any) -> DiTConfig:
    """The :class:`DiTConfig` of ``preset`` (``tiny``, ``mini`` or ``small``), fields overridden by
    ``kwargs``."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(DIT_PRESETS)}; got {preset!r}")
    return DiTConfig(**{**DIT_PRESETS[preset], **kwargs})


def attention_defaults(attention: str, grid: int) -> dict[str, Any]:
    """The default options of ``attention`` on a ``grid x grid`` patch grid."""
    if attention == "linear":
        return {"dwc_kernel": 5}
    if attention == "hierarchical_local":
        return {"text": 0, "width": grid, "downsample": 2, "window": 4, "radius": 2,
                "lo_radius": 1, "order": "raster"}
    return {}


def build_attention(cfg: DiTConfig) -> nn.Module:
    """One attention module ``attn(x, H, W)`` of ``cfg``; unknown names raise ValueError."""
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}; got "
                         f"{cfg.attention!r}")
    heads = cfg.heads if cfg.attention_heads is None else cfg.attention_heads
    options = {**attention_defaults(cfg.attention, cfg.grid), **cfg.attention_options}
    if cfg.attention == "softmax":
        return SoftmaxAttention(cfg.hidden, heads, **options)
    if cfg.attention == "linear":
        return LiTAttention(cfg.hidden, heads, **options)
    from .vit import GridAttention  # the ViT's grid wrapper of subq.attention

    return GridAttention(cfg.hidden, heads, cfg.attention, options)


def sincos_1d(dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``(len(positions), dim)``: ``[sin(p w_k), cos(p w_k)]`` with ``w_k = base^(-k / (dim /
    2))``, ``k < dim / 2`` (positions may be fractional)."""
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_at(dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``(N, dim)`` float32 sin-cos embedding of ``(N, 2)`` (row, col) positions: the first
    half encodes the column, the second the row (``dim % 4 == 0``)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
    emb = torch.cat([sincos_1d(dim // 2, positions[:, 1], base),
                     sincos_1d(dim // 2, positions[:, 0], base)], dim=1)
    return emb.float()


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``(grid^2, dim)`` float32 fixed positional embedding of a row-major ``grid x grid``
    token grid (DiT's): :func:`sincos_2d_at` of the integer cells."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return sincos_2d_at(dim, torch.stack([rows.flatten(), cols.flatten()], dim=1))


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's timestep features ``(B, dim)``: ``[cos(t f_k), sin(t f_k)]`` with
    ``f_k = max_period^(-k / (dim / 2))`` (a zero column appended when ``dim`` is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t (B,) -> (B, D)``: sinusoidal frequencies, then ``Linear(F, D), SiLU, Linear(D, D)``."""

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``y (B,) -> (B, D)`` with one extra row, ``num_classes``, the null class: labels are
    replaced by it where ``force_drop`` is true, or (without ``force_drop``, in training, with
    ``dropout_prob > 0``) independently with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def drop(self, y: torch.Tensor, force_drop: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The labels after dropout (dropped ones set to ``num_classes``)."""
        if force_drop is not None:
            dropped = force_drop.to(device=y.device, dtype=torch.bool)
        elif self.training and self.dropout_prob > 0:
            draw = torch.rand(y.shape, generator=generator,
                              device=generator.device if generator is not None else y.device)
            dropped = draw.to(y.device) < self.dropout_prob
        else:
            return y
        return torch.where(dropped, torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor, force_drop: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop(y, force_drop, generator))


def unpatchify(x: torch.Tensor, grid: int, patch: int, channels: int) -> torch.Tensor:
    """``(B, grid^2, patch^2 channels) -> (B, channels, grid patch, grid patch)`` for a
    row-major ``grid x grid`` token grid."""
    x = x.reshape(x.shape[0], grid, grid, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid * patch,
                                                      grid * patch)


class FinalLayer(nn.Module):
    """``Linear(modulate(LN(x), shift, scale))`` with ``shift, scale = Linear(SiLU(c))``; both
    linears zero-initialised."""

    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT: ``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W)``
    (see the module docstring)."""

    def __init__(self, cfg: DiTConfig | None = None) -> None:
        super().__init__()
        cfg = DiTConfig() if cfg is None else cfg
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"patch_size ({cfg.patch_size}) must divide image_size "
                             f"({cfg.image_size})")
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden ({cfg.hidden}) must be a multiple of heads ({cfg.heads})")
        self.cfg = cfg
        self.x_embedder = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch_size, cfg.patch_size)
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden, cfg.grid)[None],
                             persistent=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden, cfg.frequency_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden, cfg.class_dropout_prob)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden, cfg.heads, attn=build_attention(cfg), mlp_ratio=cfg.mlp_ratio)
            for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero biases, the patch embedding
        as a linear, ``N(0, 0.02)`` label table and timestep MLP, and zeros for every adaLN
        modulation and the final linear (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [block.adaLN_modulation[1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, p p C_out) -> (B, C_out, g p, g p)`` for the ``g x g`` row-major grid."""
        return unpatchify(x, self.cfg.grid, self.cfg.patch_size, self.cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                force_drop: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise (and variance) prediction ``(B, C_out, H, W)`` for noisy images ``x``,
        timesteps ``t`` and labels ``y``. ``force_drop (B,)`` (bool or 0/1) drops exactly those
        labels to the null class (no random dropout then); otherwise labels drop randomly in
        training, drawn from ``generator`` (or torch's global RNG)."""
        size = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != size:
            raise ValueError(f"x must be (B, {', '.join(map(str, size))}), got "
                             f"{tuple(x.shape)}")
        x = self.x_embedder(x)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t).to(x.dtype) + self.y_embedder(y, force_drop, generator)
        for block in self.blocks:
            x = block(x, c, height, width)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance as DiT: one batched pass over ``[x; x]`` with labels
        ``[y; null]``; the noise channels become ``uncond + cfg_scale (cond - uncond)``, the
        variance channels (``learn_sigma``) are the conditional ones. ``(B, C_out, H, W)``."""
        return classifier_free_guidance(self, x, t, y, cfg_scale, self.cfg.in_channels)


def classifier_free_guidance(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                             y: torch.Tensor, cfg_scale: float, channels: int,
                             **inputs: torch.Tensor) -> torch.Tensor:
    """DiT's guidance for any ``model(x, t, y, force_drop=..., **inputs)``: one pass over
    ``[x; x]`` (each of ``inputs`` doubled too) with labels ``[y; null]``; the first
    ``channels`` output channels become ``uncond + cfg_scale (cond - uncond)``, the rest are
    the conditional ones."""
    batch = x.shape[0]
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool, device=y.device),
                      torch.ones(batch, dtype=torch.bool, device=y.device)])
    doubled = {name: torch.cat([value, value]) for name, value in inputs.items()}
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop=drop,
                **doubled)
    eps, rest = out[:, :channels], out[:, channels:]
    cond, uncond = eps[:batch], eps[batch:]
    return torch.cat([uncond + cfg_scale * (cond - uncond), rest[:batch]], dim=1)


def dit_parameters(cfg: DiTConfig) -> int:
    """The parameter count of ``DiT(cfg)`` (built on the meta device)."""
    return count_on_meta(lambda: DiT(cfg))


class ParameterSplit(NamedTuple):
    """Parameter names of two DiTs: ``shared`` (same name and shape, outside any attention
    module: inheritable), ``attention`` (inside ``blocks.*.attn`` in either), ``only_a`` and
    ``only_b`` (present in one model only; all attention-specific for two configs differing
    only in attention), ``mismatched`` (same name, different shape, outside attention)."""

    shared: list[str]
    attention: list[str]
    only_a: list[str]
    only_b: list[str]
    mismatched: list[str]


def _is_attention(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blocks" and parts[2] == "attn"


def shared_parameter_names(cfg_a: DiTConfig, cfg_b: DiTConfig) -> ParameterSplit:
    """Which parameters of ``DiT(cfg_a)`` and ``DiT(cfg_b)`` are shared vs attention-specific
    (models built on the meta device). For a softmax teacher and a LiT student of the same
    size, ``shared`` is what LiT inherits (spec section 1.4) and ``only_b`` is LiT's DWC."""
    with torch.device("meta"):
        a = {n: p.shape for n, p in DiT(cfg_a).named_parameters()}
        b = {n: p.shape for n, p in DiT(cfg_b).named_parameters()}
    common = [n for n in a if n in b]
    return ParameterSplit(
        shared=[n for n in common if not _is_attention(n) and a[n] == b[n]],
        attention=sorted({n for n in (*a, *b) if _is_attention(n)}),
        only_a=[n for n in a if n not in b],
        only_b=[n for n in b if n not in a],
        mismatched=[n for n in common if not _is_attention(n) and a[n] != b[n]],
    )


__all__ = ["ATTENTIONS", "DIT_PRESETS", "DiT", "DiTConfig", "ParameterSplit", "attention_defaults",
           "build_attention", "classifier_free_guidance", "dit_config", "dit_parameters",
           "shared_parameter_names", "sincos_2d_at", "unpatchify"]
