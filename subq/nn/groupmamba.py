"""The Modulated Group Mamba layer (``[groupmamba]``, Shaker et al., CVPR 2025), as released.

For tokens ``x (B, N, C)`` on an ``H x W`` grid (``N = H W``, ``C % 4 == 0``)::

    x   = LN(x)
    a   = sigmoid(fc2(relu(fc1(mean_tokens(x)))))      channel affinity (B, C), fc1: C -> C/16
    y_k = VSSS_k(chunk_k(x))                            k = 1..4, one scan direction each
    y   = concat(y_1, ..., y_4) * skip_scale * x         product with the normalised input
    out = proj(LN(y * a))                                the SAME LayerNorm module as above

``VSSS_k`` is a :class:`~subq.nn.visual_scan.VisualSelectiveScan` on ``C/4`` channels with
``d_state=1, ssm_ratio=1, d_conv=3`` and the single direction ``DIRECTIONS[k]`` (row-major,
column-major, and their reverses). The multiplicative ``* x`` and the reused norm are in the
released code (the paper's figure draws an earlier variant; the code is followed). Each group
does a 1-D scan over ``L = H W`` tokens with ``C/4`` channels: O(L C) scan work per layer,
a quarter of a 4-direction scan over all channels, plus O(L C^2) projections. The four scans
run as one grouped selective-scan call (:func:`~subq.nn.visual_scan.scan_jointly`), which
computes exactly what the four modules compute one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .visual_scan import DIRECTIONS, VisualSelectiveScan, scan_jointly


class GroupMambaLayer(nn.Module):
    """``layer(x (B, H W, dim), H, W) -> (B, H W, dim)``; ``dim % 4 == 0``, ``dim >=
    reduction``. Float16 input is computed (and returned) in float32, as released.

    Parameter names follow the released code: ``norm``, ``fc1``, ``fc2``, ``mamba_g1`` ...
    ``mamba_g4`` (directions ``row``, ``column``, ``row_reversed``, ``column_reversed``),
    ``proj``, ``skip_scale`` (initialised to 1).
    """

    def __init__(self, dim: int, d_state: int = 1, d_conv: int = 3, expand: float = 1.0,
                 reduction: int = 16) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim must be divisible by the 4 channel groups, got {dim}")
        if dim < reduction:
            raise ValueError(f"dim={dim} must be at least reduction={reduction}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim // reduction)
        self.fc2 = nn.Linear(dim // reduction, dim)
        for k, direction in enumerate(DIRECTIONS, start=1):
            self.add_module(f"mamba_g{k}", VisualSelectiveScan(
                dim // 4, d_state=d_state, ssm_ratio=expand, d_conv=d_conv,
                directions=(direction,)))
        self.proj = nn.Linear(dim, dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    @property
    def groups(self) -> tuple[VisualSelectiveScan, ...]:
        """The four one-direction scans, in channel order."""
        return self.mamba_g1, self.mamba_g2, self.mamba_g3, self.mamba_g4

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """Channel affinity ``sigmoid(fc2(relu(fc1(mean_tokens(x)))))``: ``(B, N, C) -> (B,
        C)`` for the normalised input ``x``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=1)))))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] != height * width:
            raise ValueError(f"x has {x.shape[1]} tokens, expected H*W = {height}*{width}")
        if x.dtype == torch.float16:
            x = x.float()
        batch = x.shape[0]
        x = self.norm(x)
        affinity = self.affinity(x)
        grid = x.view(batch, height, width, self.dim)
        y = torch.cat(scan_jointly(self.groups, grid.chunk(4, dim=-1)), dim=-1)
        y = (y * self.skip_scale * grid).view(batch, height * width, self.dim)
        return self.proj(self.norm(y * affinity[:, None]))
