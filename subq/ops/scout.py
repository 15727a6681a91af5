"""SCOUT's segment-checkpoint attention (``[scout]``, Jafari et al. 2025).

Query i attends to itself and to the checkpoints before it, the last token of every complete
earlier segment of length S, in one joint softmax:

    C(i)  = {j : j < i and j % S == S - 1}                 (|C(i)| = floor(i / S))
    out_i = sum_{j in {i} u C(i)} softmax_j(scale * q_i . k_j) v_j

i.e. dense attention under the mask ``M_ij = (j == i) or (j < i and j % S == S - 1)``. With
``S = 1`` every earlier key is a checkpoint and this is dense causal attention. In the SCOUT
block a local mixer (sliding-window attention or Mamba) has already folded each segment into
its last token, which is why a strided selection suffices (the released code's
``key_states[:, :, S-1::S]``).

Fast path: row ``i = m S + r`` sees exactly the checkpoints ``c < m``, so grouping the rows
by their offset r inside the segment turns the checkpoint attention into plain causal
attention of ``n = ceil(L / S)`` queries over ``[self, ckpt_0, ckpt_1, ...]``; the per-row
self term rides on one extra coordinate of queries, keys and values (see
:func:`scout_attention`), so each key/value head is one fused causal SDPA call, exact and
differentiable. Time O(L^2 D / (2 S)), memory O(L D) per head: never an L x L tensor.
The default ``S = 10`` saves a constant factor; ``segment=None`` picks ``S = round(sqrt(L))``,
giving O(L^1.5). Decoding keeps only the checkpoints (``floor(t/S)`` keys after t tokens); the
current token is used as the self term and cached iff it ends a segment.

Options: ``segment=10`` (None: about sqrt(L); decoding needs a fixed S). Patterns: causal self.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import Mechanism, Option, Pattern
from . import masks
from .common import accumulation_dtype, new_empty
from .reference import masked_attention, masked_weights

DEFAULT_SEGMENT = 10


def resolve_segment(segment: int | None, length: int) -> int:
    """``segment``, or ``round(sqrt(length))`` (at least 1) when it is None."""
    return max(1, round(math.sqrt(length))) if segment is None else segment


def _segment_views(x: torch.Tensor, s: int) -> Iterator[torch.Tensor]:
    """Views of ``x (B, G, L, C)`` in segment-major order: ``(B, G, S, L // S, C)`` whose
    ``[:, :, r, m]`` is row ``m S + r``, then the tail ``(B, G, L % S, C)`` if any. Lazy, so
    that a view is taken after in-place writes through the previous one (autograd)."""
    whole = x.shape[2] // s
    yield x[:, :, :whole * s].unflatten(2, (whole, s)).transpose(2, 3)
    if x.shape[2] > whole * s:
        yield x[:, :, whole * s:]


def _segment_slots(buffer: torch.Tensor, length: int, s: int) -> Iterator[torch.Tensor]:
    """The parts of ``buffer (B, G, S, n, C)`` that :func:`_segment_views` of a length-L
    sequence pair with: whole segments, then the first ``L % S`` rows of the last one."""
    whole = length // s
    yield buffer[:, :, :, :whole]
    if length > whole * s:
        yield buffer[:, :, :length - whole * s, whole]


def _shared_keys(k: torch.Tensor, v: torch.Tensor, s: int, n: int, width: int,
                 hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value list ``[self, ckpt_0, ..., ckpt_{n-2}]`` of one head, ``(B, 1, n, width)``
    and ``(B, 1, n, Dv + 1)``: the self key is ``e_D`` (and 0 in the padding column), its value
    ``e_Dv``; checkpoints are ``[k_c, 0, pad_c]`` and ``[v_c, 0]``, with ``pad_c`` a very
    negative number where ``hidden`` (B, n - 1) says checkpoint c is padding, else 0."""
    batch, dim, dv = k.shape[0], k.shape[-1], v.shape[-1]
    acc = accumulation_dtype(k.dtype)
    ka = new_empty(batch, 1, n, width, like=k, dtype=acc)
    va = new_empty(batch, 1, n, dv + 1, like=v, dtype=acc)
    ka[:, :, 0].zero_()
    ka[:, :, 0, dim] = 1
    va[:, :, 0].zero_()
    va[:, :, 0, dv] = 1
    ka[:, :, 1:, :dim].copy_(k[:, :, s - 1::s][:, :, :n - 1])
    va[:, :, 1:, :dv].copy_(v[:, :, s - 1::s][:, :, :n - 1])
    ka[:, :, 1:, dim].zero_()
    va[:, :, 1:, dv].zero_()
    if hidden is not None:
        ka[:, 0, 1:, dim + 1].copy_(hidden.to(acc) * _very_negative(acc))
    return ka, va


def _very_negative(dtype: torch.dtype) -> float:
    """A finite logit whose exp underflows to 0 next to any real logit, without overflow."""
    return torch.finfo(dtype).min / 2


def scout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    cross: bool = False, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None,
                    segment: int | None = DEFAULT_SEGMENT) -> torch.Tensor:
    """Self + checkpoint attention as one causal SDPA call per key/value head.

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``;
    ``key_padding_mask (B, L)`` (True = ignore) hides padded checkpoints and padded selves.

    Row ``i = m S + r`` sees checkpoints ``c < m``. Regrouping the rows by their offset ``r``
    gives, per query head, S sequences of ``n = ceil(L / S)`` queries in which query m sees
    keys ``[self, ckpt_0, ..., ckpt_{m-1}]`` = the first m + 1 of one shared key list: plain
    causal attention (SDPA ``is_causal``) of ``G S`` query sequences over one key/value head.
    The self key differs per row, so it enters through one extra coordinate: the query gets
    ``q_i . k_i``, the shared self key ``e`` and the checkpoints 0 there, so the self logit is
    exact; the self value is ``e`` (checkpoint values 0 there), so the same column of the
    output is the self weight ``p_i`` and ``out_i = sdpa_i[:Dv] + p_i v_i``. With padding a
    second coordinate carries a very negative logit for padded keys (exp underflows to 0), and
    rows that see no key are set to 0. Half-precision inputs are computed in float32 (the
    self logit ``q_i . k_i`` alone exceeds float16's range once ``|q| |k| > 65504``).
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    groups = q_heads // kv_heads
    s = resolve_segment(segment, length)
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    n = -(-length // s)  # segments, the last possibly partial
    out = new_empty(batch, q_heads, length, dv, like=q, dtype=acc)
    if length == 0:
        return out
    width = dim + (1 if key_padding_mask is None else 2)
    hidden_ckpt = None
    if key_padding_mask is not None:
        hidden_ckpt = key_padding_mask[:, s - 1::s][:, :n - 1]  # (B, n - 1)
        seen = torch.cat([torch.zeros_like(hidden_ckpt[:, :1], dtype=torch.long),
                          (~hidden_ckpt).long().cumsum(1)], dim=1)  # (B, n) visible ckpts
        rows = torch.arange(length, device=q.device)
        empty = key_padding_mask & (seen[:, rows // s] == 0)  # (B, L): sees no key
    for h in range(kv_heads):
        heads = slice(h * groups, (h + 1) * groups)
        # (B, G, L): q_i . k_i
        logit = torch.linalg.vecdot(q[:, heads].to(acc), k[:, h:h + 1].to(acc))
        if key_padding_mask is not None:
            logit = logit.masked_fill(key_padding_mask[:, None], _very_negative(acc))
        qa = new_empty(batch, groups, s, n, width, like=q, dtype=acc)
        if length % s:
            qa[:, :, length % s:, n - 1].zero_()  # rows past L: finite, discarded
        for qi, li, dst in zip(_segment_views(q[:, heads], s),
                               _segment_views(logit[..., None], s),
                               _segment_slots(qa, length, s), strict=True):
            dst[..., :dim].copy_(qi)
            dst[..., dim:dim + 1].copy_(li)
        if key_padding_mask is not None:
            qa[..., dim + 1].fill_(1)
        ka, va = _shared_keys(k[:, h:h + 1], v[:, h:h + 1], s, n, width, hidden_ckpt)
        fused = F.scaled_dot_product_attention(
            qa.view(batch, groups * s, n, width), ka.expand(batch, groups * s, n, width),
            va.expand(batch, groups * s, n, dv + 1), is_causal=True, scale=scale)
        fused = fused.view(batch, groups, s, n, dv + 1)
        for dst, src, vi in zip(_segment_views(out[:, heads], s),
                                _segment_slots(fused, length, s),
                                _segment_views(v[:, h:h + 1], s), strict=True):
            dst.copy_(src[..., :dv])
            dst.addcmul_(src[..., dv:], vi)
    if key_padding_mask is not None:
        out.masked_fill_(empty[:, None, :, None], 0)
    return out.to(q.dtype)


def checkpoint_mask(length: int, segment: int, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """``M_ij = (j == i) or (j < i and j % S == S - 1)``, ``(L, L)``."""
    i, j = masks.positions(length, length, device)
    return (j == i) | ((j < i) & (j % segment == segment - 1))


def _allowed(q, segment, key_padding_mask):
    mask = checkpoint_mask(q.shape[2], resolve_segment(segment, q.shape[2]), q.device)
    return masks.with_key_padding(mask, key_padding_mask)


def reference(q, k, v, *, causal=True, cross=False, scale=None, key_padding_mask=None,
              segment=DEFAULT_SEGMENT):
    """Dense masked softmax with the checkpoint mask ``M``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_attention(q, k, v, _allowed(q, segment, key_padding_mask), scale)


def weights(q, k, *, causal=True, cross=False, scale=None, key_padding_mask=None,
            segment=DEFAULT_SEGMENT):
    """The attention matrix ``(B, Hq, L, L)``: the diagonal plus checkpoint columns."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_weights(q, k, _allowed(q, segment, key_padding_mask), scale)


@dataclass
class CheckpointCache:
    """Checkpoint keys/values ``(B, Hkv, floor(seen / S), D)`` and the tokens seen so far."""

    keys: torch.Tensor
    values: torch.Tensor
    seen: int = 0


def _fixed_segment(segment: int | None) -> int:
    if segment is None:
        raise ValueError("option 'segment' of mechanism 'scout' must be an int for decoding "
                         "(None picks sqrt(L), which needs the whole sequence)")
    return segment


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device,
               segment=DEFAULT_SEGMENT) -> CheckpointCache:
    _fixed_segment(segment)
    return CheckpointCache(
        torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device))


def prefill_state(q, k, v, *, scale=None, segment=DEFAULT_SEGMENT) -> CheckpointCache:
    """The cache after a prefill of ``T`` tokens: the keys and values of tokens
    ``mS + S - 1 < T``, the checkpoints its steps would have kept."""
    s = _fixed_segment(segment)
    return CheckpointCache(k[:, :, s - 1::s], v[:, :, s - 1::s], k.shape[2])


def step(q_t, k_t, v_t, state: CheckpointCache, *, scale=None, segment=DEFAULT_SEGMENT
         ) -> tuple[torch.Tensor, CheckpointCache]:
    """Attend to the cached checkpoints and to the current token; cache it iff it ends a
    segment (it is token ``mS + S - 1``)."""
    s = _fixed_segment(segment)
    keys = torch.cat([state.keys, k_t], dim=2)
    values = torch.cat([state.values, v_t], dim=2)
    allowed = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool, device=q_t.device)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out = masked_attention(q_t, keys, values, allowed, scale)
    seen = state.seen + 1
    if seen % s == 0:
        return out, CheckpointCache(keys, values, seen)
    return out, CheckpointCache(state.keys, state.values, seen)


MECHANISM = Mechanism(
    name="scout",
    paper="scout",
    summary="self + segment-checkpoint attention, O(L^2/S); checkpoint-only decode cache",
    fn=scout_attention,
    reference=reference,
    weights=weights,
    patterns=frozenset({Pattern.CAUSAL_SELF}),
    exact=False,
    options=(
        Option("segment", int, DEFAULT_SEGMENT,
               "segment length S; the last token of each complete segment is a checkpoint "
               "(None: round(sqrt(L)), O(L^1.5); decoding needs an int)", low=1, nullable=True),
    ),
    init_state=init_state,
    step=step,
    prefill_state=prefill_state,
    test_options={"segment": 4},
)
