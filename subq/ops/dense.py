"""Dense softmax attention, the exact O(L^2) baseline every mechanism is measured against.

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j

over ``j <= i`` for causal self attention and over all keys otherwise (in CAB's causal cross
pattern each output row depends on its own query only, so nothing leaks from later queries).
The fast path is ``torch.nn.functional.scaled_dot_product_attention``; the reference builds
the (Lq x Lk) matrix explicitly. Patterns: all four. Decoding: a growing KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism
from . import masks
from .common import repeat_kv, step_padding
from .reference import masked_attention, masked_weights


def _allowed(lq: int, lk: int, causal: bool, cross: bool, key_padding_mask, device):
    base = masks.causal_mask(lq, lk, device) if causal and not cross else masks.full_mask(
        lq, lk, device)
    return masks.with_key_padding(base, key_padding_mask)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    cross: bool = False, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with subq's conventions: (B, H, L, D) layout, GQA, key padding (True = ignore)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and not cross,
                                              scale=scale)
    allowed = _allowed(q.shape[2], k.shape[2], causal, cross, key_padding_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    # Queries that see no key output 0, whatever the SDPA backend does with an empty row.
    return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


def reference(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None):
    """Explicit softmax(q k^T * scale, masked) @ v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, cross, key_padding_mask, q.device)
    return masked_attention(q, k, v, allowed, scale)


def weights(q, k, *, causal=False, cross=False, scale=None, key_padding_mask=None):
    """The dense attention matrix ``(B, Hq, Lq, Lk)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, cross, key_padding_mask, q.device)
    return masked_weights(q, k, allowed, scale)


@dataclass
class KVCache:
    """Every key and value seen so far, ``(B, Hkv, t, D)`` and ``(B, Hkv, t, Dv)``, and which
    of them are padding (``(B, t)``, from a padded prefill; None: none)."""

    keys: torch.Tensor
    values: torch.Tensor
    padding: torch.Tensor | None = None


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device) -> KVCache:
    return KVCache(torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device))


def prefill_state(q, k, v, *, scale=None, key_padding_mask=None) -> KVCache:
    """The cache after a prefill: its keys and values (and its padding)."""
    return KVCache(k, v, key_padding_mask)


def appended(state: KVCache, k_t: torch.Tensor, v_t: torch.Tensor) -> KVCache:
    """The cache with one real (not padding) key and value appended."""
    keys = torch.cat([state.keys, k_t], dim=2)
    return KVCache(keys, torch.cat([state.values, v_t], dim=2),
                   step_padding(state.padding, keys.shape[2]))


def step(q_t, k_t, v_t, state: KVCache, *, scale=None) -> tuple[torch.Tensor, KVCache]:
    """Append (k_t, v_t) to the cache and attend to all of it but its padding."""
    state = appended(state, k_t, v_t)
    return dense_attention(q_t, state.keys, state.values, scale=scale,
                           key_padding_mask=state.padding), state


MECHANISM = Mechanism(
    name="dense",
    paper="baseline",
    summary="exact softmax attention via torch SDPA",
    fn=dense_attention,
    reference=reference,
    weights=weights,
    patterns=ALL_PATTERNS,
    exact=True,
    init_state=init_state,
    step=step,
    prefill_state=prefill_state,
)
