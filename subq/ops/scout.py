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

Fast path: gather the ``floor(L/S)`` checkpoint keys and values once; queries in blocks of
``_BLOCK`` rows score only the checkpoints that block can see, and the self logit joins the
same softmax. Time O(L^2 D / S), memory O(block * L / S): never an L x L tensor. The default
``S = 10`` saves a constant factor; ``segment=None`` picks ``S = round(sqrt(L))``, giving
O(L^1.5). Decoding keeps only the checkpoints (``floor(t/S)`` keys after t tokens); the
current token is used as the self term and cached iff it ends a segment.

Options: ``segment=10`` (None: about sqrt(L); decoding needs a fixed S). Patterns: causal self.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import Mechanism, Option, Pattern
from . import masks
from .common import accumulation_dtype
from .reference import masked_attention, masked_weights

DEFAULT_SEGMENT = 10
_BLOCK = 256


def resolve_segment(segment: int | None, length: int) -> int:
    """``segment``, or ``round(sqrt(length))`` (at least 1) when it is None."""
    return max(1, round(math.sqrt(length))) if segment is None else segment


def scout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    cross: bool = False, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None,
                    segment: int | None = DEFAULT_SEGMENT) -> torch.Tensor:
    """Self + checkpoint attention by gathering the checkpoints (causal self only).

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``;
    ``key_padding_mask (B, L)`` (True = ignore) hides padded checkpoints and padded selves.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    groups = q_heads // kv_heads
    s = resolve_segment(segment, length)
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    q5 = q.to(acc).view(batch, kv_heads, groups, length, dim)
    k, v = k.to(acc), v.to(acc)
    ck, cv = k[:, :, s - 1::s], v[:, :, s - 1::s]  # (B, Hkv, n_ckpt, D)
    self_logit = torch.einsum("bhgld,bhld->bhgl", q5, k) * scale
    pad = None  # (B, 1, 1, 1, n_ckpt): padded checkpoints, broadcast over heads and rows
    if key_padding_mask is not None:
        self_logit = self_logit.masked_fill(key_padding_mask[:, None, None], float("-inf"))
        pad = key_padding_mask[:, None, None, None, s - 1::s]

    blocks = []
    for start in range(0, length, _BLOCK):
        stop = min(start + _BLOCK, length)
        visible = (stop - 1) // s  # checkpoints any row of this block can see
        rows = torch.arange(start, stop, device=q.device)[:, None]
        ckpt = torch.arange(visible, device=q.device)[None, :]
        allowed = ckpt < torch.div(rows, s, rounding_mode="floor")  # (rows, visible)
        if pad is not None:
            allowed = allowed & ~pad[..., :visible]
        logits = torch.einsum("bhgld,bhcd->bhglc", q5[:, :, :, start:stop],
                              ck[:, :, :visible]) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        own = self_logit[..., start:stop]
        peak = torch.maximum(logits.amax(dim=-1), own).detach() if visible else own.detach()
        peak = peak.masked_fill(~torch.isfinite(peak), 0.0)  # rows that see nothing
        p = torch.exp(logits - peak[..., None])
        p_self = torch.exp(own - peak)
        denom = p.sum(dim=-1) + p_self
        num = torch.einsum("bhglc,bhcd->bhgld", p, cv[:, :, :visible])
        num = num + p_self[..., None] * v[:, :, None, start:stop]
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        blocks.append(num / safe[..., None])
    out = torch.cat(blocks, dim=3) if blocks else q5.new_zeros(batch, kv_heads, groups, 0, dv)
    return out.reshape(batch, q_heads, length, dv).to(q.dtype)


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
    test_options={"segment": 4},
)
