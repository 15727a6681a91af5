"""RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * weight``, over the last
dim, computed in float32 (float64 stays float64) and returned in x's dtype."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.common import accumulation_dtype


class RMSNorm(nn.Module):
    """Root-mean-square normalisation of the last dim ``(..., dim)``, learned gain ``weight``
    initialised to ones."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(x.dtype)
        y = x.to(acc)
        y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(acc)).to(x.dtype)
