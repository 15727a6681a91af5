"""The GroupMamba image classifier (``[groupmamba]``, Shaker et al., CVPR 2025), as released.

Four stages at strides 4, 8, 16, 32 of residual blocks::

    x = x + DropPath(GroupMambaLayer(x, H, W))        (the layer holds its own LayerNorm)
    x = x + DropPath(PVT2FFN(LN(x), H, W))            fc1 (C -> rC), DWConv3x3, GELU, fc2

Stem: Conv7x7/2 (no bias) + BN + ReLU, 2 x [Conv3x3 + BN + ReLU], Conv3x3/2 (bias) + LN.
Down-sampling between stages: Conv3x3/2 + LN; a LayerNorm (eps 1e-6) after stages 1-3.
Head: the token mean is prepended as a class token and refined by one class block
(``cls + LN(GroupMambaLayer(cls, 1, 1))``, ``cls + MLP(LN(cls))``), normed, and read by two
linear heads ``head`` and ``dist_head`` (DeiT-style hard distillation). Training returns
both logits; eval returns their mean.

Variants (parameter counts with the distillation head): ``groupmamba_tiny`` 23.36 M,
``groupmamba_small`` 34.78 M, ``groupmamba_base`` 57.15 M; ``groupmamba_micro`` is a small
CPU configuration (dims 32/64/128/160, depths 1/1/2/1). Initialisation as released:
``trunc_normal(0.02)`` Linear weights with zero bias, LayerNorm 1/0, Conv2d
``N(0, 2 / fan_out)`` with zero bias (SS2D's depthwise conv included); the SSM parameters
(``x_proj``, ``dt_proj``, ``A``, ``D``) keep their own initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..nn.groupmamba import GroupMambaLayer

_norm = partial(nn.LayerNorm, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's branch with probability ``p`` in training and
    scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                           device=x.device).bernoulli_(keep)
        return x * mask / keep


class PVT2FFN(nn.Module):
    """``fc2(GELU(DWConv3x3(fc1(x))))`` on tokens ``(B, H W, C)``, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        grid = x.transpose(1, 2).unflatten(2, (height, width))
        x = self.dwconv(grid).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class FFN(nn.Module):
    """``fc2(GELU(fc1(x)))``, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x + DropPath(GroupMambaLayer(x))``, then ``x + DropPath(PVT2FFN(LN(x)))``."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attn = GroupMambaLayer(dim)
        self.norm2 = _norm(dim)
        self.mlp = PVT2FFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x, height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class ClassBlock(nn.Module):
    """Refines the class token ``x[:, :1]`` alone: ``cls + LN(GroupMambaLayer(cls, 1, 1))``,
    then ``cls + MLP(LN(cls))`` (plain two-layer GELU MLP); the other tokens pass through."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.norm2 = _norm(dim)
        self.attn = GroupMambaLayer(dim)
        self.mlp = FFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1]
        cls = cls + self.norm1(self.attn(cls, 1, 1))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Stem(nn.Module):
    """Image ``(B, 3, H, W)`` -> tokens ``(B, H/4 W/4, dim)`` (and the grid size)."""

    def __init__(self, in_chans: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(in_chans, hidden, 7, 2),
                                  *_conv_bn_relu(hidden, hidden, 3, 1),
                                  *_conv_bn_relu(hidden, hidden, 3, 1))
        self.proj = nn.Conv2d(hidden, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(self.conv(x))
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class DownSample(nn.Module):
    """``(B, C, H, W)`` -> tokens ``(B, H/2 W/2, C')``: Conv3x3/2 then LayerNorm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, 2, 1)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


def init_weights(m: nn.Module) -> None:
    """Truncated-normal linears (std 0.02), unit LayerNorms, He-normal convolutions (fan out)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class GroupMamba(nn.Module):
    """GroupMamba classifier ``(B, in_chans, H, W) -> logits (B, num_classes)`` (eval) or
    ``(head logits, distillation logits)`` (training, with ``distillation``).

    Module names follow the released code (``patch_embed1..4``, ``block1..4``, ``norm1..4``,
    ``post_network``, ``head``, ``dist_head``).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, stem_hidden_dim: int = 32,
                 embed_dims: Sequence[int] = (64, 128, 348, 448),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 depths: Sequence[int] = (3, 4, 9, 3), drop_path_rate: float = 0.0,
                 distillation: bool = True) -> None:
        super().__init__()
        if not len(embed_dims) == len(mlp_ratios) == len(depths):
            raise ValueError("embed_dims, mlp_ratios and depths must have equal lengths")
        self.num_stages = len(depths)
        self.distillation = distillation
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        for i, (dim, ratio, depth) in enumerate(zip(embed_dims, mlp_ratios, depths, strict=True)):
            embed = Stem(in_chans, stem_hidden_dim, dim) if i == 0 \
                else DownSample(embed_dims[i - 1], dim)
            start = sum(depths[:i])
            blocks = nn.ModuleList(Block(dim, ratio, rates[start + j]) for j in range(depth))
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", _norm(dim))
        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], mlp_ratios[-1])])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.dist_head = nn.Linear(embed_dims[-1], num_classes) if distillation else None
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` -> normalised class token ``(B, embed_dims[-1])``."""
        batch = x.shape[0]
        for i in range(1, self.num_stages + 1):
            x, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, height, width)
            if i != self.num_stages:
                x = getattr(self, f"norm{i}")(x)
                x = x.transpose(1, 2).reshape(batch, -1, height, width)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        for block in self.post_network:
            x = block(x)
        return getattr(self, f"norm{self.num_stages}")(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        features = self.forward_features(x)
        logits = self.head(features)
        if self.dist_head is None:
            return logits
        dist = self.dist_head(features)
        return (logits, dist) if self.training else (logits + dist) / 2


VARIANTS: dict[str, dict] = {
    "tiny": dict(stem_hidden_dim=32, embed_dims=(64, 128, 348, 448), mlp_ratios=(8, 8, 4, 4),
                 depths=(3, 4, 9, 3)),
    "small": dict(stem_hidden_dim=64, embed_dims=(64, 128, 348, 512), mlp_ratios=(8, 8, 4, 4),
                  depths=(3, 4, 16, 3)),
    "base": dict(stem_hidden_dim=64, embed_dims=(96, 192, 424, 512), mlp_ratios=(8, 8, 4, 4),
                 depths=(3, 6, 21, 3)),
    "micro": dict(stem_hidden_dim=16, embed_dims=(32, 64, 128, 160), mlp_ratios=(4, 4, 4, 4),
                  depths=(1, 1, 2, 1), num_classes=10),
}
"""The released configurations (``micro``: a CPU-sized one for 32 x 32 images, 10 classes)."""


def groupmamba_tiny(**kwargs) -> GroupMamba:
    """GroupMamba-T: 23.36 M parameters (83.3 % ImageNet top-1 in the paper)."""
    return GroupMamba(**{**VARIANTS["tiny"], **kwargs})


def groupmamba_small(**kwargs) -> GroupMamba:
    """GroupMamba-S: 34.78 M parameters (83.9 %)."""
    return GroupMamba(**{**VARIANTS["small"], **kwargs})


def groupmamba_base(**kwargs) -> GroupMamba:
    """GroupMamba-B: 57.15 M parameters (84.5 %)."""
    return GroupMamba(**{**VARIANTS["base"], **kwargs})


def groupmamba_micro(**kwargs) -> GroupMamba:
    """A CPU-sized GroupMamba (1.22 M parameters) for 32 x 32 images; spec section 3.6.6."""
    return GroupMamba(**{**VARIANTS["micro"], **kwargs})
