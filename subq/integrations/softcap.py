"""Attention with soft-capped logits, as Gemma 2 computes it (Gemma Team 2024, "Gemma 2",
Sec. 2; transformers' ``eager_attention_forward`` of ``Gemma2Attention``):

    s_ij = c tanh(scale q_i . k_j / c),   out_i = sum_{j allowed} softmax_j(s_ij) v_j

with ``c`` the ``attn_logit_softcapping`` of the config. Allowed: ``j`` not padding and, when
causal, ``j <= i + Lk - Lq`` (the queries are the last ``Lq`` positions, as in decoding with a
cache) and, with a ``window`` of ``w`` keys, ``j > i + Lk - Lq - w``. Computed in chunks of
queries, each against the keys its rows can see: O(Lq Lk) time for full attention, O(Lq w)
with a window, and memory of one chunk's scores. Padded queries that see no key output 0.
"""

from __future__ import annotations

import torch

from subq.ops.common import masked_softmax, repeat_kv

_CHUNK_ELEMENTS = 1 << 22  # scores per chunk (batch x heads x rows x keys)


def softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                         softcap: float, scale: float, causal: bool,
                         window: int | None = None,
                         key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``query (B, Hq, Lq, D)``, ``key (B, Hkv, Lk, D)``, ``value (B, Hkv, Lk, Dv)`` ->
    ``(B, Hq, Lq, Dv)`` (the math of the module docstring; ``key_padding_mask (B, Lk)``,
    ``True`` = ignore)."""
    if softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if window is not None and not causal:
        raise NotImplementedError("a sliding window with soft-capping is supported in causal "
                                  "attention only")
    batch, heads, lq, _ = query.shape
    lk = key.shape[2]
    groups = heads // key.shape[1]
    shift = lk - lq
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * (lk if window is None
                                                              else min(lk, window + lq))))
    out = query.new_empty(batch, heads, lq, value.shape[-1])
    for start in range(0, lq, rows):
        stop = min(lq, start + rows)
        last = stop + shift if causal else lk
        first = max(0, start + shift - window + 1) if window is not None else 0
        k = repeat_kv(key[:, :, first:last], groups)
        v = repeat_kv(value[:, :, first:last], groups)
        scores = query[:, :, start:stop] @ k.transpose(-1, -2) * scale
        scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(start, stop, device=query.device)[:, None] + shift
        j = torch.arange(first, last, device=query.device)[None, :]
        allowed = (j <= i) if causal else torch.ones_like(j, dtype=torch.bool).expand(
            stop - start, -1)
        if window is not None:
            allowed = allowed & (j > i - window)
        allowed = allowed.expand(batch, 1, -1, -1)
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask[:, None, None, first:last]
        out[:, :, start:stop] = masked_softmax(scores, allowed.expand_as(scores)) @ v
    return out
