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


def toeplitz_spectrum(c: torch.Tensor, lq: int, lk: int, dtype: torch.dtype) -> torch.Tensor:
    """``rfft(h_n)`` for the diagonals ``c (..., Lq + Lk - 1)``: ``(..., n // 2 + 1)``."""
    n = fft_size(lq, lk)
    # h[s] = c[Lq - 1 - s] at circulant index s mod n, s in [-(Lk - 1), Lq - 1].
    h = torch.roll(F.pad(c.flip(-1), (0, n - c.shape[-1])), shifts=-(lk - 1), dims=-1)
    return torch.fft.rfft(h.to(dtype), n=n, dim=-1)


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
