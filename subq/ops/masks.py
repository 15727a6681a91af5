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


def fixed_sparse_mask(length: int, span: int, summary: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Sparse Transformer's causal "fixed" pattern (Child et al. 2019; Combiner's "Fixed"
    baseline): ``j <= i`` and either ``j`` in the query's own span of ``span`` tokens
    (``j // span == i // span``) or ``j`` one of the last ``summary`` positions of a span
    (``j mod span >= span - summary``)."""
    i, j = positions(length, length, device)
    own = (j // span) == (i // span)
    return (j <= i) & (own | (j % span >= span - summary))


def axial_sparse_mask(length: int, span: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Causal row-major axial attention (Ho et al. 2019; Combiner's "Axial" baseline) on rows
    of ``span`` tokens: ``j <= i`` in the query's own row, or ``j`` in its column
    (``j = i mod span``) in an earlier row."""
    i, j = positions(length, length, device)
    return (j <= i) & (((j // span) == (i // span)) | ((j % span) == (i % span)))
