"""The explicit O(Lq x Lk) masked softmax attention that mask-defined references share:

    A = softmax_j( scale * q_i . k_j  over allowed j ),    out = A @ v

computed by materialising every logit, in float64 for float64 inputs and float32 otherwise.
Deliberately naive: it is what fast paths are held to.
"""

from __future__ import annotations

import torch

from .common import accumulation_dtype, masked_softmax, repeat_kv


def masked_weights(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``A (B, Hq, Lq, Lk)`` for ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)`` and a boolean
    ``allowed`` broadcastable to ``(B, Hq, Lq, Lk)``."""
    acc = accumulation_dtype(q.dtype)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * scale
    return masked_softmax(scores, allowed.expand_as(scores))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``masked_weights(q, k, allowed, scale) @ v`` in q's dtype."""
    a = masked_weights(q, k, allowed, scale)
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    return (a @ v.to(a.dtype)).to(q.dtype)
