"""LiT's simplified linear attention: a ReLU kernel, row-normalised.

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j (phi(q_i) . phi(k_j)),
    phi(x) = ReLU(x) + eps

over ``j <= i`` for causal self attention and over all (unpadded) keys otherwise; a query
whose denominator is 0 (it sees no key) outputs 0. By associativity the sums never need the
(Lq x Lk) matrix:

* non-causal: ``S = phi(K)^T [V, 1]`` once, ``(d x (dv + 1))`` per head, then
  ``out_i = phi(q_i) S[:, :dv] / phi(q_i) S[:, dv]``. As in LiT's code, ``phi(K)`` and ``[V, 1]``
  are each scaled by ``Lk^-1/2`` before the product, a range trick that cancels in the ratio.
  Time O(L d dv).
* causal self: chunks of ``chunk`` rows; inside a chunk the masked ``(chunk x chunk)`` scores
  exactly, between chunks the state ``S`` (and the normaliser, its last column) carried as an
  exclusive prefix sum. Time O(L (chunk + d) dv).

Both go through the rows in tiles of ``TILE_ROWS`` (a multiple of ``chunk``): the features,
scores and chunk states of one tile are computed, used and dropped before the next, so the
working set is a few MiB (cache-resident, no fresh pages) whatever L; memory is the output plus
O(TILE_ROWS (d + dv + chunk) + (TILE_ROWS / chunk) d dv) per head.
* causal cross: each output row depends on its own query only, so it is the non-causal cross
  computation (nothing leaks from later queries).

Decoding keeps ``S`` (``(d x (dv + 1))`` per key/value head). Half-precision inputs keep the
features, ``S`` and the normaliser in float32. ``scale`` is unused: the normalised kernel has no
temperature. Patterns: all four. Paper: LiT (DESIGN key ``linear``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism, Option
from . import masks
from .common import accumulation_dtype, new_empty, repeat_kv
from .feature_maps import DETERMINISTIC_MAPS, deterministic_features

DEFAULT_CHUNK = 64
DEFAULT_EPS = 1e-6
#: Rows per tile: features, scores and chunk states of one tile stay cache-resident.
TILE_ROWS = 2048

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def divide_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (a query that sees no key)."""
    empty = den == 0
    return num * torch.where(empty, 0.0, 1.0 / torch.where(empty, 1.0, den))


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[V, 1]``: one product then gives numerator and normaliser together."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _finish(numden: torch.Tensor) -> torch.Tensor:
    return divide_or_zero(numden[..., :-1], numden[..., -1:])


def _keys(k, v, k_features, key_padding_mask, start, stop):
    """``phi(k_j)`` (padding keys zeroed) and ``[v_j, 1]`` for key rows ``start:stop``."""
    pk = k_features(k[:, :, start:stop])
    if key_padding_mask is not None:
        pk = pk.masked_fill(key_padding_mask[:, None, start:stop, None], 0.0)
    return pk, _with_ones(v[:, :, start:stop].to(pk.dtype))


def _noncausal(q, keys, lk, q_features, out, tile):
    # S = (phi(K) Lk^-1/2)^T ([V, 1] Lk^-1/2), accumulated over key tiles.
    state = None
    for start in range(0, lk, tile):
        pk, v1 = keys(start, min(start + tile, lk))
        part = (pk * (1.0 / lk)).transpose(-1, -2) @ v1
        state = part if state is None else state + part
    for start in range(0, q.shape[-2], tile):
        stop = min(start + tile, q.shape[-2])
        pq = q_features(q[..., start:stop, :])
        if state is None:  # no keys: every query outputs 0
            state = pq.new_zeros(*out.shape[:2], pq.shape[-1], out.shape[-1] + 1)
        out[..., start:stop, :] = _finish(pq @ state[:, :, None]).to(out.dtype)


def _causal(q, keys, q_features, out, chunk, tile):
    # Per tile: chunk states phi(K_c)^T [V_c, 1], their exclusive prefix sums (after the state
    # carried from earlier tiles), exact masked scores inside each chunk.
    batch, kv_heads, groups, length, _ = q.shape
    state = None
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        rows = stop - start
        n = -(-rows // chunk)
        pad = n * chunk - rows
        pq, (pk, v1) = q_features(q[..., start:stop, :]), keys(start, stop)
        if pad:  # the last tile only
            pq, pk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk, v1))
        pq = pq.view(batch, kv_heads, groups, n, chunk, pq.shape[-1])
        pk = pk.view(batch, kv_heads, 1, n, chunk, pk.shape[-1])
        v1 = v1.view(batch, kv_heads, 1, n, chunk, v1.shape[-1])
        per_chunk = pk.transpose(-1, -2) @ v1
        if state is None:
            state = per_chunk.new_zeros(batch, kv_heads, 1, 1, *per_chunk.shape[-2:])
        prefix = torch.cat([state, per_chunk], dim=3).cumsum(dim=3)
        state = prefix[:, :, :, -1:]
        numden = (pq @ prefix[:, :, :, :-1]).add_((pq @ pk.transpose(-1, -2)).tril_() @ v1)
        numden = numden.view(batch, kv_heads, groups, n * chunk, numden.shape[-1])
        out[..., start:stop, :] = _finish(numden[..., :rows, :]).to(out.dtype)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_features: FeatureMap,
                     k_features: FeatureMap, *, causal: bool,
                     key_padding_mask: torch.Tensor | None, chunk: int = DEFAULT_CHUNK,
                     tile: int = TILE_ROWS) -> torch.Tensor:
    """The shared core of kernel attentions:
    ``out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j (phi(q_i) . phi(k_j))`` (causal self:
    ``j <= i``, chunked; numerator and denominator from one product with ``[V, 1]``), the
    features computed tile by tile (``tile`` rows, rounded to a multiple of ``chunk``) so that
    no intermediate is longer than a tile; padding keys (``key_padding_mask``) drop out.

    ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``; ``q_features`` and
    ``k_features`` map ``(..., T, D)`` to ``(..., T, F)`` in the accumulation dtype
    -> ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    batch, q_heads, lq, dim = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    q = q.view(batch, kv_heads, q_heads // kv_heads, lq, dim)
    out = new_empty(*q.shape[:-1], dv, like=q)
    keys = partial(_keys, k, v, k_features, key_padding_mask)
    if causal:
        chunk = max(1, min(chunk, lq))
        _causal(q, keys, q_features, out, chunk, max(chunk, tile // chunk * chunk))
    else:
        _noncausal(q, keys, lk, q_features, out, max(1, tile))
    return out.view(batch, q_heads, lq, dv)


def _feature_map(feature_map: str, eps: float, dtype: torch.dtype) -> FeatureMap:
    acc = accumulation_dtype(dtype)
    return lambda x: deterministic_features(x.to(acc), feature_map, eps)


def _features(q, k, key_padding_mask, feature_map, eps):
    phi = _feature_map(feature_map, eps, q.dtype)
    pq, pk = phi(q), phi(k)
    if key_padding_mask is not None:
        pk = pk.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return pq, pk


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     cross: bool = False, scale: float | None = None,
                     key_padding_mask: torch.Tensor | None = None, feature_map: str = "relu",
                     eps: float = DEFAULT_EPS, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """LiT linear attention, O(L) in length (see the module docstring for the equation).

    ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` -> ``(B, Hq, Lq, Dv)``.
    Options: ``feature_map="relu"`` (``relu``, ``elu1``, ``identity``), ``eps=1e-6`` (added
    after ReLU), ``chunk=64`` (rows per chunk of the causal form).
    """
    phi = _feature_map(feature_map, eps, q.dtype)
    return kernel_attention(q, k, v, phi, phi, causal=causal and not cross,
                            key_padding_mask=key_padding_mask, chunk=chunk)


def weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, cross: bool = False,
            scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
            feature_map: str = "relu", eps: float = DEFAULT_EPS,
            chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``A = phi(Q) phi(K)^T`` (causally masked), row-normalised: ``(B, Hq, Lq, Lk)``."""
    pq, pk = _features(q, k, key_padding_mask, feature_map, eps)
    scores = pq @ repeat_kv(pk, q.shape[1] // k.shape[1]).transpose(-1, -2)
    if causal and not cross:
        scores = scores * masks.causal_mask(q.shape[2], k.shape[2], q.device).to(scores.dtype)
    return divide_or_zero(scores, scores.sum(dim=-1, keepdim=True))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              cross: bool = False, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, feature_map: str = "relu",
              eps: float = DEFAULT_EPS, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Explicit ``A @ V`` with ``A`` from :func:`weights` (the O(Lq x Lk) matrix)."""
    a = weights(q, k, causal=causal, cross=cross, key_padding_mask=key_padding_mask,
                feature_map=feature_map, eps=eps)
    return (a @ repeat_kv(v, q.shape[1] // v.shape[1]).to(a.dtype)).to(q.dtype)


@dataclass
class LinearState:
    """``S = sum_j phi(k_j)^T [v_j, 1]``, ``(B, Hkv, D, Dv + 1)`` in the accumulation dtype."""

    kv: torch.Tensor


def init_state(*, batch: int, kv_heads: int, head_dim: int, value_dim: int,
               dtype: torch.dtype, device: torch.device | str | None,
               feature_map: str = "relu", eps: float = DEFAULT_EPS,
               chunk: int = DEFAULT_CHUNK) -> LinearState:
    """An empty state (zeros)."""
    acc = accumulation_dtype(dtype)
    return LinearState(torch.zeros(batch, kv_heads, head_dim, value_dim + 1, dtype=acc,
                                   device=device))


def prefill_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None, feature_map: str = "relu",
                  eps: float = DEFAULT_EPS, chunk: int = DEFAULT_CHUNK,
                  key_padding_mask: torch.Tensor | None = None) -> LinearState:
    """The state after a prefill: ``S = sum_j phi(k_j)^T [v_j, 1]`` over its tokens (padding
    keys left out)."""
    _, pk = _features(q[:, :, :0], k, key_padding_mask, feature_map, eps)
    return LinearState(pk.transpose(-1, -2) @ _with_ones(v.to(pk.dtype)))


def step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: LinearState, *,
         scale: float | None = None, feature_map: str = "relu", eps: float = DEFAULT_EPS,
         chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, LinearState]:
    """Add ``phi(k_t)^T [v_t, 1]`` to ``S``, then
    ``out_t = phi(q_t) S[:, :dv] / phi(q_t) S[:, dv]``; ``q_t (B, Hq, 1, D)`` -> ``(B, Hq, 1, Dv)``.
    """
    batch, q_heads, _, _ = q_t.shape
    kv_heads = k_t.shape[1]
    pq, pk = _features(q_t, k_t, None, feature_map, eps)
    kv = state.kv + pk.transpose(-1, -2) @ _with_ones(v_t.to(pk.dtype))
    pq = pq.view(batch, kv_heads, q_heads // kv_heads, 1, pq.shape[-1])
    out = _finish(torch.einsum("bhglf,bhfe->bhgle", pq, kv))
    return out.reshape(batch, q_heads, 1, v_t.shape[-1]).to(q_t.dtype), LinearState(kv)


MECHANISM = Mechanism(
    name="linear",
    paper="linear",
    summary="LiT linear attention, ReLU kernel, O(L d^2); causal chunked",
    fn=linear_attention,
    reference=reference,
    weights=weights,
    patterns=ALL_PATTERNS,
    exact=False,
    options=(
        Option("feature_map", str, "relu", "kernel feature map phi",
               choices=DETERMINISTIC_MAPS),
        Option("eps", float, DEFAULT_EPS, "added to ReLU(x) in the relu map", low=0.0),
        Option("chunk", int, DEFAULT_CHUNK, "rows per chunk of the causal form", low=1),
    ),
    init_state=init_state,
    step=step,
    prefill_state=prefill_state,
    test_options={"chunk": 16},
)
