"""Token orders for image grids (Scale-DiT, ``hierarchical_local`` in DESIGN.md), as
permutations: ``order[p]`` is the raster index (``row * width + col``) of the token placed at
sequence position ``p``; ``x[:, order]`` reorders raster tokens, ``inverse(order)`` undoes it.

* ``raster``: row by row.
* ``window_first``: windows of ``window x window`` tokens in raster order over windows, raster
  inside each window (the official Scale-DiT code's ``window_permutation``).
* ``hilbert``: windows in raster order, a Hilbert curve inside each window (side: the next
  power of two >= window; the notebook's ``hilbert_window_permutation``, the paper's option).

Grids may have a partial last row (``count < height * width``); windows at the right and
bottom edges may be partial. Also the low-resolution RoPE anchors: low-res token ``(i, j)``
takes the position ``(factor * i, factor * j)`` of the top-left high-res token it summarises.
"""

from __future__ import annotations

import torch

ORDERS = ("window_first", "hilbert", "raster")


def hilbert_index(x: torch.Tensor, y: torch.Tensor, side: int) -> torch.Tensor:
    """Distance along the Hilbert curve of a ``side x side`` grid (side a power of two) of the
    cells ``(x, y)`` (integer tensors of one shape)."""
    x, y = x.clone(), y.clone()
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        flip = ~ry & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        x, y = torch.where(~ry, y, x), torch.where(~ry, x, y)
        s //= 2
    return d


def grid_order(count: int, width: int, window: int, order: str,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The permutation ``(count,)`` (int64) that puts ``count`` raster tokens of a grid
    ``width`` tokens wide in ``order`` (one of :data:`ORDERS`) with ``window``-sized windows."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    raster = torch.arange(count, device=device)
    if order == "raster" or count == 0:
        return raster
    row, col = raster // width, raster % width
    windows_per_row = -(-width // window)
    window_id = (row // window) * windows_per_row + col // window
    r, c = row % window, col % window
    if order == "window_first":
        inner = r * window + c
    else:
        side = 1 << max(window - 1, 0).bit_length()
        inner = hilbert_index(c, r, side)
    key = window_id * (1 << max(window - 1, 0).bit_length()) ** 2 + inner
    return torch.argsort(key, stable=True)


def inverse(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[order[p]] = p``: ``x[:, order][:, inverse(order)] == x``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def grid_positions(height: int, width: int, factor: int = 1,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``(height * width, 2)`` (row, col) positions of a raster grid, scaled by ``factor``:
    with ``factor = downsample`` these are the low-res RoPE anchors ``(i, j) -> (r*i, r*j)``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=-1) * factor
