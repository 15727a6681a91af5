"""A padded batch, row by row, for mechanisms whose layout counts positions from the first token.

HiP's query blocks, sink and refresh schedule, SCOUT's segments and HAX's decoding state are
laid out from position 0 of the sequence. Masking a left-padded row's padding is not enough
for them: the padding shifts every block and segment boundary of the row, so the row would not
compute what its prompt computes alone. Here such a batch is run as ``B`` batches of one, each
row with its padded positions removed (not masked):

* :func:`attention_by_rows`: ``out[b, :, real_b] = attend(q[b, :, real_b], k[b, :, real_b],
  v[b, :, real_b])`` for self attention, the padded query positions 0;
* :class:`RowStates`: one decoding state per row, built from the row's real tokens, stepped
  and reordered (beam search) row by row.

Each row then equals its prompt alone exactly; the price is ``B`` calls per layer and step
instead of one. Mechanisms whose state takes the padding (``dense``, ``local``, ``linear``,
``ntk``: no position enters their layout) run the batch at once and never come here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Prefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]
Reorder = Callable[[Any, torch.Tensor], Any]


def _real(x: torch.Tensor, row: int, keep: torch.Tensor) -> torch.Tensor:
    """Row ``row`` of ``x (B, H, L, ·)`` as a batch of one, its positions ``keep (L,)`` only."""
    return x[row:row + 1][:, :, keep]


def attention_by_rows(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Self attention of each row over its real tokens alone: ``q (B, Hq, L, D)``, ``k, v
    (B, Hkv, L, ·)``, ``key_padding_mask (B, L)`` (``True`` = padding, the queries' too).
    Returns ``(B, Hq, L, Dv)`` with 0 at the padded positions."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for row, padding in enumerate(key_padding_mask):
        keep = ~padding
        if bool(keep.any()):
            out[row:row + 1, :, keep] = attend(*(_real(x, row, keep) for x in (q, k, v)))
    return out


@dataclass
class RowStates:
    """The decoding state of a padded batch: ``rows[b]`` is row ``b``'s state (batch of one),
    built from its real tokens, so that each row decodes as its prompt alone."""

    rows: list[Any]

    @classmethod
    def prefill(cls, prefill: Prefill, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor) -> RowStates:
        """``prefill(q_b, k_b, v_b)`` of every row's real tokens (``True`` = padding)."""
        return cls([prefill(*(_real(x, row, ~padding) for x in (q, k, v)))
                    for row, padding in enumerate(key_padding_mask)])

    def step(self, step: Step, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor
             ) -> tuple[torch.Tensor, RowStates]:
        """One decoding step of every row: ``(B, Hq, 1, Dv)`` and the stepped states."""
        if q_t.shape[0] != len(self.rows):
            raise ValueError(f"q_t holds {q_t.shape[0]} rows, the state {len(self.rows)}")
        outs, rows = [], []
        for row, state in enumerate(self.rows):
            out, state = step(q_t[row:row + 1], k_t[row:row + 1], v_t[row:row + 1], state)
            outs.append(out)
            rows.append(state)
        return torch.cat(outs, dim=0), RowStates(rows)

    def reorder(self, index: torch.Tensor, reorder: Reorder) -> RowStates:
        """The states of rows ``index``; each is a copy (``reorder(state, [0])``), so rows
        duplicated by beam search step independently even where a step works in place."""
        first = torch.zeros(1, dtype=torch.long)
        return RowStates([reorder(self.rows[i], first) for i in index.tolist()])
