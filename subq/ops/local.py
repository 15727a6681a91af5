"""Sliding-window (local) attention, CAB's ``local`` baseline.

    out_i = sum_{j in W(i)} softmax_j(scale * q_i . k_j) v_j,
    W(i) = {j : i - w <= j <= i}       (causal: the w keys before i, and i itself)
    W(i) = {j : |i - j| <= w}          (non-causal: w keys on each side, and i itself)

Exact for its mask. The fast path cuts the queries into blocks of ``b`` rows; block n reads
the key span [n*b - w, n*b + b + w) (causal: [n*b - w, n*b + b)) as a strided view of the
padded keys, so time is O(L (b + 2w) D) and memory O(L (b + 2w)): never an L x L tensor.
Decoding keeps a rolling cache of the last w keys and values. Patterns: noncausal self,
causal self.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import SELF_PATTERNS, Mechanism, Option
from . import masks
from .common import accumulation_dtype, masked_softmax
from .reference import masked_attention, masked_weights

DEFAULT_WINDOW = 256
_MIN_BLOCK, _MAX_BLOCK = 32, 256


def _block_rows(window: int) -> int:
    return min(max(window, _MIN_BLOCK), _MAX_BLOCK)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    cross: bool = False, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None,
                    window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Blocked sliding-window attention.

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    groups = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    w = min(window, length - 1)
    rows = _block_rows(w)
    n_blocks = -(-length // rows)
    padded = n_blocks * rows
    left, right = w, (0 if causal else w)
    span = rows + left + right

    def key_windows(x: torch.Tensor) -> torch.Tensor:
        # (B, Hkv, L, d) -> (B, Hkv, n_blocks, span, d): block n sees keys n*rows - w + c.
        x = F.pad(x.to(acc), (0, 0, left, padded - length + right))
        return x.unfold(2, span, rows).transpose(-1, -2)

    qb = F.pad(q.to(acc), (0, 0, 0, padded - length))
    qb = qb.view(batch, kv_heads, groups, n_blocks, rows, dim)
    scores = torch.einsum("bhgnqd,bhnsd->bhgnqs", qb, key_windows(k)) * scale

    a = torch.arange(rows, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    in_window = (c >= a) & (c <= a + left + right)  # j - i = c - a - w in [-w, right]
    key_ok = torch.ones(1, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_ok = ~key_padding_mask
    key_ok = F.pad(key_ok, (left, padded - length + right), value=False)
    key_ok = key_ok.unfold(1, span, rows)  # (B|1, n_blocks, span)
    allowed = in_window & key_ok[:, None, None, :, None, :]

    p = masked_softmax(scores, allowed)
    out = torch.einsum("bhgnqs,bhnsd->bhgnqd", p, key_windows(v))
    return out.reshape(batch, q_heads, padded, dv)[:, :, :length].to(q.dtype)


def _allowed(q, k, causal, window, key_padding_mask):
    mask = masks.window_mask(q.shape[2], k.shape[2], window, causal, q.device)
    return masks.with_key_padding(mask, key_padding_mask)


def reference(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None,
              window=DEFAULT_WINDOW):
    """Dense masked softmax with the window mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_attention(q, k, v, _allowed(q, k, causal, window, key_padding_mask), scale)


def weights(q, k, *, causal=False, cross=False, scale=None, key_padding_mask=None,
            window=DEFAULT_WINDOW):
    """The banded attention matrix ``(B, Hq, L, L)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_weights(q, k, _allowed(q, k, causal, window, key_padding_mask), scale)


@dataclass
class RollingCache:
    """The last ``window`` keys and values, ``(B, Hkv, <= window, D)``."""

    keys: torch.Tensor
    values: torch.Tensor


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device,
               window=DEFAULT_WINDOW) -> RollingCache:
    return RollingCache(torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
                        torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device))


def step(q_t, k_t, v_t, state: RollingCache, *, scale=None, window=DEFAULT_WINDOW
         ) -> tuple[torch.Tensor, RollingCache]:
    """Attend to the cached ``window`` keys and the current one, then roll the cache."""
    keys = torch.cat([state.keys, k_t], dim=2)
    values = torch.cat([state.values, v_t], dim=2)
    allowed = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool, device=q_t.device)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out = masked_attention(q_t, keys, values, allowed, scale)
    keep = keys.shape[2] - window
    return out, RollingCache(keys[:, :, keep:] if keep > 0 else keys,
                             values[:, :, keep:] if keep > 0 else values)


MECHANISM = Mechanism(
    name="local",
    paper="cab",
    summary="sliding-window attention, blocked, O(L*w)",
    fn=local_attention,
    reference=reference,
    weights=weights,
    patterns=SELF_PATTERNS,
    exact=False,
    options=(
        Option("window", int, DEFAULT_WINDOW,
               "keys visible on each side of the query (causal: before it), besides itself",
               low=0),
    ),
    init_state=init_state,
    step=step,
    test_options={"window": 8},
)
