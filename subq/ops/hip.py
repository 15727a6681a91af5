"""HiP attention: hierarchically pruned, block-sparse softmax attention (Lee et al., ``hip``).

Queries are cut into blocks of ``b_q`` rows; block ``n`` starts at ``s = n b_q``. Each block
attends, with one softmax, to the union

    S(i) = sink ∪ selected ∪ window,       out_i = sum_{j in S(i)} softmax_j(scale q_i . k_j) v_j

* sink: keys ``j < sink``;
* window: the ``w`` keys before the block and the block's own keys, ``s - w <= j < s + b_q``
  (non-causal: also the ``w`` keys after it, ``j < s + b_q + w``), as in ``local``;
* selected: ``topk // b_k`` key blocks of ``b_k`` keys found by the tree search of
  :mod:`subq.ops.hip_mask`, among the keys ``j < s - w`` (causal) or all keys (non-causal),
  scored by the block's representative queries;

cut at ``j <= i`` when causal, padding keys removed, each key counted once. So causal row
``i = s + r`` sees at most ``sink + topk + w + r + 1`` keys, up to ``b_q`` more than the
spec's ``sink + topk + w`` (whose window ends at the block's end): the block's rows share one
window start, that of the search range, and a decode step appends to the window kept since
its refresh (docs/mechanisms/hip.md, "The key budget").

Representative queries and leakage. In the paper every query of a block (stride ``b_sq``)
scores the branches, so in causal attention query ``i`` would see a mask chosen by queries
after ``i``. Here the representatives of block ``n`` are ``q_{s - r b_sq}``, ``r = 0 ...
ceil(b_q / b_sq) - 1`` (the ``b_q`` queries ending at the block's first query ``s``), and the
search sees keys ``< s - w`` only, so the mask of query ``i`` depends on nothing after
``s <= i``: the output is prefix-consistent. Non-causal blocks use their own queries
``q_{s + r b_sq}``.

Cost: the search is O((L / b_q) (topk / b_k) b_k (b_q / b_sq) D log(L / topk)), query blocks
grouped by their number of iterations so that none runs a wasted one. The attention, in eager
inference, gathers each block's ``sink + topk`` far keys into reused buffers and reads its
window as a strided view of the keys, runs the fused kernel on each part and merges the two
softmaxes by their log-sum-exps (:func:`_attend_split`); otherwise (autograd, padding, compile)
it gathers all ``sink + topk + w + b_q`` keys and runs one fused SDPA call per cache-sized chunk
of blocks, an additive mask removing duplicates, padding and the causal cut (:func:`_attend`).
Either way: O(L (topk + w + sink) D) time, O(L D) memory beyond bounded chunks, never an L x L
tensor. Patterns: causal self, noncausal self.

Decoding keeps a KV cache (growing by doubling, written in place) and the last ``b_q`` queries;
every ``refresh`` steps (at ``t = 0, r_m, 2 r_m, ...``) it re-runs the search for the step's
query as a block starting at ``s = t`` and reuses the mask until the next refresh, the window
``[s - w, t]`` covering the new tokens. The default ``refresh=None`` means ``refresh ==
block_q``, with which stepping equals the causal prefill exactly; the paper's schedule
(``r_m = 8`` with ``b_q = 32``) is ``refresh=8``, an approximation of the prefill: a step then
reads a block's mask chosen at a refresh that is not the prefill's block start. A step costs
O((sink + topk + w + refresh) D), plus the search every ``refresh`` steps:
O(topk D (b_q / b_sq) log(t / topk)), never O(t^2). At a refresh the far
keys and values of every query head are gathered, and the window copied after them, into
buffers of the state (reused across refreshes); a step appends its key and value there and
attends with one fused SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import SELF_PATTERNS, Mechanism, Option
from .common import (
    accumulation_dtype,
    fused_attention_backward,
    fused_attention_with_lse,
    fused_kernel_applies,
    merge_weights,
    new_empty,
)
from .hip_mask import REPRESENTATIVES, search_blocks, search_iterations
from .reference import masked_attention, masked_weights

DEFAULTS = dict(topk=512, block_q=32, block_k=2, query_stride=2, sink=16, window=256,
                representative="center", refresh=None, queries="prefix")
#: How a causal prefill block chooses its keys: ``"prefix"`` (the default) scores with the
#: queries ending at the block's first query over keys ``< s - w``, so no output depends on a
#: later query; ``"block"`` is the paper's reading: the block's own queries over keys
#: ``< s + b_q - w`` (prefill only; decoding always uses ``"prefix"``).
QUERY_SELECTIONS = ("prefix", "block")
# The attention builds key layouts for chunks of about _CHUNK_KEYS (row, key) pairs and gathers
# keys and values for sub-chunks of about _GATHER_ELEMENTS elements (8 MiB in float32: in L3,
# few enough ops that both cores are busy; see hip_mask's chunk sizes).
_CHUNK_KEYS = 1 << 19
_GATHER_ELEMENTS = 1 << 21


def _n_nodes(topk: int, block_k: int) -> int:
    return max(1, topk // block_k)


def _n_representatives(block_q: int, query_stride: int) -> int:
    return -(-block_q // query_stride)


def _kv_rows(batch: int, kv_heads: int, groups: int, device) -> torch.Tensor:
    """``(B * Hq,)``: the key/value row ``b * Hkv + h // groups`` of query row ``b * Hq + h``."""
    rows = torch.arange(batch * kv_heads, device=device)
    return rows[:, None].expand(-1, groups).reshape(-1)


@dataclass(frozen=True)
class _Blocks:
    """Per query block (row ``(b, h, n)``, flattened): its first query, search range and the
    key blocks the tree search selected."""

    start: torch.Tensor  # (N,) long, s
    range_end: torch.Tensor  # (N,) long
    blocks: torch.Tensor  # (N, m) long
    valid: torch.Tensor  # (N, m) bool

    def rows(self, i: int, j: int) -> _Blocks:
        return _Blocks(self.start[i:j], self.range_end[i:j], self.blocks[i:j], self.valid[i:j])


def _search_groups(ends: list[int], n_nodes: int, block_k: int) -> list[tuple[int, int]]:
    """Runs ``[n0, n1)`` of consecutive query blocks whose searches take the same number of
    iterations: each run is searched with no wasted iteration."""
    its = [search_iterations(-(-end // block_k), n_nodes) for end in ends]
    groups: list[tuple[int, int]] = []
    for n, it in enumerate(its):
        if groups and its[groups[-1][0]] == it:
            groups[-1] = (groups[-1][0], n + 1)
        else:
            groups.append((n, n + 1))
    return groups


def _real_representatives(q_rep: torch.Tensor, rep_ok: torch.Tensor, real: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep padded positions out of the search (self attention: a padded key's position is a
    padded query): ``q_rep (N, R, D)``'s representatives at padded positions are replaced by
    the block's first real one (the max over representatives is then the real ones' max), or
    by zeros where the block has none, so whatever a padded query holds never chooses keys."""
    ok = rep_ok & real
    first = ok.to(torch.int8).argmax(dim=1)
    fallback = q_rep[torch.arange(q_rep.shape[0], device=q_rep.device), first]
    fallback = fallback.masked_fill(~ok.any(dim=1, keepdim=True), 0.0)
    q_rep = torch.where(ok[..., None], q_rep, fallback[:, None])
    return q_rep, torch.ones_like(ok)


def _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
            representative, queries="prefix") -> _Blocks:
    """Run the tree search for every query block of a prefill (rows ``(b, h, n)``); causal
    blocks by ``queries`` (:data:`QUERY_SELECTIONS`)."""
    batch, q_heads, length, dim = q.shape
    kv_heads = k.shape[1]
    n_q_blocks = -(-length // block_q)
    n_nodes = _n_nodes(topk, block_k)
    device = q.device
    acc = accumulation_dtype(q.dtype)
    offsets = torch.arange(_n_representatives(block_q, query_stride), device=device) * query_stride
    heads = batch * q_heads
    q_flat = q.detach().reshape(heads, length, dim)
    kv_row = _kv_rows(batch, kv_heads, q_heads // kv_heads, device)
    key_ok = None if key_padding_mask is None else (~key_padding_mask)[:, None].expand(
        batch, kv_heads, length).reshape(-1)
    keys = k.detach().reshape(-1, dim)
    query_ok = None if key_padding_mask is None else (~key_padding_mask)[:, None].expand(
        batch, q_heads, length).reshape(heads, length)
    # Built from Python ints: inductor's index propagation mis-handles clamp + floor division
    # of arange-derived search ranges (torch 2.13, "vr must not be None").
    own = not causal or queries == "block"
    ends = [length if not causal else
            max(0, min(length, (n + 1) * block_q) - window) if own else
            max(0, n * block_q - window) for n in range(n_q_blocks)]
    blocks, valid = [], []
    for n0, n1 in _search_groups(ends, n_nodes, block_k):
        start = torch.arange(n0, n1, device=device) * block_q
        rep_pos = start[:, None] + offsets if own else start[:, None] - offsets
        rep_ok = ((rep_pos >= 0) & (rep_pos < length)).repeat(heads, 1)
        q_rep = q_flat[:, rep_pos.clamp(0, length - 1)].reshape(-1, offsets.shape[0], dim)
        if query_ok is not None:
            q_rep, rep_ok = _real_representatives(q_rep, rep_ok, query_ok[
                :, rep_pos.clamp(0, length - 1)].reshape(rep_ok.shape))
        group_end = torch.tensor(ends[n0:n1], device=device).repeat(heads)
        found, ok = search_blocks(
            q_rep.to(acc), rep_ok, keys, (kv_row * length).repeat_interleave(n1 - n0),
            group_end, max(ends[n0:n1]), n_nodes=n_nodes, block_k=block_k,
            representative=representative, key_ok=key_ok, min_range=min(ends[n0:n1]),
            row_length=length, aligned_ranges=all(e % block_k == 0 for e in ends[n0:n1]))
        blocks.append(found.view(heads, n1 - n0, -1))
        valid.append(ok.view(heads, n1 - n0, -1))
    start = (torch.arange(n_q_blocks, device=device) * block_q).repeat(heads)
    range_end = torch.tensor(ends, device=device).repeat(heads)
    return _Blocks(start, range_end, torch.cat(blocks, dim=1).flatten(0, 1),
                   torch.cat(valid, dim=1).flatten(0, 1))


def _far_layout(sel: _Blocks, *, block_k: int, sink: int, window: int, span: int, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions ``(N, sink + m b_k)`` each row attends to outside its window and which of
    them count: sink (``j < sink``), then the selected blocks (``sink <= j < range_end``), both
    outside the window ``[s - w, s + span)`` (non-causal: ``+ w``). Each key counts once
    (duplicates are masked, not removed); when causal every counted key is ``< s - w``."""
    device = sel.start.device
    s = sel.start[:, None]
    after = span + (0 if causal else window)

    def outside_window(pos: torch.Tensor) -> torch.Tensor:
        return (pos < s - window) | (pos >= s + after)

    sink_pos = torch.arange(sink, device=device).expand(s.shape[0], -1)
    sink_ok = (sink_pos < s - window) if causal else outside_window(sink_pos)
    within = torch.arange(block_k, device=device)
    sel_pos = (sel.blocks[..., None] * block_k + within).flatten(1)
    sel_ok = (sel.valid[..., None].expand(-1, -1, block_k).flatten(1) & (sel_pos >= sink)
              & (sel_pos < sel.range_end[:, None]) & outside_window(sel_pos))
    return torch.cat((sink_pos, sel_pos), dim=1), torch.cat((sink_ok, sel_ok), dim=1)


def _key_layout(sel: _Blocks, *, block_k: int, sink: int, window: int, span: int, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_far_layout`'s keys, then the window last: ``w + span`` keys from ``s - w``
    (non-causal: ``+ w``); causality is left to the window segment."""
    pos, ok = _far_layout(sel, block_k=block_k, sink=sink, window=window, span=span,
                          causal=causal)
    after = span + (0 if causal else window)
    win_pos = sel.start[:, None] - window + torch.arange(window + after, device=pos.device)
    return torch.cat((pos, win_pos), dim=1), torch.cat((ok, win_pos >= 0), dim=1)


def _sub_chunks(q_rows, key_offset, layout, n_keys, window_bias, key_width):
    """The sub-chunks of query blocks that :func:`_attend` and :class:`_SparseAttention` attend
    one fused call at a time: ``(a, b, index, mask)`` for blocks ``a:b``, ``index (n n_keys,)``
    their keys' rows in the flattened keys (position 0 where a key does not count) and ``mask
    (n, 1, span, n_keys)`` (0 or -inf: duplicates, padding, the causal cut). The layout is built
    for chunks of about ``_CHUNK_KEYS`` (row, key) pairs, the keys gathered for sub-chunks small
    enough to stay in cache (``key_width``: the gathered keys' and values' widths together)."""
    rows, span, _ = q_rows.shape
    sub = max(1, _GATHER_ELEMENTS // (n_keys * (key_width + span)))
    chunk = sub * max(1, _CHUNK_KEYS // (sub * n_keys))
    causal_bias = torch.zeros(span, n_keys, dtype=q_rows.dtype, device=q_rows.device)
    causal_bias[:, n_keys - window_bias.shape[-1]:] = window_bias
    for i in range(0, rows, chunk):
        pos, ok = layout(i, i + chunk)
        flat = key_offset[i:i + pos.shape[0], None] + torch.where(ok, pos, 0)
        key_bias = torch.zeros(ok.shape, dtype=q_rows.dtype, device=ok.device)
        key_bias = key_bias.masked_fill(~ok, float("-inf"))[:, None, None, :]
        for a in range(0, pos.shape[0], sub):
            index = flat[a:a + sub].reshape(-1)
            n = index.shape[0] // n_keys
            yield i + a, i + a + n, index, key_bias[a:a + n] + causal_bias


def _gather(flat: torch.Tensor, index: torch.Tensor, n_keys: int, dtype) -> torch.Tensor:
    """Rows ``index`` of ``flat (N, E)`` as ``(n, 1, n_keys, E)`` in ``dtype``."""
    return flat.index_select(0, index).view(-1, 1, n_keys, flat.shape[-1]).to(dtype)


def _attend(q_rows, k_flat, v_flat, key_offset, layout, n_keys, window_bias, scale):
    """Block-sparse softmax: row ``n`` (queries ``q_rows[n] (span, D)``) attends to the keys
    at ``pos[n] (n_keys,)`` where ``ok[n]``, ``pos, ok = layout(i, j)`` for rows ``i:j``;
    ``window_bias (span, W)`` (0 or -inf) adds causality to the last ``W`` keys. One fused
    SDPA call per sub-chunk (:func:`_sub_chunks`). A query that sees no key outputs 0. Under
    autograd every sub-chunk's gathered keys and values are kept for the backward: the
    differentiable form that keeps none is :class:`_SparseAttention`."""
    out = new_empty(*q_rows.shape[:2], v_flat.shape[-1], like=q_rows)
    for a, b, index, mask in _sub_chunks(q_rows, key_offset, layout, n_keys, window_bias,
                                         k_flat.shape[-1] + v_flat.shape[-1]):
        out[a:b] = F.scaled_dot_product_attention(
            q_rows[a:b, None], _gather(k_flat, index, n_keys, q_rows.dtype),
            _gather(v_flat, index, n_keys, q_rows.dtype), attn_mask=mask, scale=scale)[:, 0]
    return out


class _SparseAttention(torch.autograd.Function):
    """:func:`_attend` with a backward that keeps O(L D) for training (issue 22): the forward
    saves the queries, the flattened keys and values, the output and the log-sum-exps, never a
    gathered key or a mask; the backward rebuilds each sub-chunk's gather and mask and runs the
    fused kernel's backward on it (which recomputes ``P = exp(S - lse)``), scattering the key
    and value gradients back with ``index_add_`` (a key a block does not count has ``P = 0``, so
    the zeros scattered to position 0 change nothing). CPU only (torch's flash kernel for the
    CPU takes a float mask and returns its log-sum-exp); elsewhere :func:`_attend` serves."""

    @staticmethod
    def forward(ctx, q_rows, k_flat, v_flat, chunks, n_keys, scale):
        rows, span, _ = q_rows.shape
        out = new_empty(rows, span, v_flat.shape[-1], like=q_rows)
        lse = new_empty(rows, span, like=q_rows)
        for a, b, index, mask in chunks():
            out[a:b, None], lse[a:b, None] = fused_attention_with_lse(
                q_rows[a:b, None], _gather(k_flat, index, n_keys, q_rows.dtype),
                _gather(v_flat, index, n_keys, q_rows.dtype), attn_mask=mask, scale=scale)
        ctx.save_for_backward(q_rows, k_flat, v_flat, out, lse)
        ctx.chunks, ctx.n_keys, ctx.scale = chunks, n_keys, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_rows, k_flat, v_flat, out, lse = ctx.saved_tensors
        n_keys, dtype = ctx.n_keys, q_rows.dtype
        grad_out = grad_out.to(dtype)
        dq = torch.zeros_like(q_rows)
        dk = torch.zeros(k_flat.shape, dtype=dtype, device=k_flat.device)
        dv = torch.zeros(v_flat.shape, dtype=dtype, device=v_flat.device)
        for a, b, index, mask in ctx.chunks():
            dq_c, dk_c, dv_c = fused_attention_backward(
                grad_out[a:b, None], q_rows[a:b, None], _gather(k_flat, index, n_keys, dtype),
                _gather(v_flat, index, n_keys, dtype), out[a:b, None], lse[a:b, None],
                attn_mask=mask, scale=ctx.scale)
            dq[a:b] = dq_c[:, 0]
            dk.index_add_(0, index, dk_c.reshape(-1, dk.shape[-1]))
            dv.index_add_(0, index, dv_c.reshape(-1, dv.shape[-1]))
        return dq, dk.to(k_flat.dtype), dv.to(v_flat.dtype), None, None, None


def _attend_split(q_rows, k, v, kv_rows, far, n_far, window, window_bias, scale):
    """The inference form of :func:`_attend` for a prefill without padding, same result.

    ``q_rows (R * N, b_q, D)``: query block ``n`` of query row ``r`` (``R = B Hq``), reading
    key/value row ``kv_rows[r]`` (a list) of ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)``. Each block
    attends to (a) its far keys, ``pos, ok = far(i, j)`` (``n_far`` per block, rows ``i:j``),
    gathered into reused buffers, and (b) its window, the ``W`` keys from ``s - w``: a strided
    view (no copy) of the row's keys laid out after ``w`` zero rows, ``window_bias (b_q, W)``
    cutting causality, positions outside ``[0, L)`` masked on edge blocks. The two softmaxes
    are merged exactly through their log-sum-exps (the far keys are outside the window, so
    each key counts once); a block with no far key takes the window alone."""
    n_rows, span, dim = q_rows.shape
    length, dv = v.shape[2], v.shape[-1]
    n_q_rows = len(kv_rows)
    n_blocks = n_rows // n_q_rows
    n_window = window_bias.shape[-1]
    dtype, device = q_rows.dtype, q_rows.device
    k_flat, v_flat = k.reshape(-1, dim), v.reshape(-1, dv)
    sub = max(1, _GATHER_ELEMENTS // (n_far * (dim + dv)))
    chunk = sub * max(1, _CHUNK_KEYS // (sub * n_far))
    k_far = torch.empty(sub, 1, n_far, dim, dtype=k.dtype, device=device)
    v_far = torch.empty(sub, 1, n_far, dv, dtype=v.dtype, device=device)
    # The row's keys and values after `window` zero rows: block n's window is rows
    # [n b_q, n b_q + W) of these buffers.
    padded = (n_blocks - 1) * span + n_window
    k_pad = torch.zeros(padded, dim, dtype=dtype, device=device)
    v_pad = torch.zeros(padded, dv, dtype=dtype, device=device)
    inner = (-(-window // span), (length + window - n_window) // span + 1)  # no edge in [a, b)
    edge_pos = torch.arange(n_window, device=device) - window
    shared_bias = window_bias[None, None]
    out = new_empty(n_rows, span, dv, like=q_rows)
    loaded = -1
    for row, kv in enumerate(kv_rows):
        if kv != loaded:
            k_pad[window:window + length] = k_flat[kv * length:(kv + 1) * length]
            v_pad[window:window + length] = v_flat[kv * length:(kv + 1) * length]
            loaded = kv
        for n0 in range(0, n_blocks, chunk):
            n1 = min(n_blocks, n0 + chunk)
            i = row * n_blocks + n0
            pos, ok = far(i, i + n1 - n0)
            index = torch.where(ok, pos, 0) + kv * length
            bias = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(
                ~ok, float("-inf"))[:, None, None]
            seen = ok.any(dim=1)[:, None, None]
            outs, lses = [], []
            for a in range(0, n1 - n0, sub):
                n = min(sub, n1 - n0 - a)
                torch.index_select(k_flat, 0, index[a:a + n].reshape(-1),
                                   out=k_far[:n].view(-1, dim))
                torch.index_select(v_flat, 0, index[a:a + n].reshape(-1),
                                   out=v_far[:n].view(-1, dv))
                o, lse = fused_attention_with_lse(
                    q_rows[i + a:i + a + n, None], k_far[:n].to(dtype), v_far[:n].to(dtype),
                    attn_mask=bias[a:a + n], scale=scale)
                outs.append(o)
                lses.append(lse)
            o_far = torch.cat(outs)[:, 0]
            lse_far = torch.cat(lses).masked_fill_(~seen, float("-inf"))[:, 0]
            k_win = k_pad.as_strided((n1 - n0, 1, n_window, dim), (span * dim, 0, dim, 1),
                                     n0 * span * dim)
            v_win = v_pad.as_strided((n1 - n0, 1, n_window, dv), (span * dv, 0, dv, 1),
                                     n0 * span * dv)
            mask = shared_bias
            if n0 < inner[0] or n1 > inner[1]:
                real = (torch.arange(n0, n1, device=device)[:, None] * span + edge_pos)
                mask = shared_bias + torch.zeros(real.shape, dtype=dtype, device=device
                                                 ).masked_fill_((real < 0) | (real >= length),
                                                                float("-inf"))[:, None, None]
            o_win, lse_win = fused_attention_with_lse(q_rows[i:i + n1 - n0, None], k_win,
                                                      v_win, attn_mask=mask, scale=scale)
            w_far, w_win = merge_weights([lse_far, lse_win[:, 0]])
            o_far.mul_(w_far[..., None]).addcmul_(o_win[:, 0], w_win[..., None])
            out[i:i + n1 - n0] = o_far
    return out


def _window_bias(span: int, n_window: int, offset: int, causal: bool, dtype, device
                 ) -> torch.Tensor:
    """``(span, n_window)``: query ``a`` may see window key ``c`` iff ``c <= offset + a``."""
    a = torch.arange(span, device=device)[:, None]
    c = torch.arange(n_window, device=device)[None, :]
    bias = torch.zeros(span, n_window, dtype=dtype, device=device)
    return bias.masked_fill((c > offset + a) & causal, float("-inf"))


def _check_pattern(cross: bool) -> None:
    if cross:
        raise NotImplementedError("mechanism 'hip' supports self attention only (cross=False)")


def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  cross: bool = False, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None, topk: int = 512,
                  block_q: int = 32, block_k: int = 2, query_stride: int = 2, sink: int = 16,
                  window: int = 256, representative: str = "center",
                  refresh: int | None = None, queries: str = "prefix") -> torch.Tensor:
    """HiP attention, block-sparse over the tree search's selection (see the module docstring).

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``.
    Options (paper defaults): ``topk=512`` keys chosen by the search (``topk // block_k``
    blocks), ``block_q=32``, ``block_k=2``, ``query_stride=2`` (b_sq), ``sink=16``,
    ``window=256``, ``representative="center"`` (or ``"first"``), ``refresh=None`` (decoding
    only; ``None`` is ``block_q``, exact), ``queries="prefix"`` (or the paper's ``"block"``,
    :data:`QUERY_SELECTIONS`).
    """
    _check_pattern(cross)
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    sel = _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
                  representative, queries)
    n_window = window + block_q + (0 if causal else window)
    n_q_blocks = -(-length // block_q)
    kv_row = _kv_rows(batch, kv_heads, q_heads // kv_heads, q.device)
    key_offset = (kv_row * length).repeat_interleave(n_q_blocks)
    key_ok = None if key_padding_mask is None else (~key_padding_mask)[:, None].expand(
        batch, kv_heads, length).reshape(-1)

    def layout(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos, ok = _key_layout(sel.rows(i, j), block_k=block_k, sink=min(sink, length),
                              window=window, span=block_q, causal=causal)
        ok = ok & (pos < length)
        if key_ok is not None:
            ok = ok & key_ok[key_offset[i:j, None] + pos.clamp(0, length - 1)]
        return pos, ok

    padded = n_q_blocks * block_q
    q_rows = q.to(acc)
    if padded > length:
        q_rows = F.pad(q_rows, (0, 0, 0, padded - length))
    q_rows = q_rows.reshape(-1, block_q, dim)
    bias = _window_bias(block_q, n_window, window, causal, acc, q.device)
    n_far = min(sink, length) + _n_nodes(topk, block_k) * block_k
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                  or v.requires_grad)
    # The split form is for eager inference (its loops would unroll under torch.compile); its
    # fused kernel needs equal query and value widths.
    if (key_padding_mask is None and not differentiable and dv == dim
            and not torch.compiler.is_compiling()):
        def far(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            pos, ok = _far_layout(sel.rows(i, j), block_k=block_k, sink=min(sink, length),
                                  window=window, span=block_q, causal=causal)
            return pos, ok & (pos < length)

        groups = q_heads // kv_heads
        kv_rows = [(r // q_heads) * kv_heads + (r % q_heads) // groups
                   for r in range(batch * q_heads)]
        out = _attend_split(q_rows, k, v, kv_rows, far, n_far, window, bias, scale)
    elif differentiable and fused_kernel_applies(q, v, k, differentiable=True):
        k_flat, v_flat = k.reshape(-1, dim), v.reshape(-1, dv)

        def chunks():
            return _sub_chunks(q_rows, key_offset, layout, n_far + n_window, bias, dim + dv)

        out = _SparseAttention.apply(q_rows, k_flat, v_flat, chunks, n_far + n_window, scale)
    else:
        out = _attend(q_rows, k.reshape(-1, dim), v.reshape(-1, dv), key_offset, layout,
                      n_far + n_window, bias, scale)
    return out.reshape(batch, q_heads, padded, dv)[:, :, :length].to(q.dtype)


def hip_mask(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
             key_padding_mask: torch.Tensor | None = None, topk: int = 512, block_q: int = 32,
             block_k: int = 2, query_stride: int = 2, sink: int = 16, window: int = 256,
             representative: str = "center", queries: str = "prefix") -> torch.Tensor:
    """The union mask ``(B, Hq, L, L)`` (True: query i attends to key j), built densely from
    the definitions (sink, window, selected blocks, causality, padding): O(L^2), for the
    reference, the weights and pictures."""
    batch, q_heads, length, _ = q.shape
    sel = _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
                  representative, queries)
    n_q_blocks = -(-length // block_q)
    n_k_blocks = -(-length // block_k)
    chosen = torch.zeros(sel.blocks.shape[0], n_k_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(1, torch.where(sel.valid, sel.blocks, n_k_blocks), True)
    chosen = chosen[:, :n_k_blocks].view(batch, q_heads, n_q_blocks, n_k_blocks)
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    s = (i // block_q) * block_q
    range_end = sel.range_end.view(batch, q_heads, n_q_blocks)[0, 0][i // block_q]
    selected = chosen[:, :, i // block_q, j // block_k] & (j < range_end)
    window_end = s + block_q + (0 if causal else window)
    allowed = selected | (j < sink) | ((j >= s - window) & (j < window_end))
    if causal:
        allowed = allowed & (j <= i)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def reference(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None,
              refresh=DEFAULTS["refresh"], **options):
    """Dense masked softmax over the materialised union mask :func:`hip_mask`."""
    _check_pattern(cross)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = hip_mask(q, k, causal=causal, key_padding_mask=key_padding_mask, **options)
    return masked_attention(q, k, v, allowed, scale)


def weights(q, k, *, causal=False, cross=False, scale=None, key_padding_mask=None,
            refresh=DEFAULTS["refresh"], **options):
    """HiP's attention matrix ``(B, Hq, L, L)``: zero outside the union mask."""
    _check_pattern(cross)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = hip_mask(q, k, causal=causal, key_padding_mask=key_padding_mask, **options)
    return masked_weights(q, k, allowed, scale)


@dataclass
class HipCache:
    """Decoding state: the KV cache ``(B, Hkv, capacity, D)`` (the first ``length`` positions
    are real; it is written in place and doubles when full), the last ``block_q`` queries
    ``(B, Hq, <= block_q, D)``, the position ``start`` of the last refresh and, per query head,
    the keys and values a step attends to, ``attend_keys (B, Hq, n_far + w + refresh, D)``:
    the ``n_far = sink + m b_k`` far keys gathered at the refresh, then the window
    ``[start - w, t]``, appended to at every step; ``attend_bias (B, Hq, 1, same)`` is the
    additive mask (``-inf`` on far keys that do not count). The buffers are reused across
    refreshes; ``scratch_*`` receive the far keys' gather."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    queries: torch.Tensor | None = None
    start: int = 0
    n_far: int = 0
    attend_keys: torch.Tensor | None = None
    attend_values: torch.Tensor | None = None
    attend_bias: torch.Tensor | None = None
    scratch_keys: torch.Tensor | None = None
    scratch_values: torch.Tensor | None = None

    UNBATCHED: ClassVar[tuple[str, ...]] = ("scratch_keys", "scratch_values")  # flat buffers


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, **options) -> HipCache:
    """An empty cache (with room for 256 tokens before it first doubles)."""
    return HipCache(torch.zeros(batch, kv_heads, 256, head_dim, dtype=dtype, device=device),
                    torch.zeros(batch, kv_heads, 256, value_dim, dtype=dtype, device=device))


def _append(state: HipCache, k_t: torch.Tensor, v_t: torch.Tensor) -> None:
    t = state.length
    if t == state.keys.shape[2]:
        grow = state.keys.shape[2]
        state.keys = torch.cat((state.keys, torch.zeros_like(state.keys[:, :, :grow])), dim=2)
        state.values = torch.cat((state.values, torch.zeros_like(state.values[:, :, :grow])),
                                 dim=2)
    state.keys[:, :, t] = k_t[:, :, 0]
    state.values[:, :, t] = v_t[:, :, 0]
    state.length = t + 1


def _search_at(state: HipCache, t: int, kv_row: torch.Tensor, *, topk, block_q, block_k,
               query_stride, window, representative) -> _Blocks:
    """The tree search for a block starting at the current position ``t``."""
    rows, dim = kv_row.shape[0], state.keys.shape[-1]
    acc = accumulation_dtype(state.keys.dtype)
    back = torch.arange(_n_representatives(block_q, query_stride), device=kv_row.device)
    back = back * query_stride
    history = state.queries.reshape(rows, -1, dim).to(acc)
    q_rep = history[:, (history.shape[1] - 1 - back).clamp(min=0)]
    rep_ok = (back <= min(t, history.shape[1] - 1)).expand(rows, -1)
    end = max(0, t - window)
    range_end = torch.full((rows,), end, dtype=torch.long, device=kv_row.device)
    start = torch.full_like(range_end, t)
    blocks, valid = search_blocks(
        q_rep, rep_ok, state.keys.reshape(-1, dim), kv_row * state.keys.shape[2],
        range_end, end, n_nodes=_n_nodes(topk, block_k), block_k=block_k,
        representative=representative, min_range=end, row_length=state.keys.shape[2],
        aligned_ranges=end % block_k == 0)
    return _Blocks(start, range_end, blocks, valid)


def _load(state: HipCache, sel: _Blocks, kv_row: torch.Tensor, t: int, *, block_k: int,
          sink: int, window: int, refresh: int, acc: torch.dtype) -> None:
    """At a refresh: gather the far keys and values (sink and selected blocks, all
    ``< t - w``) of every query head into the attended buffers, set their mask, and copy the
    window ``[t - w, t]`` after them."""
    batch, kv_heads, capacity, dim = state.keys.shape
    q_heads, dv = kv_row.shape[0] // batch, state.values.shape[-1]
    pos, ok = _far_layout(sel, block_k=block_k, sink=sink, window=window, span=refresh,
                          causal=True)
    n_far = pos.shape[1]
    width = n_far + window + refresh
    if state.attend_keys is None or state.attend_keys.shape[2] != width:
        device = state.keys.device
        state.attend_keys = torch.empty(batch, q_heads, width, dim, dtype=acc, device=device)
        state.attend_values = torch.empty(batch, q_heads, width, dv, dtype=acc, device=device)
        state.attend_bias = torch.zeros(batch, q_heads, 1, width, dtype=acc, device=device)
        state.scratch_keys = torch.empty(kv_row.shape[0] * n_far, dim, dtype=state.keys.dtype,
                                         device=device)
        state.scratch_values = torch.empty(kv_row.shape[0] * n_far, dv,
                                           dtype=state.values.dtype, device=device)
    index = ((kv_row * capacity)[:, None] + torch.where(ok, pos, 0)).view(-1)
    torch.index_select(state.keys.view(-1, dim), 0, index, out=state.scratch_keys)
    torch.index_select(state.values.view(-1, dv), 0, index, out=state.scratch_values)
    state.attend_keys[:, :, :n_far] = state.scratch_keys.view(batch, q_heads, n_far, dim)
    state.attend_values[:, :, :n_far] = state.scratch_values.view(batch, q_heads, n_far, dv)
    state.attend_bias[:, :, 0, :n_far] = torch.where(ok, 0.0, float("-inf")).view(
        batch, q_heads, n_far)
    lo, groups = max(0, t - window), q_heads // kv_heads
    state.attend_keys.view(batch, kv_heads, groups, width, dim)[
        :, :, :, n_far:n_far + t + 1 - lo] = state.keys[:, :, None, lo:t + 1]
    state.attend_values.view(batch, kv_heads, groups, width, dv)[
        :, :, :, n_far:n_far + t + 1 - lo] = state.values[:, :, None, lo:t + 1]
    state.start, state.n_far = t, n_far


def step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: HipCache, *,
         scale: float | None = None, topk: int = 512, block_q: int = 32, block_k: int = 2,
         query_stride: int = 2, sink: int = 16, window: int = 256,
         representative: str = "center", refresh: int | None = None,
         queries: str = "prefix") -> tuple[torch.Tensor, HipCache]:
    """One causal decoding step: append ``(k_t, v_t)`` (``(B, Hkv, 1, D)``), re-run the search
    if ``t % refresh == 0`` (or the state has no selection yet), attend ``q_t (B, Hq, 1, D)``
    to sink, selected blocks and window ``[s - w, t]`` with one fused softmax over the state's
    buffers. Returns ``((B, Hq, 1, Dv), state)``; the state is updated in place. ``queries``
    is a prefill option: a step has no later query, so it always searches as ``"prefix"``."""
    batch, q_heads, _, dim = q_t.shape
    kv_heads = k_t.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q_t.dtype)
    refresh = block_q if refresh is None else refresh
    t = state.length
    _append(state, k_t, v_t)
    queries = q_t if state.queries is None else torch.cat((state.queries, q_t), dim=2)
    state.queries = queries[:, :, -block_q:]
    if t % refresh == 0 or state.attend_keys is None:
        kv_row = _kv_rows(batch, kv_heads, q_heads // kv_heads, q_t.device)
        sel = _search_at(state, t, kv_row, topk=topk, block_q=block_q, block_k=block_k,
                         query_stride=query_stride, window=window,
                         representative=representative)
        _load(state, sel, kv_row, t, block_k=block_k, sink=sink, window=window,
              refresh=refresh, acc=acc)
    else:
        # The window grows by the new token (every key in it is <= t: no causal mask).
        col = state.n_far + t - max(0, state.start - window)
        groups = q_heads // kv_heads
        width = state.attend_keys.shape[2]
        state.attend_keys.view(batch, kv_heads, groups, width, dim)[:, :, :, col] = k_t
        state.attend_values.view(batch, kv_heads, groups, width, -1)[:, :, :, col] = v_t
    n = state.n_far + t + 1 - max(0, state.start - window)
    out = F.scaled_dot_product_attention(
        q_t.to(acc), state.attend_keys[:, :, :n], state.attend_values[:, :, :n],
        attn_mask=state.attend_bias[..., :n], scale=scale)
    return out.to(q_t.dtype), state


def prefill_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None, block_q: int = 32, refresh: int | None = None,
                  **options) -> HipCache:
    """The state after a prefill of ``T`` tokens, what :func:`step` holds after them: the
    keys and values up to the last refresh ``t_r`` (the largest multiple of ``refresh`` below
    ``T``) copied into the cache with the ``block_q`` queries before it, then :func:`step`
    from ``t_r`` on (the search at ``t_r`` and at most ``refresh - 1`` appends), instead of
    ``T`` steps."""
    length = k.shape[2]
    every = block_q if refresh is None else refresh
    last = (length - 1) // every * every
    capacity = 256  # init_state's, doubled as _append doubles it
    while capacity < length:
        capacity *= 2
    state = HipCache(F.pad(k[:, :, :last], (0, 0, 0, capacity - last)),
                     F.pad(v[:, :, :last], (0, 0, 0, capacity - last)), length=last,
                     queries=q[:, :, max(0, last - block_q):last] if last else None)
    for t in range(last, length):
        _, state = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                        scale=scale, block_q=block_q, refresh=refresh, **options)
    return state


MECHANISM = Mechanism(
    name="hip",
    paper="hip",
    summary="hierarchical top-k block pruning (tree search) + sink + window, O(L log L)",
    fn=hip_attention,
    reference=reference,
    weights=weights,
    patterns=SELF_PATTERNS,
    exact=False,
    options=(
        Option("topk", int, DEFAULTS["topk"],
               "k: keys chosen by the tree search, as topk // block_k key blocks", low=1),
        Option("block_q", int, DEFAULTS["block_q"], "b_q: queries sharing one mask", low=1),
        Option("block_k", int, DEFAULTS["block_k"], "b_k: keys per block of the search", low=1),
        Option("query_stride", int, DEFAULTS["query_stride"],
               "b_sq: stride of the representative queries of a query block", low=1),
        Option("sink", int, DEFAULTS["sink"], "first keys every query attends to", low=0),
        Option("window", int, DEFAULTS["window"],
               "keys before the query block (non-causal: also after) always attended", low=0),
        Option("representative", str, DEFAULTS["representative"],
               "key block that scores a branch: its centre or its first block",
               choices=REPRESENTATIVES),
        Option("refresh", int, DEFAULTS["refresh"],
               "r_m: decoding re-runs the search every refresh steps; None: block_q, so that "
               "decoding equals the prefill (the paper's 8 approximates it)", low=1,
               nullable=True),
        Option("queries", str, DEFAULTS["queries"],
               "causal prefill: 'prefix' scores a block with the queries before it, keys < s - w "
               "(no output depends on a later query); 'block' (the paper's) with its own "
               "queries, keys < s + b_q - w; decoding always 'prefix'",
               choices=QUERY_SELECTIONS),
    ),
    init_state=init_state,
    step=step,
    prefill_state=prefill_state,
    test_options={"topk": 8, "block_q": 4, "block_k": 2, "sink": 2, "window": 6, "refresh": 4},
)
