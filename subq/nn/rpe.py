"""Learned relative positional encoding for kernelized attention (Luo et al. 2021, DESIGN key
``kernelized_rpe``): a table of scalars ``b_t``, one per relative offset ``t = j - i`` (and per
head unless shared), zero-initialised, and the attention layer that uses it:

    out_i = phi(q_i) sum_j e^{b_{j-i}} phi(k_j)^T v_j / phi(q_i) sum_j e^{b_{j-i}} phi(k_j)^T

(see :mod:`subq.ops.kernelized_rpe`; the Toeplitz products are computed by FFT).
"""

from __future__ import annotations

import torch
from torch import nn

import subq

from .. import registry
from .dit import merge_heads, split_heads


class RelativePositionBias(nn.Module):
    """``b`` for offsets ``-(max_len - 1) .. max_len - 1``: ``(heads, 2 max_len - 1)`` (one row
    if ``shared``), zeros at initialisation. ``forward(lq, lk)`` gives the slice for offsets
    ``-(lq - 1) .. lk - 1`` in the layout of ``kernelized_rpe``'s ``bias`` option."""

    def __init__(self, heads: int, max_len: int, shared: bool = False) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len}")
        self.max_len = max_len
        self.table = nn.Parameter(torch.zeros(1 if shared else heads, 2 * max_len - 1))

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        if max(lq, lk) > self.max_len:
            raise ValueError(f"lengths ({lq}, {lk}) exceed max_len={self.max_len}")
        centre = self.max_len - 1
        return self.table[:, centre - (lq - 1): centre + lk]


class RelativePositionBias2d(nn.Module):
    """``b`` for 2-D offsets ``(d1, d2)`` on a row-major token grid of at most
    ``max_height x max_width``: ``(heads, 2 max_height - 1, 2 max_width - 1)`` (one row if
    ``shared``), zeros at initialisation. ``forward(height, width)`` gives the centred slice
    ``(heads, 2 height - 1, 2 width - 1)``, the layout of ``kernelized_rpe``'s 2-D ``bias``
    (entry ``[d1 + height - 1, d2 + width - 1]`` for ``d = j - i`` on the grid)."""

    def __init__(self, heads: int, max_height: int, max_width: int,
                 shared: bool = False) -> None:
        super().__init__()
        if min(max_height, max_width) < 1:
            raise ValueError(f"max_height and max_width must be positive ints, got "
                             f"{max_height}, {max_width}")
        self.max_height, self.max_width = max_height, max_width
        self.table = nn.Parameter(torch.zeros(1 if shared else heads, 2 * max_height - 1,
                                              2 * max_width - 1))

    def forward(self, height: int, width: int) -> torch.Tensor:
        if height > self.max_height or width > self.max_width:
            raise ValueError(f"grid ({height}, {width}) exceeds max_height, max_width = "
                             f"({self.max_height}, {self.max_width})")
        rows, cols = self.max_height - 1, self.max_width - 1
        return self.table[:, rows - (height - 1): rows + height,
                          cols - (width - 1): cols + width]


class KernelizedRPEAttention(nn.Module):
    """Multi-head self attention with NPRF features and a learned RPE, ``attn(x (B, L, D))``;
    with ``max_len=(max_height, max_width)`` the RPE is a 2-D table over grid offsets
    (:class:`RelativePositionBias2d`, non-causal only) and the layer is called as
    ``attn(x, height, width)`` on a row-major ``height x width`` grid of tokens.

    The random projection ``w (m, d)`` is a buffer drawn from ``seed``; with ``redraw=True`` a
    fresh one is drawn at every training-mode forward (Performer's policy), otherwise it stays
    fixed (the paper does not say which it used). ``feature_map`` (``"prf"``/``"trf"``) and
    ``normalize`` (NPRF; ``False``: Performer's PRF) go to the mechanism; ``rpe=False`` drops
    the table (plain kernelized attention, Luo et al.'s baseline without RPE).
    """

    def __init__(self, dim: int, heads: int, max_len: int | tuple[int, int], *,
                 num_features: int = 32, causal: bool = False, shared_bias: bool = False,
                 redraw: bool = False, seed: int = 0, feature_map: str = "prf",
                 normalize: bool = True, rpe: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if isinstance(max_len, tuple) and causal:
            raise ValueError("a 2-D relative position bias (max_len=(H, W)) is non-causal only")
        registry.get("kernelized_rpe").resolve_options(
            {"feature_map": feature_map, "normalize": normalize})
        self.heads, self.causal, self.redraw = heads, causal, redraw
        self.feature_map, self.normalize = feature_map, normalize
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = (None if not rpe else
                     RelativePositionBias2d(heads, *max_len, shared_bias)
                     if isinstance(max_len, tuple) else
                     RelativePositionBias(heads, max_len, shared_bias))
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self._draw(num_features, dim // heads))

    def _draw(self, num_features: int, head_dim: int) -> torch.Tensor:
        return torch.randn(num_features, head_dim, generator=self.generator)

    def forward(self, x: torch.Tensor, height: int | None = None,
                width: int | None = None) -> torch.Tensor:
        """``x (B, L, D)``; with a 2-D table the tokens are a row-major ``height x width``
        grid (``L = height width``)."""
        if self.training and self.redraw:
            self.projection = self._draw(*self.projection.shape).to(self.projection)
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        length = x.shape[1]
        if self.bias is None:
            bias = None
        elif isinstance(self.bias, RelativePositionBias2d):
            if height is None or width is None or height * width != length:
                raise ValueError(f"a 2-D bias needs height * width = L = {length}, got "
                                 f"{height}, {width}")
            bias = self.bias(height, width)
        else:
            bias = self.bias(length, length)
        o = subq.attention(q, k, v, method="kernelized_rpe", causal=self.causal, bias=bias,
                           projection=self.projection, feature_map=self.feature_map,
                           normalize=self.normalize)
        return self.proj(merge_heads(o))
