"""HAX's sparse softmax (:mod:`subq.ops.hax`, ``[hax]`` Sec. 4) over two kinds of key slots,
with a training backward that keeps indices and log-sum-exps, not gathered keys (issue 22).

Query ``i`` of query head ``h`` attends, in one softmax, to

* its own slots: the keys ``idx[b, h, i, :]`` where ``ok`` (LSH buckets, the positional
  baselines), gathered per query;
* its block's candidates: the ``m = k + C`` keys ``cand[b, h_kv, i // C, :]`` shared by the
  ``C`` queries of block ``i // C`` (key selection's top-k before the block, then the block's
  own keys), where ``shared[b, h, i, :]``, scored by one matrix product per block.

    s_ij = scale q_i . k_j,   lse_i = log sum_{j in S_i} exp(s_ij),
    out_i = sum_{j in S_i} exp(s_ij - lse_i) v_j                  (0 where S_i is empty)

The backward is flash attention's, chunk by chunk: ``P`` is rebuilt from the saved ``lse``,
``delta_i = dout_i . out_i``, ``dS_ij = P_ij (dout_i . v_j - delta_i)``, ``dq_i = scale sum_j
dS_ij k_j``, and ``dk_j += scale dS_ij q_i``, ``dv_j += P_ij dout_i`` are scattered with
``index_add_`` (a slot that does not count has ``P = 0``, so it adds nothing). Autograd keeps
``q, k, v``, the output, ``lse`` and the slots: O(L (D + n + m)), where keeping the gathers
would cost O(L n D).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import masked_softmax

_GATHER_ELEMENTS = 1 << 22  # gathered K (or V) elements per query chunk


@dataclass(frozen=True)
class SparseSlots:
    """The keys every query attends to (positions along L, each kv head its own keys).

    ``idx, ok (B, Hq, L, n)``: per-query slots; ``cand (B, Hkv, L / C, m)`` (positions
    clamped below L) and ``shared (B, Hq, L, m)``: per-block candidates and which of them each
    query keeps, or None; ``size``: ``C``, queries per block (1 without candidates)."""

    idx: torch.Tensor
    ok: torch.Tensor
    cand: torch.Tensor | None
    shared: torch.Tensor | None
    size: int
    scale: float

    def chunks(self, length: int, width: int, rows: int | None) -> Iterator[slice]:
        """Query rows in chunks of about ``_GATHER_ELEMENTS`` gathered elements of ``width``
        (``rows``: a given chunk length), each starting at a block boundary."""
        b, hq, _, n = self.idx.shape
        if rows is None:
            rows = _GATHER_ELEMENTS // max(1, b * hq * (n + 1) * width)
        rows = max(self.size, rows // self.size * self.size)
        for start in range(0, max(length, 1), rows):
            yield slice(start, min(start + rows, length))


def _flat_rows(idx: torch.Tensor, kv_heads: int, length: int) -> torch.Tensor:
    """Positions ``idx (B, H, ...)`` of heads ``H = G Hkv`` as rows of the flattened
    ``(B Hkv L, d)`` keys: query head ``h`` reads kv head ``h // G``."""
    b, heads = idx.shape[:2]
    base = torch.arange(b * kv_heads, device=idx.device).view(b, kv_heads) * length
    base = base.repeat_interleave(heads // kv_heads, dim=1)
    return idx + base.view(b, heads, *([1] * (idx.dim() - 2)))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, Hkv, L, d)``, ``idx (B, H, ...)`` -> ``(B, H, ..., d)``: one row gather from
    the flattened ``x``, without repeating ``x`` per query head."""
    return F.embedding(_flat_rows(idx, x.shape[1], x.shape[2]), x.flatten(0, 2))


def _scatter_rows(grad: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """``grad (B, Hkv, L, d) += `` the rows ``rows (B, H, ..., d)`` at ``idx (B, H, ...)``."""
    flat = _flat_rows(idx, grad.shape[1], grad.shape[2]).reshape(-1)
    grad.view(-1, grad.shape[-1]).index_add_(0, flat, rows.reshape(-1, rows.shape[-1]))


def to_blocks(x: torch.Tensor, groups: int, n: int, size: int) -> torch.Tensor:
    """``(B, Hq, L, d)`` -> ``(B, Hkv, n, G C, d)``: the rows of each kv head's query block
    (zero rows past ``L``)."""
    b, hq, length, d = x.shape
    x = F.pad(x, (0, 0, 0, n * size - length)).view(b, hq // groups, groups, n, size, d)
    return x.transpose(2, 3).reshape(b, hq // groups, n, groups * size, d)


def from_blocks(y: torch.Tensor, groups: int, length: int) -> torch.Tensor:
    """The inverse of :func:`to_blocks`: ``(B, Hkv, n, G C, m)`` -> ``(B, Hq, L, m)``."""
    b, hkv, n, rows, m = y.shape
    y = y.view(b, hkv, n, groups, rows // groups, m).transpose(2, 3)
    return y.reshape(b, hkv * groups, n * (rows // groups), m)[:, :, :length]


class _Chunk:
    """One chunk of query rows with its gathered keys and values, and the products that the
    forward and the backward share."""

    def __init__(self, slots: SparseSlots, q, k, v, part: slice) -> None:
        self.part, self.q, self.slots = part, q[:, :, part], slots
        self.groups = q.shape[1] // k.shape[1]
        self.k_own = gather_rows(k, slots.idx[:, :, part])           # (B, Hq, r, n, D)
        self.v_own = gather_rows(v, slots.idx[:, :, part])
        self.blocks = self.k_cand = self.v_cand = None
        if slots.cand is not None:
            first = part.start // slots.size
            self.blocks = -(-(part.stop - part.start) // slots.size)
            self.cand = slots.cand[:, :, first:first + self.blocks]
            self.k_cand = gather_rows(k, self.cand)                    # (B, Hkv, nb, m, D)
            self.v_cand = gather_rows(v, self.cand)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return to_blocks(x, self.groups, self.blocks, self.slots.size)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        return from_blocks(y, self.groups, self.q.shape[2])

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale q . k`` over the chunk's slots, own then candidates, and which count."""
        logits = torch.einsum("bhid,bhind->bhin", self.q, self.k_own)
        allowed = self.slots.ok[:, :, self.part]
        if self.blocks is not None:
            logits = torch.cat([logits, self._rows(
                self._blocks(self.q) @ self.k_cand.transpose(-1, -2))], dim=-1)
            allowed = torch.cat([allowed, self.slots.shared[:, :, self.part]], dim=-1)
        return logits * self.slots.scale, allowed

    def mix(self, p: torch.Tensor, own: torch.Tensor, cand: torch.Tensor | None
            ) -> torch.Tensor:
        """``sum_j p_ij x_j`` over the slots, ``own (B, Hq, r, n, d)`` and ``cand (B, Hkv, nb,
        m, d)`` the rows of x."""
        n = own.shape[-2]
        out = torch.einsum("bhin,bhind->bhid", p[..., :n], own)
        if self.blocks is not None:
            out = out + self._rows(self._blocks(p[..., n:]) @ cand)
        return out


def _forward(q, k, v, slots: SparseSlots, rows: int | None, with_lse: bool):
    """The output ``(B, Hq, L, Dv)`` and, ``with_lse``, the log-sum-exps ``(B, Hq, L)``
    (0 on rows with no key)."""
    length = q.shape[2]
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = q.new_empty(q.shape[:3]) if with_lse else None
    for part in slots.chunks(length, max(q.shape[-1], v.shape[-1]), rows):
        chunk = _Chunk(slots, q, k, v, part)
        logits, allowed = chunk.logits()
        p = masked_softmax(logits, allowed)
        out[:, :, part] = chunk.mix(p, chunk.v_own, chunk.v_cand)
        if with_lse:
            lse[:, :, part] = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")),
                                              dim=-1).nan_to_num(neginf=0.0)
    return out, lse


class _SparseSoftmax(torch.autograd.Function):
    """:func:`_forward` with the recomputing backward of the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, slots):
        out, lse = _forward(q, k, v, slots, None, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.slots = slots
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        slots = ctx.slots
        grad_out = grad_out.to(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        delta = (grad_out * out).sum(-1)
        for part in slots.chunks(q.shape[2], max(q.shape[-1], v.shape[-1]), None):
            chunk = _Chunk(slots, q, k, v, part)
            logits, allowed = chunk.logits()
            p = torch.exp(logits - lse[:, :, part, None]).masked_fill(~allowed, 0.0)
            g = grad_out[:, :, part]
            n = chunk.k_own.shape[-2]
            dp = torch.einsum("bhid,bhind->bhin", g, chunk.v_own)
            if chunk.blocks is not None:
                dp = torch.cat([dp, chunk._rows(
                    chunk._blocks(g) @ chunk.v_cand.transpose(-1, -2))], dim=-1)
            ds = p * (dp - delta[:, :, part, None]) * slots.scale
            dq[:, :, part] = chunk.mix(ds, chunk.k_own, chunk.k_cand)
            own = slots.idx[:, :, part]
            _scatter_rows(dk, own, ds[..., :n, None] * chunk.q[..., None, :])
            _scatter_rows(dv, own, p[..., :n, None] * g[..., None, :])
            if chunk.blocks is not None:
                _scatter_rows(dk, chunk.cand, chunk._blocks(ds[..., n:]).transpose(-1, -2)
                              @ chunk._blocks(chunk.q))
                _scatter_rows(dv, chunk.cand, chunk._blocks(p[..., n:]).transpose(-1, -2)
                              @ chunk._blocks(g))
        return dq, dk, dv, None


def sparse_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slots: SparseSlots) -> torch.Tensor:
    """``out (B, Hq, L, Dv)`` of the module docstring for ``q (B, Hq, L, D)``, ``k (B, Hkv, L,
    D)``, ``v (B, Hkv, L, Dv)`` (one dtype). Under autograd in eager mode the recomputing
    backward; under ``torch.compile`` autograd traces one chunk of the whole length."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # gathers read flat rows
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _forward(q, k, v, slots, None, with_lse=False)[0]
    if torch.compiler.is_compiling():
        return _forward(q, k, v, slots, q.shape[2], with_lse=False)[0]
    return _SparseSoftmax.apply(q, k, v, slots)
