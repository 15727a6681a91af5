"""Rotary position embedding (RoPE, Su et al. 2021), the rotate-half convention of
Llama / Hugging Face: channel pairs ``(c, c + D/2)`` of a vector at position p are rotated by
the angle ``p * theta^(-2c/D)``,

    rope(x)_p = x_p * cos(p w) + rotate_half(x_p) * sin(p w),   rotate_half(a, b) = (-b, a).

Rotating q and k by their positions makes ``q_i . k_j`` depend on ``i - j`` only.

:class:`MultiAxisRotaryEmbedding` is the multi-axis form over integer id tuples (FLUX's and
Scale-DiT's ``(text, row, col)`` ids), with interleaved pairs and an NTK factor on the base.
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


def axes_split(head_dim: int, axes: int) -> tuple[int, ...]:
    """The even split of ``head_dim`` channels over ``axes`` position axes: ``head_dim / axes``
    channels each when that is even; otherwise the ``head_dim / 2`` channel pairs are dealt as
    evenly as possible, the extra pairs to the last axes (64 over 3 axes: ``(20, 22, 22)``)."""
    if axes < 1 or head_dim % 2 or head_dim < 2 * axes:
        raise ValueError(f"head_dim ({head_dim}) must be even and >= 2 * axes ({2 * axes}) "
                         f"for a multi-axis RoPE split")
    pairs, extra = divmod(head_dim // 2, axes)
    return tuple(2 * (pairs + (a >= axes - extra)) for a in range(axes))


class MultiAxisRotaryEmbedding(nn.Module):
    """Multi-axis RoPE (Su et al. 2021, as FLUX applies it to ``(text, row, col)`` ids; used by
    Scale-DiT, Zhang & Tai, arXiv 2510.16325) for ``(B, H, N, D)`` tensors and integer ids
    ``positions (N, A)``.

    The head dimension is split into consecutive slices, ``axes_dim[a]`` channels (even) for
    axis ``a`` (default: :func:`axes_split`, ``D / A`` each when even). Inside the slice of
    axis ``a`` (offset ``o_a``, width ``d_a``) the adjacent channel pair
    ``(o_a + 2c, o_a + 2c + 1)`` of the token with ids ``p`` is rotated by the angle

        phi = p_a * (theta * kappa)^(-2c / d_a),    c = 0 .. d_a/2 - 1,

        y_{o_a+2c}   = x_{o_a+2c} cos(phi) - x_{o_a+2c+1} sin(phi)
        y_{o_a+2c+1} = x_{o_a+2c} sin(phi) + x_{o_a+2c+1} cos(phi)

    (the interleaved pairs of FLUX / diffusers' ``apply_rotary_emb``, not the rotate-half pairs
    of :class:`RotaryEmbedding`). ``kappa`` is the NTK factor (``ntk_factor`` of diffusers'
    ``get_1d_rotary_pos_embed``: it multiplies the base ``theta``); 1 leaves the stock base.
    Rotating q and k makes ``q_n . k_m`` depend on the id differences ``p_n - p_m`` only.
    """

    def __init__(self, head_dim: int, axes_dim: tuple[int, ...] | None = None, axes: int = 3,
                 theta: float = 10000.0) -> None:
        super().__init__()
        axes_dim = axes_split(head_dim, axes) if axes_dim is None else tuple(axes_dim)
        if sum(axes_dim) != head_dim or any(d < 2 or d % 2 for d in axes_dim):
            raise ValueError(f"axes_dim {axes_dim} must be even sizes summing to head_dim "
                             f"({head_dim})")
        self.head_dim = head_dim
        self.axes_dim = axes_dim
        self.theta = theta

    def angles(self, positions: torch.Tensor, ntk_factor: float = 1.0) -> torch.Tensor:
        """``(N, D / 2)`` float64 angles ``phi``, pair by pair in channel order."""
        base = self.theta * ntk_factor
        pos = positions.to(torch.float64)
        parts = []
        for a, d in enumerate(self.axes_dim):
            exponent = torch.arange(0, d, 2, device=pos.device, dtype=torch.float64) / d
            parts.append(pos[:, a, None] * base ** -exponent)
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ntk_factor: float = 1.0
                ) -> torch.Tensor:
        if positions.shape != (x.shape[-2], len(self.axes_dim)):
            raise ValueError(f"positions must be ({x.shape[-2]}, {len(self.axes_dim)}), got "
                             f"{tuple(positions.shape)}")
        acc = torch.float64 if accumulation_dtype(x.dtype) == torch.float64 else torch.float32
        ang = self.angles(positions, ntk_factor)
        cos, sin = ang.cos().to(acc), ang.sin().to(acc)
        pairs = x.to(acc).unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        return out.flatten(-2).to(x.dtype)
