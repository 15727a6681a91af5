"""Kernelized attention with relative positional encoding via FFT (Luo et al. 2021, "Stable,
Fast and Accurate", DESIGN key ``kernelized_rpe``; Eq. 10-13, Algorithm 1): normalised positive
random features (NPRF) and a Toeplitz RPE.

    out_i = phi(q_i) sum_j c_{j-i} phi(k_j)^T v_j  /  phi(q_i) sum_j c_{j-i} phi(k_j)^T,
    c_t = exp(b_t),  phi(x) = exp(w . x - |x|^2 / 2) / sqrt(m),  w_1..w_m ~ N(0, I_d)

with ``q, k`` unit-normalised first (NPRF, the default; then ``E[phi(q) . phi(k)] =
exp(q^ . k^)`` and ``scale`` is unused, as in the paper) or scaled by ``sqrt(scale)``
(``normalize=False``: Performer's PRF of ``exp(scale q . k)``). ``C = [c_{j-i}]`` is Toeplitz, so
``D1 = C A1`` (rows ``vec(phi(k_j)^T v_j)``) and ``D2 = C A2`` (rows ``phi(k_j)``) are computed by
FFT (:mod:`subq.ops.toeplitz`) in O(L log L m dv) time, in float32 (float64 for float64
inputs) whatever the input dtype, tile by tile (one head, one feature, up to ``_COLUMNS``
columns of ``[V, 1]``: memory O(L (m + dv)) beyond the tiles, not O(L m dv)). Causal self
attention sets ``c_t = 0`` for ``t > 0``. In causal cross each output row depends on its own
query only, so it equals the non-causal cross computation. ``bias=None`` means ``b = 0`` and
takes the O(L) linear path (:func:`subq.ops.linear.kernel_attention`), which the FFT path
equals for a zero bias. Padding keys drop out of both sums; a query that sees no key outputs 0.

Precision at length (1-D bias): FFT roundoff is absolute, about ``eps max_i |(C X)_i|`` in every
row, so a row whose sum is far smaller than the largest loses relative precision in proportion
(causal row ``i`` sums ``i + 1`` keys: with a broad ``c`` the float32 error grew like ``L``).
Rows at either end whose Toeplitz row sum ``s_i = sum_j C[i, j]`` is below ``max_i s_i / 32``
(``EXACT_ROW_RATIO``; within ``Lq Lk / 64`` (row, key) pairs) are summed directly instead,
``sum_j C[i, j] (phi(q_i) . phi(k_j)) [v_j, 1]``, in O(rows Lk (m + dv)): causal ``b ~ N(0, 1)``
needs the first ``~L / 32`` rows, a bias decaying fast with ``|t|`` few or none.

2-D RPE for images (non-causal self attention only): a ``bias (Hq | 1, 2H - 1, 2W - 1)`` makes
the ``L = H W`` tokens a row-major ``H x W`` grid with ``c = exp(b)`` indexed by the 2-D offset
``(j1 - i1 + H - 1, j2 - i2 + W - 1)``; ``C`` is then Toeplitz-block-Toeplitz and its products
go through one ``rfft2`` over a ``(2H, 2W)`` circulant embedding.

No ``step``: the FFT needs every position at once; the method speeds up training, not decoding.

Options (defaults): ``num_features=32`` (m), ``feature_map="prf"`` (``trf``: sin/cos features,
2m of them), ``normalize=True``, ``seed=0`` (draws ``w``), ``projection=None`` (an explicit
``w (m, D)``, overriding ``num_features`` and ``seed``), ``bias=None`` (``b``, shape
``(Hq, Lq + Lk - 1)`` or ``(Lq + Lk - 1,)``, entry ``t + Lq - 1`` for offset ``t = j - i``;
or 2-D, ``(Hq | 1, 2H - 1, 2W - 1)``).
Patterns: all four.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism, Option
from .common import accumulation_dtype, new_empty, repeat_kv
from .feature_maps import RANDOM_MAPS, draw_projection, random_features
from .linear import FeatureMap, divide_or_zero, kernel_attention
from .toeplitz import Circulant, causal_diagonals, dense_toeplitz, dense_toeplitz2d

DEFAULT_FEATURES = 32
#: Toeplitz columns per FFT call: a tile's transforms stay cache-sized.
_COLUMNS = 65
#: Query rows whose Toeplitz row sum is below ``1 / EXACT_ROW_RATIO`` of the largest are
#: summed directly, not by FFT (0 or None: never); see :func:`_exact_edge_rows`.
EXACT_ROW_RATIO = 32
#: Those direct sums cover at most ``1 / EXACT_PAIR_SHARE`` of the ``Lq x Lk`` (row, key) pairs.
EXACT_PAIR_SHARE = 64
#: Elements of one tile of direct scores (rows x keys x batch x heads).
_DENSE_ELEMENTS = 1 << 22


def _projection(projection, num_features, seed, dim, dtype, device) -> torch.Tensor:
    if projection is None:
        return draw_projection(num_features, dim, seed, dtype=dtype, device=device)
    if projection.dim() != 2 or projection.shape[1] != dim:
        raise ValueError(f"option 'projection' must have shape (m, D) with D={dim}, "
                         f"got {tuple(projection.shape)}")
    return projection.to(device=device, dtype=dtype)


def _feature_map(*, dim, dtype, device, scale, num_features, feature_map, normalize, seed,
                 projection) -> FeatureMap:
    """``x (..., L, D) -> phi(x) (..., L, F)`` in the accumulation dtype of ``dtype``."""
    acc = accumulation_dtype(dtype)
    w = _projection(projection, num_features, seed, dim, acc, device)

    def phi(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc)
        x = F.normalize(x, dim=-1) if normalize else x * scale ** 0.5
        return random_features(x, w, feature_map)

    return phi


def _features(q, k, key_padding_mask, **options):
    """``phi(q) (B, Hq, Lq, F)`` and ``phi(k) (B, Hkv, Lk, F)``, padding keys zeroed."""
    phi = _feature_map(dim=q.shape[-1], dtype=q.dtype, device=q.device, **options)
    pq, pk = phi(q), phi(k)
    if key_padding_mask is not None:
        pk = pk.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return pq, pk


def _grid(bias: torch.Tensor, lq: int, lk: int, causal: bool,
          cross: bool) -> tuple[int, int] | None:
    """The ``(height, width)`` token grid of a 2-D bias ``(Hq | 1, 2 height - 1, 2 width - 1)``,
    None for a 1-D bias."""
    if bias.dim() != 3:
        return None
    if causal or cross:
        raise NotImplementedError("a 2-D option 'bias' (image grid) supports non-causal self "
                                  "attention only")
    rows, cols = bias.shape[-2:]
    if rows % 2 == 0 or cols % 2 == 0 or (rows + 1) * (cols + 1) != 4 * lq or lq != lk:
        raise ValueError(f"a 2-D option 'bias' must have shape (Hq | 1, 2H - 1, 2W - 1) with "
                         f"H W = L = {lq}, got {tuple(bias.shape)}")
    return (rows + 1) // 2, (cols + 1) // 2


def _diagonals(bias, q_heads, lq, lk, causal, grid, dtype) -> torch.Tensor:
    """``c = exp(b)`` as ``(Hq | 1, Lq + Lk - 1)`` (future diagonals zeroed if causal) or, on a
    ``grid``, ``(Hq | 1, 2H - 1, 2W - 1)``."""
    per_head = bias.dim() == (2 if grid is None else 3)
    if per_head and bias.shape[0] not in (1, q_heads):
        raise ValueError(f"option 'bias' must have {q_heads} heads or 1, got "
                         f"{tuple(bias.shape)}")
    if grid is not None:
        return torch.exp(bias.to(dtype))
    if bias.dim() not in (1, 2) or bias.shape[-1] != lq + lk - 1:
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
    if bias is None:
        phi = _feature_map(dim=dim, dtype=q.dtype, device=q.device, scale=scale,
                           num_features=num_features, feature_map=feature_map,
                           normalize=normalize, seed=seed, projection=projection)
        return kernel_attention(q, k, v, phi, phi, causal=causal,
                                key_padding_mask=key_padding_mask)
    grid = _grid(bias, lq, lk, causal, cross)
    pq, pk = _features(q, k, key_padding_mask, scale=scale, num_features=num_features,
                       feature_map=feature_map, normalize=normalize, seed=seed,
                       projection=projection)
    c = _diagonals(bias, q_heads, lq, lk, causal, grid, pk.dtype)
    c = c.view(kv_heads, groups, *c.shape[1:]) if c.shape[0] == q_heads else c[None]
    circulant = Circulant(c, lq, lk, pk.dtype, grid)
    # Keys along the last dim.
    v1 = torch.cat([v.to(pk.dtype), pk.new_ones(batch, kv_heads, lk, 1)], dim=-1)
    v1, pk = v1.transpose(-1, -2).contiguous(), pk.transpose(-1, -2).contiguous()
    pq = pq.view(batch, kv_heads, groups, lq, pq.shape[-1]).transpose(-1, -2)
    if _needs_grad(pq, pk, v1, circulant.kernel):
        numden = _ToeplitzNumden.apply(pq, pk, v1, circulant.kernel, circulant)
    else:
        numden = _toeplitz_numden(pq, pk, v1, circulant)
    if grid is None:
        numden = _exact_edge_rows(numden, pq, pk, v1, c, causal)
    numden = numden.transpose(-1, -2)
    out = divide_or_zero(numden[..., :dv], numden[..., dv:])
    if key_padding_mask is not None:
        # FFT roundoff turns a zero denominator into noise: rows that see no key output 0.
        out = out * _sees_a_key(key_padding_mask, lq, causal)[:, None, None, :, None]
    return out.reshape(batch, q_heads, lq, dv).to(q.dtype)


def _edge_rows(c: torch.Tensor, lq: int, lk: int, causal: bool) -> tuple[int, int]:
    """How many leading and trailing query rows to sum directly: those whose Toeplitz row sum
    ``s_i = sum_j C[i, j]`` (``c >= 0``; in any head) is below ``max_i s_i / EXACT_ROW_RATIO``,
    as many as fit in ``Lq Lk / EXACT_PAIR_SHARE`` (row, key) pairs (split between the two ends
    when both need rows; causal leading rows ``< P`` need ``P^2`` pairs, other rows ``Lk``
    each). ``(0, 0)`` when disabled. Under ``torch.compile`` (shapes must not depend on data)
    the count for a constant ``c``: ``Lq // EXACT_ROW_RATIO`` leading rows if causal, else
    none."""
    if not EXACT_ROW_RATIO or lq < 2:
        return 0, 0
    budget = lq * lk // EXACT_PAIR_SHARE
    if torch.compiler.is_compiling():
        return (min(lq // EXACT_ROW_RATIO, math.isqrt(budget)) if causal else 0), 0
    with torch.no_grad():
        # Row i reads c[Lq - 1 - i : Lq - 1 - i + Lk], i.e. r[i : i + Lk] of r = c reversed:
        # s_i = S[i + Lk] - S[i] for the prefix sums S of r (S[0] = 0), in float64.
        cs = F.pad(c.detach().flip(-1).to(torch.float64).reshape(-1, c.shape[-1]).cumsum(-1),
                   (1, 0))
        sums = cs[:, lk:lk + lq] - cs[:, :lq]
        small = (sums < sums.amax(-1, keepdim=True) / EXACT_ROW_RATIO).any(0)
        if not bool(small[0]) and not bool(small[-1]):
            return 0, 0
        big = (~small).nonzero()
        head, tail = int(big[0]), lq - 1 - int(big[-1])
    if head and tail:
        budget //= 2
    head_max = math.isqrt(budget) if causal else budget // lk
    return min(head, head_max), min(tail, budget // lk)


def _dense_rows(pq: torch.Tensor, pk: torch.Tensor, v1: torch.Tensor, c: torch.Tensor,
                lo: int, hi: int, causal: bool) -> torch.Tensor:
    """Rows ``lo:hi`` of the result of :func:`_toeplitz_numden`, computed directly as
    ``sum_j C[i, j] (phi(q_i) . phi(k_j)) [V, 1]_j`` (``c (Hkv | 1, G | 1, Lq + Lk - 1)``):
    ``O((hi - lo) Lk (F + E))``; causal rows need only keys ``j < hi``."""
    lq, lk = pq.shape[-1], pk.shape[-1]
    keys = min(hi, lk) if causal else lk
    out = []
    step = max(1, _DENSE_ELEMENTS // max(1, keys * pq.shape[0] * pq.shape[1] * pq.shape[2]))
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        # C[i, j] = c[j - i + Lq - 1]: windows of c, row i starting at Lq - 1 - i.
        tile = c[..., lq - b:lq - a - 1 + keys].unfold(-1, keys, 1).flip(-2)
        scores = pq[..., a:b].transpose(-1, -2) @ pk[:, :, None, :, :keys] * tile
        out.append((scores @ v1[:, :, None, :, :keys].transpose(-1, -2)).transpose(-1, -2))
    return torch.cat(out, dim=-1)


def _exact_edge_rows(numden: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                     v1: torch.Tensor, c: torch.Tensor, causal: bool) -> torch.Tensor:
    """``numden (B, Hkv, G, E, Lq)`` with its edge rows (:func:`_edge_rows`) replaced by the
    direct sums of :func:`_dense_rows`.

    Why: FFT roundoff is absolute, about ``eps * max_i |(C X)_i|`` in every row, so a row whose
    sum is much smaller than the largest loses relative precision in proportion. In causal
    self attention row ``i`` sums ``i + 1`` keys, so with a broad ``c`` the first rows are
    ``~L / i`` times smaller than the last; those rows also carry the largest outputs (an
    average over few values), and the float32 error grew linearly with ``L``. Rows whose row sum
    of ``C`` is within ``EXACT_ROW_RATIO`` of the largest keep ``~EXACT_ROW_RATIO eps``.
    """
    lq = numden.shape[-1]
    head, tail = _edge_rows(c, lq, pk.shape[-1], causal)
    if head == 0 and tail == 0:
        return numden
    parts = []
    if head:
        parts.append(_dense_rows(pq, pk, v1, c, 0, head, causal))
    parts.append(numden[..., head:lq - tail])
    if tail:
        parts.append(_dense_rows(pq, pk, v1, c, lq - tail, lq, causal))
    return torch.cat(parts, dim=-1)


def _toeplitz_numden(pq: torch.Tensor, pk: torch.Tensor, v1: torch.Tensor,
                     circulant: Circulant) -> torch.Tensor:
    """``sum_r phi_r(q_i) (C (phi_r(K) * [V, 1]_e))_i`` for every column ``e`` of ``[V, 1]``:
    ``pq (B, Hkv, G, F, Lq)``, ``pk (B, Hkv, F, Lk)`` and ``v1 (B, Hkv, E, Lk)``
    -> ``(B, Hkv, G, E, Lq)``.

    The ``F E`` Toeplitz columns go through the FFT in tiles (one key/value head, one feature
    ``r``, at most ``_COLUMNS`` columns ``e``), so that a tile's product, spectra and inverse
    stay a few MiB; each tile's forward transform is shared by the ``G`` query heads of its
    key/value head. Without autograd (eager) the products go into buffers allocated (and their
    padding zeroed) once, and the spectrum multiplies in place: fresh memory costs a page
    fault per 4 KiB.
    """
    batch, kv_heads, groups, features, lq = pq.shape
    width = v1.shape[2]
    cols = -(-width // -(-width // _COLUMNS))  # columns of [V, 1] per tile, evenly split
    spectrum = circulant.spectrum
    # Buffers only in eager mode without autograd (torch.compile plans memory itself).
    reuse = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (pq, pk, v1, spectrum)))
    buffers: dict[int, torch.Tensor] = {}
    numden = new_empty(batch, kv_heads, groups, width, lq, like=pq)
    for h in range(kv_heads):
        spec_h = spectrum[h if spectrum.shape[0] > 1 else 0]
        for e in range(0, width, cols):
            vh = v1[:, h, e:e + cols]
            if reuse and vh.shape[1] not in buffers:
                buffers[vh.shape[1]] = vh.new_zeros(*vh.shape[:-1], *circulant.size)
            acc = [pq.new_zeros(batch, vh.shape[1], lq) for _ in range(groups)]
            for r in range(features):
                a = circulant.embed_product(pk[:, h, r, None], vh, out=buffers.get(vh.shape[1]))
                spec_a = circulant.transform(a)
                for g in range(groups):
                    s = spec_h[g if spec_h.shape[0] > 1 else 0]
                    in_place = reuse and g == groups - 1  # spec_a's last use
                    d = circulant.inverse(torch.mul(s, spec_a, out=spec_a if in_place else None))
                    acc[g] = acc[g].addcmul_(pq[:, h, g, r, None], d)
            for g in range(groups):
                numden[:, h, g, e:e + cols] = acc[g]
    return numden


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call (eager mode; under ``torch.compile`` autograd traces
    the tiles itself)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in tensors))


class _ToeplitzNumden(torch.autograd.Function):
    """:func:`_toeplitz_numden` with a backward that keeps O(L (F + E)) for training (issue 22):
    the forward saves ``pq``, ``pk``, ``v1`` and the circulant's real kernel ``h``, never a
    tile's spectra; the backward recomputes each tile's transform.

    With ``X_re = phi_r(K) * [V, 1]_e`` (keys), ``D_gre = C_g X_re`` and the incoming gradient
    ``G_ge`` of ``numden_ge = sum_r phi_r(Q_g) * D_gre``, and ``Y_gre = phi_r(Q_g) * G_ge``:

        d phi_r(Q_g) = sum_e G_ge * D_gre
        d X_re       = sum_g C_g^T Y_gre                  (conj(spectrum): the adjoint)
        d h_g        = sum_{b, r, e} Y_gre (circular cross-correlation) X_re

    then ``d phi_r(K) = sum_e dX_re * [V, 1]_e`` and ``d [V, 1]_e = sum_r dX_re * phi_r(K)``:
    per tile two forward and ``2 G`` inverse transforms, twice the forward's ``1 + G``, the
    ratio autograd's own backward has."""

    @staticmethod
    def forward(ctx, pq, pk, v1, kernel, circulant):
        ctx.save_for_backward(pq, pk, v1, kernel)
        ctx.circulant = circulant
        return _toeplitz_numden(pq, pk, v1, circulant)

    @staticmethod
    def backward(ctx, grad):
        pq, pk, v1, kernel = ctx.saved_tensors
        circulant = ctx.circulant
        batch, kv_heads, groups, features, _ = pq.shape
        width, lk = v1.shape[2], v1.shape[-1]
        cols = -(-width // -(-width // _COLUMNS))
        spectrum = circulant.spectrum.detach()
        dpq, dpk, dv1 = torch.zeros_like(pq), torch.zeros_like(pk), torch.zeros_like(v1)
        d_spectrum = torch.zeros_like(spectrum)
        for h in range(kv_heads):
            hs = h if spectrum.shape[0] > 1 else 0
            for e in range(0, width, cols):
                vh = v1[:, h, e:e + cols]
                grad_h = grad[:, h, :, e:e + cols]
                for r in range(features):
                    spec_x = circulant.transform(circulant.embed_product(pk[:, h, r, None], vh))
                    spec_dx = 0
                    for g in range(groups):
                        gs = g if spectrum.shape[1] > 1 else 0
                        s = spectrum[hs, gs]
                        d = circulant.inverse(s * spec_x)
                        dpq[:, h, g, r] += (grad_h[:, g] * d).sum(1)
                        spec_y = circulant.transform(circulant.embed(
                            pq[:, h, g, r, None] * grad_h[:, g]))
                        spec_dx = spec_dx + s.conj() * spec_y
                        d_spectrum[hs, gs] += (spec_y * spec_x.conj()).sum((0, 1))
                    dx = circulant.inverse(spec_dx, length=lk)
                    dpk[:, h, r] += (dx * vh).sum(1)
                    dv1[:, h, e:e + cols] += dx * pk[:, h, r, None]
        d_kernel = circulant.full_inverse(d_spectrum) if ctx.needs_input_grad[3] else None
        return dpq, dpk, dv1, d_kernel, None


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
    grid = _grid(bias, lq, lk, causal, cross)
    c = _diagonals(bias, q_heads, lq, lk, causal and not cross, grid, scores.dtype)
    scores = scores * (dense_toeplitz(c, lq, lk) if grid is None else
                       dense_toeplitz2d(c, *grid))
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
               "t = j - i; 2-D grid (Hq, 2H - 1, 2W - 1); None: b = 0 (the O(L) linear path)",
               nullable=True),
    ),
    sample_options=sample_options,
)
