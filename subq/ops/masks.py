"""Boolean attention masks ``allowed[i, j]`` (True: query i may attend to key j), as small
pure functions, FlexAttention-style. References build their (Lq x Lk) matrices from these;
fast paths never call them at full size.
"""

from __future__ import annotations

import torch


def positions(lq: int, lk: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query indices as a column ``(Lq, 1)`` and key indices as a row ``(1, Lk)``."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return i, j


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``j <= i`` (top-left aligned, as SDPA's ``is_causal``)."""
    i, j = positions(lq, lk, device)
    return j <= i


def full_mask(lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every key visible."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device)


def window_mask(lq: int, lk: int, window: int, causal: bool,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Sliding window: ``i - window <= j <= i`` if causal, else ``|i - j| <= window``."""
    i, j = positions(lq, lk, device)
    if causal:
        return (j <= i) & (j >= i - window)
    return (j - i).abs() <= window


def with_key_padding(allowed: torch.Tensor, key_padding_mask: torch.Tensor | None
                     ) -> torch.Tensor:
    """Combine an ``(Lq, Lk)`` mask with a ``(B, Lk)`` padding mask (True = padding) into
    ``(B, 1, Lq, Lk)``; without padding, ``(1, 1, Lq, Lk)``."""
    allowed = allowed[None, None]
    if key_padding_mask is None:
        return allowed
    return allowed & ~key_padding_mask[:, None, None, :]
