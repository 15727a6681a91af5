"""LiT's simplified linear attention: a ReLU kernel, row-normalised.

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j (phi(q_i) . phi(k_j)),
    phi(x) = ReLU(x) + eps

over ``j <= i`` for causal self attention and over all (unpadded) keys otherwise; a query
whose denominator is 0 (it sees no key) outputs 0. By associativity the sums never need the
(Lq x Lk) matrix:

* non-causal: ``S = phi(K)^T [V, 1]`` once, ``(d x (dv + 1))`` per head, then
  ``out_i = phi(q_i) S[:, :dv] / phi(q_i) S[:, dv]``. As in LiT's code, ``phi(K)`` and ``[V, 1]``
  are each scaled by ``Lk^-1/2`` before the product, a range trick that cancels in the ratio.
  Time O(L d dv), memory O(L (d + dv) + d dv).
* causal self: chunks of ``chunk`` rows; inside a chunk the masked ``(chunk x chunk)`` scores
  exactly, between chunks the state ``S`` (and the normaliser, its last column) carried as an
  exclusive prefix sum. Time O(L (chunk + d) dv), memory O(L chunk + (L / chunk) d dv).
* causal cross: each output row depends on its own query only, so it is the non-causal cross
  computation (nothing leaks from later queries).

Decoding keeps ``S`` (``(d x (dv + 1))`` per key/value head). Half-precision inputs keep the
features, ``S`` and the normaliser in float32. ``scale`` is unused: the normalised kernel has no
temperature. Patterns: all four. Paper: LiT (DESIGN key ``linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism, Option
from . import masks
from .common import accumulation_dtype, repeat_kv
from .feature_maps import DETERMINISTIC_MAPS, deterministic_features

DEFAULT_CHUNK = 64
DEFAULT_EPS = 1e-6


def divide_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (a query that sees no key)."""
    empty = den == 0
    return num * torch.where(empty, 0.0, 1.0 / torch.where(empty, 1.0, den))


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[V, 1]``: one product then gives numerator and normaliser together."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _finish(numden: torch.Tensor) -> torch.Tensor:
    return divide_or_zero(numden[..., :-1], numden[..., -1:])


def _noncausal(pq: torch.Tensor, pk: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    # (phi(K) Lk^-1/2)^T ([V, 1] Lk^-1/2), the two factors applied to phi(K) in one pass.
    state = torch.einsum("bhlf,bhle->bhfe", pk * (1.0 / pk.shape[-2]), v1)
    return torch.einsum("bhglf,bhfe->bhgle", pq, state)


def _causal_chunked(pq: torch.Tensor, pk: torch.Tensor, v1: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    batch, heads, groups, length, features = pq.shape
    width = v1.shape[-1]
    chunk = min(chunk, length)
    n = -(-length // chunk)
    pad = n * chunk - length
    pq = F.pad(pq, (0, 0, 0, pad)).view(batch, heads, groups, n, chunk, features)
    pk = F.pad(pk, (0, 0, 0, pad)).view(batch, heads, n, chunk, features)
    v1 = F.pad(v1, (0, 0, 0, pad)).view(batch, heads, n, chunk, width)
    per_chunk = torch.einsum("bhncf,bhnce->bhnfe", pk, v1)
    before = F.pad(per_chunk.cumsum(dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    inter = torch.einsum("bhgncf,bhnfe->bhgnce", pq, before)
    scores = torch.einsum("bhgncf,bhnsf->bhgncs", pq, pk)
    scores = scores * masks.causal_mask(chunk, chunk, pq.device).to(scores.dtype)
    intra = torch.einsum("bhgncs,bhnse->bhgnce", scores, v1)
    return (inter + intra).reshape(batch, heads, groups, n * chunk, width)[..., :length, :]


def normalised_linear_attention(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, *,
                                causal: bool, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The shared core of kernel attentions, on features already computed:
    ``out_i = sum_j (pq_i . pk_j) v_j / sum_j (pq_i . pk_j)`` (causal: ``j <= i``, chunked).

    ``pq (B, Hkv, G, Lq, F)`` (G query heads per key/value head), ``pk (B, Hkv, Lk, F)``,
    ``v (B, Hkv, Lk, Dv)``, one floating dtype, padding keys already zeroed in ``pk``
    -> ``(B, Hkv, G, Lq, Dv)``.
    """
    v1 = _with_ones(v)
    numden = _causal_chunked(pq, pk, v1, chunk) if causal else _noncausal(pq, pk, v1)
    return _finish(numden)


def _features(q, k, key_padding_mask, feature_map, eps):
    acc = accumulation_dtype(q.dtype)
    pq = deterministic_features(q.to(acc), feature_map, eps)
    pk = deterministic_features(k.to(acc), feature_map, eps)
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
    batch, q_heads, lq, _ = q.shape
    kv_heads = k.shape[1]
    pq, pk = _features(q, k, key_padding_mask, feature_map, eps)
    pq = pq.view(batch, kv_heads, q_heads // kv_heads, lq, pq.shape[-1])
    out = normalised_linear_attention(pq, pk, v.to(pk.dtype), causal=causal and not cross,
                                      chunk=chunk)
    return out.reshape(batch, q_heads, lq, v.shape[-1]).to(q.dtype)


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
    test_options={"chunk": 16},
)
