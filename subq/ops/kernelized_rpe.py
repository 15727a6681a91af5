"""Kernelized attention with relative positional encoding via FFT (Luo et al. 2021, "Stable,
Fast and Accurate", DESIGN key ``kernelized_rpe``; Eq. 10-13, Algorithm 1): normalised positive
random features (NPRF) and a Toeplitz RPE.

    out_i = phi(q_i) sum_j c_{j-i} phi(k_j)^T v_j  /  phi(q_i) sum_j c_{j-i} phi(k_j)^T,
    c_t = exp(b_t),  phi(x) = exp(w . x - |x|^2 / 2) / sqrt(m),  w_1..w_m ~ N(0, I_d)

with ``q, k`` unit-normalised first (NPRF, the default; then ``E[phi(q) . phi(k)] =
exp(q^ . k^)`` and ``scale`` is unused, as in the paper) or scaled by ``sqrt(scale)``
(``normalize=False``: Performer's PRF of ``exp(scale q . k)``). ``C = [c_{j-i}]`` is Toeplitz, so
``D1 = C A1`` (rows ``vec(phi(k_j)^T v_j)``) and ``D2 = C A2`` (rows ``phi(k_j)``) are computed by
FFT (:mod:`subq.ops.toeplitz`) in O(L log L m dv) time and O(L m dv) memory, in float32 (float64
for float64 inputs) whatever the input dtype. Causal self attention sets ``c_t = 0`` for
``t > 0``. In causal cross each output row depends on its own query only, so it equals the
non-causal cross computation. ``bias=None`` means ``b = 0`` and takes the O(L) linear path
(:func:`subq.ops.linear.normalised_linear_attention`), which the FFT path equals for a zero
bias. Padding keys drop out of both sums; a query that sees no key outputs 0.

No ``step``: the FFT needs every position at once; the method speeds up training, not decoding.

Options (defaults): ``num_features=32`` (m), ``feature_map="prf"`` (``trf``: sin/cos features,
2m of them), ``normalize=True``, ``seed=0`` (draws ``w``), ``projection=None`` (an explicit
``w (m, D)``, overriding ``num_features`` and ``seed``), ``bias=None`` (``b``, shape
``(Hq, Lq + Lk - 1)`` or ``(Lq + Lk - 1,)``, entry ``t + Lq - 1`` for offset ``t = j - i``).
Patterns: all four.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism, Option
from .common import accumulation_dtype, repeat_kv
from .feature_maps import RANDOM_MAPS, draw_projection, random_features
from .linear import divide_or_zero, normalised_linear_attention
from .toeplitz import (
    apply_spectrum,
    causal_diagonals,
    dense_toeplitz,
    fft_size,
    toeplitz_spectrum,
)

DEFAULT_FEATURES = 32
#: Spectrum elements (complex) per block of features: bounds the FFT working set.
_BLOCK_ELEMENTS = 1 << 24


def _projection(projection, num_features, seed, dim, dtype, device) -> torch.Tensor:
    if projection is None:
        return draw_projection(num_features, dim, seed, dtype=dtype, device=device)
    if projection.dim() != 2 or projection.shape[1] != dim:
        raise ValueError(f"option 'projection' must have shape (m, D) with D={dim}, "
                         f"got {tuple(projection.shape)}")
    return projection.to(device=device, dtype=dtype)


def _features(q, k, key_padding_mask, *, scale, num_features, feature_map, normalize, seed,
              projection):
    """``phi(q) (B, Hq, Lq, F)`` and ``phi(k) (B, Hkv, Lk, F)`` in the accumulation dtype,
    padding keys zeroed."""
    acc = accumulation_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    else:
        q, k = q * scale ** 0.5, k * scale ** 0.5
    w = _projection(projection, num_features, seed, q.shape[-1], acc, q.device)
    pq, pk = random_features(q, w, feature_map), random_features(k, w, feature_map)
    if key_padding_mask is not None:
        pk = pk.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return pq, pk


def _diagonals(bias, q_heads, lq, lk, causal, dtype) -> torch.Tensor:
    """``c = exp(b)`` as ``(Hq | 1, Lq + Lk - 1)``, future diagonals zeroed if causal."""
    if bias.dim() not in (1, 2) or bias.shape[-1] != lq + lk - 1 or (
            bias.dim() == 2 and bias.shape[0] not in (1, q_heads)):
        raise ValueError(f"option 'bias' must have shape (Hq, Lq + Lk - 1)=({q_heads}, "
                         f"{lq + lk - 1}) or ({lq + lk - 1},), got {tuple(bias.shape)}")
    c = torch.exp(bias.to(dtype)).reshape(-1, lq + lk - 1)
    return causal_diagonals(c, lq) if causal else c


def _sees_a_key(key_padding_mask: torch.Tensor, lq: int, causal: bool) -> torch.Tensor:
    """``(B, Lq)`` float: 1 where query i has an unpadded key in its range (``j <= i`` if
    causal), else 0."""
    present = (~key_padding_mask).to(torch.int32)
    if causal:
        return (present.cumsum(dim=-1)[:, :lq] > 0).to(torch.float32)
    return present.amax(dim=-1, keepdim=True).expand(-1, lq).to(torch.float32)


def kernelized_rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             causal: bool = False, cross: bool = False,
                             scale: float | None = None,
                             key_padding_mask: torch.Tensor | None = None,
                             num_features: int = DEFAULT_FEATURES, feature_map: str = "prf",
                             normalize: bool = True, seed: int = 0,
                             projection: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """NPRF kernelized attention with an RPE bias, the Toeplitz products by FFT.

    ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` -> ``(B, Hq, Lq, Dv)``.
    """
    batch, q_heads, lq, dim = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    causal = causal and not cross
    pq, pk = _features(q, k, key_padding_mask, scale=scale, num_features=num_features,
                       feature_map=feature_map, normalize=normalize, seed=seed,
                       projection=projection)
    pq = pq.view(batch, kv_heads, groups, lq, pq.shape[-1])
    v = v.to(pk.dtype)
    if bias is None:
        out = normalised_linear_attention(pq, pk, v, causal=causal)
        return out.reshape(batch, q_heads, lq, dv).to(q.dtype)
    c = _diagonals(bias, q_heads, lq, lk, causal, pk.dtype)
    c = c.view(kv_heads, groups, -1) if c.shape[0] == q_heads else c.view(1, 1, -1)
    spectrum = toeplitz_spectrum(c, lq, lk, pk.dtype)[:, :, None, None, :]
    n = fft_size(lq, lk)
    # Keys along the last dim, zero-padded to the FFT size once, before the outer product.
    v1 = F.pad(torch.cat([v, v.new_ones(batch, kv_heads, lk, 1)], dim=-1).transpose(-1, -2),
               (0, n - lk))
    pk = F.pad(pk.transpose(-1, -2), (0, n - lk))
    pq = pq.transpose(-1, -2)[..., None, :]  # (B, Hkv, G, F, 1, Lq)
    features = pk.shape[-2]
    step = max(1, _BLOCK_ELEMENTS // (batch * q_heads * (dv + 1) * spectrum.shape[-1]))
    numden = 0
    for start in range(0, features, step):  # blocks of features bound the memory
        block = slice(start, start + step)
        # A's rows phi(k_j)_r [v_j, 1] (as columns) for the features r of the block
        a = pk[:, :, None, block, None, :] * v1[:, :, None, None, :, :]
        d = apply_spectrum(spectrum, a, lq)  # (B, Hkv, G | 1, block, Dv + 1, Lq)
        numden = numden + (pq[:, :, :, block] * d).sum(dim=3)
    numden = numden.transpose(-1, -2)
    out = divide_or_zero(numden[..., :dv], numden[..., dv:])
    if key_padding_mask is not None:
        # FFT roundoff turns a zero denominator into noise: rows that see no key output 0.
        out = out * _sees_a_key(key_padding_mask, lq, causal)[:, None, None, :, None]
    return out.reshape(batch, q_heads, lq, dv).to(q.dtype)


def weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, cross: bool = False,
            scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
            num_features: int = DEFAULT_FEATURES, feature_map: str = "prf",
            normalize: bool = True, seed: int = 0, projection: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``S = (phi(Q) phi(K)^T) * C``, row-normalised: ``(B, Hq, Lq, Lk)``, the same random
    features as the fast path."""
    q_heads, lq, dim = q.shape[1], q.shape[2], q.shape[3]
    lk = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    pq, pk = _features(q, k, key_padding_mask, scale=scale, num_features=num_features,
                       feature_map=feature_map, normalize=normalize, seed=seed,
                       projection=projection)
    scores = pq @ repeat_kv(pk, q_heads // k.shape[1]).transpose(-1, -2)
    if bias is None:
        bias = scores.new_zeros(lq + lk - 1)
    c = _diagonals(bias, q_heads, lq, lk, causal and not cross, scores.dtype)
    scores = scores * dense_toeplitz(c, lq, lk)
    return divide_or_zero(scores, scores.sum(dim=-1, keepdim=True))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              cross: bool = False, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None,
              num_features: int = DEFAULT_FEATURES, feature_map: str = "prf",
              normalize: bool = True, seed: int = 0, projection: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit ``S @ V`` with ``S`` from :func:`weights` (the O(Lq x Lk) matrix)."""
    s = weights(q, k, causal=causal, cross=cross, scale=scale, key_padding_mask=key_padding_mask,
                num_features=num_features, feature_map=feature_map, normalize=normalize,
                seed=seed, projection=projection, bias=bias)
    return (s @ repeat_kv(v, q.shape[1] // v.shape[1]).to(s.dtype)).to(q.dtype)


def sample_options(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random per-head RPE bias ``b ~ N(0, 1)`` ``(Hq, Lq + Lk - 1)`` and an explicit
    projection ``w (m, D)`` (so that ``torch.compile`` sees no generator)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    offsets = max(q.shape[2] + k.shape[2] - 1, 0)
    bias = torch.randn(q.shape[1], offsets, generator=generator, dtype=dtype)
    w = torch.randn(DEFAULT_FEATURES, q.shape[-1], generator=generator, dtype=dtype)
    return {"bias": bias.to(q.device), "projection": w.to(q.device)}


MECHANISM = Mechanism(
    name="kernelized_rpe",
    paper="kernelized_rpe",
    summary="NPRF kernelized attention with RPE, Toeplitz products by FFT, O(L log L)",
    fn=kernelized_rpe_attention,
    reference=reference,
    weights=weights,
    patterns=ALL_PATTERNS,
    exact=False,
    options=(
        Option("num_features", int, DEFAULT_FEATURES, "random features m", low=1),
        Option("feature_map", str, "prf", "positive (prf) or sin/cos (trf) random features",
               choices=RANDOM_MAPS),
        Option("normalize", bool, True, "unit-normalise q and k first (NPRF)"),
        Option("seed", int, 0, "seed of the random projection w when none is given", low=0),
        Option("projection", torch.Tensor, None,
               "explicit random projection w (m, D); None: drawn from seed", nullable=True),
        Option("bias", torch.Tensor, None,
               "RPE bias b (Hq, Lq + Lk - 1) or (Lq + Lk - 1,), entry t + Lq - 1 for offset "
               "t = j - i; None: b = 0 (the O(L) linear path)", nullable=True),
    ),
    sample_options=sample_options,
)
