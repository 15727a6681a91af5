"""Kernel feature maps phi for linear attention, ``phi(q) . phi(k) ~ kernel(q, k)``.

Deterministic maps (LiT, ``linear``):

    relu:     phi(x) = ReLU(x) + eps
    elu1:     phi(x) = ELU(x) + 1
    identity: phi(x) = x

Random features (Performer; Luo et al., ``kernelized_rpe``), with ``w_1 .. w_m ~ N(0, I_d)``
the rows of ``projection (m, d)``:

    prf: phi(x) = exp(w_r . x - |x|^2 / 2) / sqrt(m),             r = 1..m   (m features)
    trf: phi(x) = exp(|x|^2 / 2) / sqrt(m) [sin(w_r . x), cos(w_r . x)]     (2m features)

both unbiased: ``E_w[phi(x) . phi(y)] = exp(x . y)``. Shapes ``(..., L, d) -> (..., L, F)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DETERMINISTIC_MAPS = ("relu", "elu1", "identity")
RANDOM_MAPS = ("prf", "trf")


def deterministic_features(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """``relu`` (ReLU(x) + eps), ``elu1`` (ELU(x) + 1) or ``identity``, elementwise."""
    if kind == "relu":
        return x.clamp_min(0.0).add_(eps)  # clamp_min's backward needs x, not its output
    if kind == "elu1":
        return F.elu(x) + 1.0
    return x


def draw_projection(num_features: int, dim: int, seed: int, *, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """``w (m, d)`` with i.i.d. N(0, 1) entries, drawn on the CPU from ``seed`` (so every device
    sees the same draw) and moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def random_features(x: torch.Tensor, projection: torch.Tensor, kind: str) -> torch.Tensor:
    """Positive (``prf``) or trigonometric (``trf``) random features of ``x (..., L, d)`` for
    ``projection (m, d)``; ``x`` and ``projection`` share a dtype."""
    m = projection.shape[0]
    wx = x @ projection.transpose(0, 1)
    half_sq_norm = 0.5 * x.pow(2).sum(dim=-1, keepdim=True)
    if kind == "prf":
        return torch.exp(wx - half_sq_norm) * m ** -0.5
    return torch.exp(half_sq_norm) * m ** -0.5 * torch.cat([torch.sin(wx), torch.cos(wx)], dim=-1)
