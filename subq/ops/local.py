"""Sliding-window (local) attention, CAB's ``local`` baseline.

    out_i = sum_{j in W(i)} softmax_j(scale * q_i . k_j) v_j,
    W(i) = {j : i - w <= j <= i}       (causal: the w keys before i, and i itself)
    W(i) = {j : |i - j| <= w}          (non-causal: w keys on each side, and i itself)

Exact for its mask. The fast path cuts the queries into blocks of ``b`` rows; block n reads
the key span [n*b - w, n*b + b + w) (causal: [n*b - w, n*b + b)) as a strided view of the
padded keys, and all blocks go through one fused SDPA call with the in-window mask, so time
is O(L (b + 2w) D) and memory O(L (b + 2w)): never an L x L tensor.
Decoding keeps a rolling cache of the last w keys and values. Patterns: noncausal self,
causal self.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import SELF_PATTERNS, Mechanism, Option
from . import masks
from .common import step_padding, visible_keys
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
    Each (query block, key span) pair is one batch entry of a fused SDPA call; the query
    heads of a GQA group share their key span, so keys are never repeated per head.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    groups = q_heads // kv_heads
    w = min(window, length - 1)
    rows = _block_rows(w)
    n_blocks = -(-length // rows)
    padded = n_blocks * rows
    left, right = w, (0 if causal else w)
    span = rows + left + right

    def key_spans(x: torch.Tensor) -> torch.Tensor:
        # (B, Hkv, L, d) -> (B * n_blocks, Hkv, span, d): block n sees keys n*rows - w + c.
        x = F.pad(x, (0, 0, left, padded - length + right)).unfold(2, span, rows)
        return x.permute(0, 2, 1, 4, 3).reshape(batch * n_blocks, kv_heads, span, x.shape[3])

    # (B, Hq, L, D) -> (B * n_blocks, Hkv, groups * rows, D): a group's heads share a span.
    qb = F.pad(q, (0, 0, 0, padded - length)).view(batch, kv_heads, groups, n_blocks, rows, dim)
    qb = qb.permute(0, 3, 1, 2, 4, 5).reshape(batch * n_blocks, kv_heads, groups * rows, dim)

    a = torch.arange(rows, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    in_window = ((c >= a) & (c <= a + left + right)).repeat(groups, 1)  # j - i = c - a - w
    key_ok = torch.ones(1, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_ok = ~key_padding_mask
    key_ok = F.pad(key_ok, (left, padded - length + right), value=False).unfold(1, span, rows)
    key_ok = key_ok.expand(batch, -1, -1).reshape(batch * n_blocks, 1, 1, span)
    allowed = in_window & key_ok  # (B * n_blocks, 1, groups * rows, span)
    # An additive mask, built once at this (head-broadcast) size; a query that sees no key
    # gets a row of -inf, which SDPA turns into a zero output and zero gradients.
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~allowed, float("-inf"))

    out = F.scaled_dot_product_attention(qb, key_spans(k), key_spans(v), attn_mask=bias,
                                         scale=scale)
    out = out.view(batch, n_blocks, kv_heads, groups, rows, dv).permute(0, 2, 3, 1, 4, 5)
    return out.reshape(batch, q_heads, padded, dv)[:, :, :length]


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
    """The last ``window`` keys and values, ``(B, Hkv, <= window, D)``, and which of them are
    padding (``(B, <= window)``, from a padded prefill; None: none)."""

    keys: torch.Tensor
    values: torch.Tensor
    padding: torch.Tensor | None = None


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device,
               window=DEFAULT_WINDOW) -> RollingCache:
    return RollingCache(torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
                        torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device))


def prefill_state(q, k, v, *, scale=None, window=DEFAULT_WINDOW, key_padding_mask=None
                  ) -> RollingCache:
    """The cache after a prefill: its last ``window`` keys and values (and their padding)."""
    first = max(0, k.shape[2] - window)
    return RollingCache(k[:, :, first:], v[:, :, first:],
                        None if key_padding_mask is None else key_padding_mask[:, first:])


def step(q_t, k_t, v_t, state: RollingCache, *, scale=None, window=DEFAULT_WINDOW
         ) -> tuple[torch.Tensor, RollingCache]:
    """Attend to the cached ``window`` keys and the current one, then roll the cache."""
    keys = torch.cat([state.keys, k_t], dim=2)
    values = torch.cat([state.values, v_t], dim=2)
    padding = step_padding(state.padding, keys.shape[2])
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out = masked_attention(q_t, keys, values, visible_keys(padding, keys.shape[2], q_t.device),
                           scale)
    keep = max(0, keys.shape[2] - window)
    return out, RollingCache(keys[:, :, keep:], values[:, :, keep:],
                             None if padding is None else padding[:, keep:])


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
    prefill_state=prefill_state,
    test_options={"window": 8},
)
