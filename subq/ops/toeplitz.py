"""Toeplitz matrix products by FFT (Luo et al., ``kernelized_rpe``, section 3.2).

A rectangular Toeplitz matrix ``C (Lq, Lk)`` with ``C[i, j] = c[j - i + Lq - 1]`` is given by
its ``Lq + Lk - 1`` diagonals ``c``, offsets ``t = j - i`` from ``-(Lq - 1)`` to ``Lk - 1``.
``C @ X`` is the convolution ``Y_i = sum_j h[i - j] X_j`` with ``h[s] = c[Lq - 1 - s]``; in a
circulant of size ``n >= Lq + Lk - 1`` (a power of two) the wrap-around never reaches the
rows kept, so

    Y = irfft(rfft(h_n) * rfft(X_n))[:Lq]                 (h_n, X_n: zero-padded to n)

in O((Lq + Lk) log(Lq + Lk)) per column instead of O(Lq Lk). Causal (offsets ``t > 0`` are
the future) is the same product with those diagonals set to 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_diagonals(c: torch.Tensor, lq: int) -> torch.Tensor:
    """``c (..., Lq + Lk - 1)`` with the diagonals of future offsets ``t = j - i > 0`` zeroed."""
    offsets = torch.arange(c.shape[-1], device=c.device) - (lq - 1)
    return c * (offsets <= 0).to(c.dtype)


def dense_toeplitz(c: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """The explicit matrix ``C (..., Lq, Lk)``, ``C[i, j] = c[..., j - i + Lq - 1]``."""
    i = torch.arange(lq, device=c.device)[:, None]
    j = torch.arange(lk, device=c.device)[None, :]
    return c[..., j - i + lq - 1]


def fft_size(lq: int, lk: int) -> int:
    """The smallest power of two ``>= Lq + Lk - 1``."""
    return 1 << max(lq + lk - 2, 0).bit_length()


def circulant_column(c: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """The first column ``h (..., n)`` of the circulant that embeds ``C``:
    ``h[s] = c[Lq - 1 - s]`` at index ``s mod n``, ``s`` in ``[-(Lk - 1), Lq - 1]``, else 0."""
    n = fft_size(lq, lk)
    return torch.roll(F.pad(c.flip(-1), (0, n - c.shape[-1])), shifts=-(lk - 1), dims=-1)


def toeplitz_spectrum(c: torch.Tensor, lq: int, lk: int, dtype: torch.dtype) -> torch.Tensor:
    """``rfft(h_n)`` for the diagonals ``c (..., Lq + Lk - 1)``: ``(..., n // 2 + 1)``."""
    return torch.fft.rfft(circulant_column(c, lq, lk).to(dtype), n=fft_size(lq, lk), dim=-1)


def apply_spectrum(spectrum: torch.Tensor, x: torch.Tensor, lq: int) -> torch.Tensor:
    """``C @ x`` along the last dim: ``x (..., Lk)`` (or already zero-padded to the FFT size)
    -> ``(..., Lq)``, for ``spectrum`` from :func:`toeplitz_spectrum` (broadcast against
    ``x``'s leading dims)."""
    n = 2 * (spectrum.shape[-1] - 1) if spectrum.shape[-1] > 1 else 1
    return torch.fft.irfft(spectrum * torch.fft.rfft(x, n=n, dim=-1), n=n, dim=-1)[..., :lq]


def toeplitz_matmul(c: torch.Tensor, x: torch.Tensor, lq: int) -> torch.Tensor:
    """``C @ x`` by FFT for the Toeplitz ``C`` with diagonals ``c (..., Lq + Lk - 1)`` and
    ``x (..., Lk, F)``; leading dims broadcast. Returns ``(..., Lq, F)`` in the dtype of ``x``
    (float32 or float64)."""
    spectrum = toeplitz_spectrum(c, lq, x.shape[-2], x.dtype)
    return apply_spectrum(spectrum[..., None, :], x.transpose(-1, -2), lq).transpose(-1, -2)


def dense_toeplitz2d(c: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The explicit matrix ``C (..., L, L)`` (``L = height width``, row-major tokens) of the 2-D
    diagonals ``c (..., 2 height - 1, 2 width - 1)``:
    ``C[i, j] = c[..., j1 - i1 + height - 1, j2 - i2 + width - 1]`` for ``i = i1 width + i2``."""
    rows = torch.arange(height, device=c.device).repeat_interleave(width)
    cols = torch.arange(width, device=c.device).repeat(height)
    return c[..., rows[None, :] - rows[:, None] + height - 1,
             cols[None, :] - cols[:, None] + width - 1]


class Circulant:
    """A Toeplitz (1-D: ``c (..., Lq + Lk - 1)``) or Toeplitz-block-Toeplitz (2-D, a row-major
    ``height x width`` grid of tokens: ``c (..., 2 height - 1, 2 width - 1)``) matrix ``C``,
    embedded in a circulant of size ``n`` (1-D, a power of two ``>= Lq + Lk - 1``) or
    ``(2 height, 2 width)`` (2-D, ``rfft2``) and kept as :attr:`spectrum`, the real FFT of its
    first column, computed once.

    ``embed(x)`` zero-pads keys ``x (..., Lk)`` to the circulant layout (do it once, before
    elementwise products); ``apply(spectrum, xe)`` is ``C @ x`` along the last dim for an
    embedded ``xe`` and a slice ``spectrum`` of :attr:`spectrum` that broadcasts against it,
    returning ``(..., Lq)``; ``inverse(spectrum * transform(xe))`` is the same in two steps
    (to share one forward transform among several spectra). The circulant of ``h`` is a real
    matrix whose transpose has the spectrum ``conj(spectrum)``, so the adjoint ``C^T y`` of
    queries ``y (..., Lq)`` is ``inverse(conj(spectrum) * transform(embed(y)), length=Lk)``, and
    the gradient of ``<g, C x>`` with respect to :attr:`kernel` the circular cross-correlation
    ``full_inverse(transform(embed(g)) * conj(transform(embed(x))))``.
    """

    def __init__(self, c: torch.Tensor, lq: int, lk: int, dtype: torch.dtype,
                 grid: tuple[int, int] | None = None) -> None:
        self.lq, self.lk = lq, lk
        if grid is None:
            self.grid, self.size = None, (fft_size(lq, lk),)
            h = circulant_column(c, lq, lk)
        else:
            height, width = grid
            self.grid, self.size = grid, (2 * height, 2 * width)
            # h[s1, s2] = c[height - 1 - s1, width - 1 - s2] at circulant index (s1, s2) mod size.
            h = F.pad(c.flip(-1, -2), (0, 1, 0, 1))
            h = torch.roll(h, shifts=(-(height - 1), -(width - 1)), dims=(-2, -1))
        self.kernel = h.to(dtype)
        """The circulant's first column (1-D) or block (2-D), real: ``(..., *size)``."""
        self.spectrum = self.transform(self.kernel)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Keys ``x (..., Lk)`` (or, for the adjoint ``C^T``, queries ``(..., Lq)``) zero-padded
        to the circulant's layout: both start at index 0."""
        if self.grid is None:
            return F.pad(x, (0, self.size[0] - x.shape[-1]))
        height, width = self.grid
        return F.pad(x.unflatten(-1, self.grid), (0, width, 0, height))

    def embed_product(self, x: torch.Tensor, y: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """``embed(x * y)`` for keys ``x, y (..., Lk)`` (broadcasting); with ``out`` (an
        embedded buffer whose padding is already zero) the product is written into its key
        region only."""
        if out is None:
            return self.embed(x * y)
        if self.grid is None:
            torch.mul(x, y, out=out[..., :self.lk])
        else:
            height, width = self.grid
            torch.mul(x.unflatten(-1, self.grid), y.unflatten(-1, self.grid),
                      out=out[..., :height, :width])
        return out

    def transform(self, xe: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The real FFT of an embedded ``xe`` over its last one (1-D) or two (2-D) dims."""
        if self.grid is None:
            return torch.fft.rfft(xe, n=self.size[0], dim=-1, out=out)
        return torch.fft.rfft2(xe, s=self.size, out=out)

    def inverse(self, product: torch.Tensor, out: torch.Tensor | None = None,
                length: int | None = None) -> torch.Tensor:
        """Inverse of :meth:`transform`, cropped to the queries: ``(..., Lq)`` (``length``:
        to its first ``length`` positions instead, e.g. ``Lk`` for the adjoint ``C^T``)."""
        length = self.lq if length is None else length
        if self.grid is None:
            return torch.fft.irfft(product, n=self.size[0], dim=-1, out=out)[..., :length]
        height, width = self.grid  # 2-D: self attention only, Lq = Lk
        y = torch.fft.irfft2(product, s=self.size, out=out)
        return y[..., :height, :width].flatten(-2)

    def full_inverse(self, product: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`transform` over the whole circulant: ``(..., *size)``."""
        if self.grid is None:
            return torch.fft.irfft(product, n=self.size[0], dim=-1)
        return torch.fft.irfft2(product, s=self.size)

    def apply(self, spectrum: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
        return self.inverse(spectrum * self.transform(xe))
