"""Rotary position embedding (RoPE, Su et al. 2021), the rotate-half convention of
Llama / Hugging Face: channel pairs ``(c, c + D/2)`` of a vector at position p are rotated by
the angle ``p * theta^(-2c/D)``,

    rope(x)_p = x_p * cos(p w) + rotate_half(x_p) * sin(p w),   rotate_half(a, b) = (-b, a).

Rotating q and k by their positions makes ``q_i . k_j`` depend on ``i - j`` only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.common import accumulation_dtype


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE for ``(B, H, L, D)`` tensors with even ``D``; ``theta=10000`` (SCOUT uses 1e6).

    ``rope(x, offset)`` rotates position ``offset + l`` of ``x`` for l in ``0..L-1``, so a
    decoding step passes the number of tokens already seen.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def angles(self, length: int, offset: int, device: torch.device, dtype: torch.dtype
               ) -> torch.Tensor:
        """``(L, D)`` angles ``p * theta^(-2c/D)``, each frequency used for both halves."""
        exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=dtype) / self.head_dim
        inv_freq = self.theta ** -exponent
        pos = torch.arange(offset, offset + length, device=device, dtype=dtype)
        freqs = pos[:, None] * inv_freq[None, :]
        return torch.cat([freqs, freqs], dim=-1)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        acc = torch.float64 if accumulation_dtype(x.dtype) == torch.float64 else torch.float32
        ang = self.angles(x.shape[-2], offset, x.device, acc)
        y = x.to(acc)
        return (y * ang.cos() + _rotate_half(y) * ang.sin()).to(x.dtype)
