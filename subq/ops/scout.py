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
``_BLOCK`` rows attend, in one fused SDPA call per block, to the checkpoints the block
can see and to the block's own keys, masked to the diagonal (the self term), all in the same
softmax. Time O(L (L/S + block) D), memory O(block (L/S + block)): never an L x L tensor.
The default ``S = 10`` saves a constant factor; ``segment=None`` picks ``S = round(sqrt(L))``,
giving O(L^1.5). Decoding keeps only the checkpoints (``floor(t/S)`` keys after t tokens); the
current token is used as the self term and cached iff it ends a segment.

Options: ``segment=10`` (None: about sqrt(L); decoding needs a fixed S). Patterns: causal self.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import Mechanism, Option, Pattern
from . import masks
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
    Each block of rows is one fused SDPA call over ``[visible checkpoints ‖ the block's own
    keys]`` with an additive mask: checkpoint ``c`` is visible to row ``i`` iff
    ``c < floor(i / S)``, and of the block's own keys only the diagonal (the self term).
    A checkpoint that is row i itself is not visible to i as a checkpoint, so nothing is
    counted twice.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    groups = q_heads // kv_heads
    s = resolve_segment(segment, length)
    ck, cv = k[:, :, s - 1::s], v[:, :, s - 1::s]  # (B, Hkv, n_ckpt, D)
    # (B, Hq, L, D) -> (B, Hkv, groups, L, D): the heads of a GQA group share keys.
    q5 = q.view(batch, kv_heads, groups, length, dim)
    blocks = []
    for start in range(0, length, _BLOCK):
        stop = min(start + _BLOCK, length)
        rows = stop - start
        visible = (stop - 1) // s  # checkpoints any row of this block can see
        i = torch.arange(start, stop, device=q.device)[:, None]
        seen = torch.arange(visible, device=q.device)[None, :] < torch.div(
            i, s, rounding_mode="floor")
        own = torch.eye(rows, dtype=torch.bool, device=q.device)
        allowed = torch.cat([seen, own], dim=1)  # (rows, visible + rows)
        if key_padding_mask is not None:
            pad = torch.cat([key_padding_mask[:, s - 1::s][:, :visible],
                             key_padding_mask[:, start:stop]], dim=1)
            allowed = allowed & ~pad[:, None, None, :]  # (B, 1, rows, keys)
        allowed = torch.cat([allowed] * groups, dim=-2)  # rows ordered (group, row) as qb
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))  # an all -inf row outputs 0
        keys = torch.cat([ck[:, :, :visible], k[:, :, start:stop]], dim=2)
        values = torch.cat([cv[:, :, :visible], v[:, :, start:stop]], dim=2)
        qb = q5[:, :, :, start:stop].reshape(batch, kv_heads, groups * rows, dim)
        out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=bias, scale=scale)
        blocks.append(out.view(batch, kv_heads, groups, rows, dv))
    return torch.cat(blocks, dim=3).reshape(batch, q_heads, length, dv)


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
