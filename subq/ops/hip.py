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

cut at ``j <= i`` when causal, padding keys removed, each key counted once.

Representative queries and leakage. In the paper every query of a block (stride ``b_sq``)
scores the branches, so in causal attention query ``i`` would see a mask chosen by queries
after ``i``. Here the representatives of block ``n`` are ``q_{s - r b_sq}``, ``r = 0 ...
ceil(b_q / b_sq) - 1`` (the ``b_q`` queries ending at the block's first query ``s``), and the
search sees keys ``< s - w`` only, so the mask of query ``i`` depends on nothing after
``s <= i``: the output is prefix-consistent. Non-causal blocks use their own queries
``q_{s + r b_sq}``.

Cost: the search is O((L / b_q) (topk / b_k) b_k (b_q / b_sq) D log(L / topk)), query blocks
grouped by their number of iterations so that none runs a wasted one; the attention gathers
``sink + topk + w + b_q`` keys per block and runs one fused SDPA call per cache-sized chunk of
blocks (an additive mask removes duplicates, padding and the causal cut): O(L (topk + w + sink)
D) time, O(L D) memory beyond bounded chunks, never an L x L tensor. Patterns: causal self,
noncausal self.

Decoding keeps a KV cache (growing by doubling, written in place) and the last ``b_q`` queries;
every ``refresh`` steps (at ``t = 0, r_m, 2 r_m, ...``) it re-runs the search for the step's
query as a block starting at ``s = t`` and reuses the mask until the next refresh, the window
``[s - w, t]`` covering the new tokens. With ``refresh == block_q`` stepping equals the causal
prefill exactly. A step costs O((sink + topk + w + refresh) D), plus the search every
``refresh`` steps: O(topk D (b_q / b_sq) log(t / topk)), never O(t^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import SELF_PATTERNS, Mechanism, Option
from .common import accumulation_dtype, new_empty
from .hip_mask import REPRESENTATIVES, search_blocks, search_iterations
from .reference import masked_attention, masked_weights

DEFAULTS = dict(topk=512, block_q=32, block_k=2, query_stride=2, sink=16, window=256,
                representative="center", refresh=8)
# The attention builds key layouts for chunks of about _CHUNK_KEYS (row, key) pairs and gathers
# keys and values for sub-chunks of about _GATHER_ELEMENTS elements (kept in cache).
_CHUNK_KEYS = 1 << 17
_GATHER_ELEMENTS = 1 << 19


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


def _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
            representative) -> _Blocks:
    """Run the tree search for every query block of a prefill (rows ``(b, h, n)``)."""
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
    # Built from Python ints: inductor's index propagation mis-handles clamp + floor division
    # of arange-derived search ranges (torch 2.13, "vr must not be None").
    ends = [max(0, n * block_q - window) if causal else length for n in range(n_q_blocks)]
    blocks, valid = [], []
    for n0, n1 in _search_groups(ends, n_nodes, block_k):
        start = torch.arange(n0, n1, device=device) * block_q
        rep_pos = start[:, None] - offsets if causal else start[:, None] + offsets
        rep_ok = ((rep_pos >= 0) & (rep_pos < length)).repeat(heads, 1)
        q_rep = q_flat[:, rep_pos.clamp(0, length - 1)].reshape(-1, offsets.shape[0], dim)
        group_end = torch.tensor(ends[n0:n1], device=device).repeat(heads)
        found, ok = search_blocks(
            q_rep.to(acc), rep_ok, keys, (kv_row * length).repeat_interleave(n1 - n0),
            group_end, max(ends[n0:n1]), n_nodes=n_nodes, block_k=block_k,
            representative=representative, key_ok=key_ok)
        blocks.append(found.view(heads, n1 - n0, -1))
        valid.append(ok.view(heads, n1 - n0, -1))
    start = (torch.arange(n_q_blocks, device=device) * block_q).repeat(heads)
    range_end = torch.tensor(ends, device=device).repeat(heads)
    return _Blocks(start, range_end, torch.cat(blocks, dim=1).flatten(0, 1),
                   torch.cat(valid, dim=1).flatten(0, 1))


def _key_layout(sel: _Blocks, *, block_k: int, sink: int, window: int, span: int, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions ``(N, K)`` each row attends to and which of them count: sink (``j <
    sink`` outside the window), selected blocks (``sink <= j < range_end``, outside the
    window), then the window, ``w + span`` keys from ``s - w`` (``+ w`` when non-causal), last.
    Each key counts once (duplicates are masked, not removed); causality is left to the window
    segment (every other counted key is ``< s - w``)."""
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
    win_pos = s - window + torch.arange(window + after, device=device)
    pos = torch.cat((sink_pos, sel_pos, win_pos), dim=1)
    ok = torch.cat((sink_ok, sel_ok, win_pos >= 0), dim=1)
    return pos, ok


def _attend(q_rows, k_flat, v_flat, key_offset, layout, n_keys, window_bias, scale):
    """Block-sparse softmax: row ``n`` (queries ``q_rows[n] (span, D)``) attends to the keys
    at ``pos[n] (n_keys,)`` where ``ok[n]``, ``pos, ok = layout(i, j)`` for rows ``i:j``;
    ``window_bias (span, W)`` (0 or -inf) adds causality to the last ``W`` keys. The layout is
    built for chunks of rows; the keys are gathered, and attended by one fused SDPA call with
    an additive mask, for sub-chunks small enough to stay in cache. A query that sees no key
    outputs 0."""
    rows, span, dim = q_rows.shape
    dv = v_flat.shape[-1]
    sub = max(1, _GATHER_ELEMENTS // (n_keys * (dim + dv + span)))
    chunk = sub * max(1, _CHUNK_KEYS // (sub * n_keys))
    causal_bias = torch.zeros(span, n_keys, dtype=q_rows.dtype, device=q_rows.device)
    causal_bias[:, n_keys - window_bias.shape[-1]:] = window_bias
    out = new_empty(rows, span, dv, like=q_rows)
    for i in range(0, rows, chunk):
        pos, ok = layout(i, i + chunk)
        flat = key_offset[i:i + pos.shape[0], None] + torch.where(ok, pos, 0)
        key_bias = torch.zeros(ok.shape, dtype=q_rows.dtype, device=ok.device)
        key_bias = key_bias.masked_fill(~ok, float("-inf"))[:, None, None, :]
        for a in range(0, pos.shape[0], sub):
            index = flat[a:a + sub].reshape(-1)
            n = index.shape[0] // n_keys
            keys = k_flat.index_select(0, index).view(n, 1, n_keys, dim).to(q_rows.dtype)
            values = v_flat.index_select(0, index).view(n, 1, n_keys, dv).to(q_rows.dtype)
            out[i + a:i + a + n] = F.scaled_dot_product_attention(
                q_rows[i + a:i + a + n, None], keys, values,
                attn_mask=key_bias[a:a + n] + causal_bias, scale=scale)[:, 0]
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
                  window: int = 256, representative: str = "center", refresh: int = 8
                  ) -> torch.Tensor:
    """HiP attention, block-sparse over the tree search's selection (see the module docstring).

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``.
    Options (paper defaults): ``topk=512`` keys chosen by the search (``topk // block_k``
    blocks), ``block_q=32``, ``block_k=2``, ``query_stride=2`` (b_sq), ``sink=16``,
    ``window=256``, ``representative="center"`` (or ``"first"``), ``refresh=8`` (decoding only).
    """
    _check_pattern(cross)
    batch, q_heads, length, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    sel = _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
                  representative)
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
    n_keys = min(sink, length) + _n_nodes(topk, block_k) * block_k + n_window
    out = _attend(q_rows, k.reshape(-1, dim), v.reshape(-1, dv), key_offset, layout, n_keys,
                  bias, scale)
    return out.reshape(batch, q_heads, padded, dv)[:, :, :length].to(q.dtype)


def hip_mask(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
             key_padding_mask: torch.Tensor | None = None, topk: int = 512, block_q: int = 32,
             block_k: int = 2, query_stride: int = 2, sink: int = 16, window: int = 256,
             representative: str = "center") -> torch.Tensor:
    """The union mask ``(B, Hq, L, L)`` (True: query i attends to key j), built densely from
    the definitions (sink, window, selected blocks, causality, padding): O(L^2), for the
    reference, the weights and pictures."""
    batch, q_heads, length, _ = q.shape
    sel = _select(q, k, causal, key_padding_mask, topk, block_q, block_k, query_stride, window,
                  representative)
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
    ``(B, Hq, <= block_q, D)``, and the mask chosen at the last refresh (position ``start``)."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    queries: torch.Tensor | None = None
    selection: _Blocks | None = None


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


def _refresh(state: HipCache, t: int, kv_row: torch.Tensor, *, topk, block_q, block_k,
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
        representative=representative)
    return _Blocks(start, range_end, blocks, valid)


def step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: HipCache, *,
         scale: float | None = None, topk: int = 512, block_q: int = 32, block_k: int = 2,
         query_stride: int = 2, sink: int = 16, window: int = 256,
         representative: str = "center", refresh: int = 8) -> tuple[torch.Tensor, HipCache]:
    """One causal decoding step: append ``(k_t, v_t)`` (``(B, Hkv, 1, D)``), re-run the search
    if ``t % refresh == 0``, attend ``q_t (B, Hq, 1, D)`` to sink, selected blocks and window
    ``[s - w, t]``. Returns ``((B, Hq, 1, Dv), state)``; the state is updated in place."""
    batch, q_heads, _, dim = q_t.shape
    kv_heads = k_t.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    t = state.length
    _append(state, k_t, v_t)
    queries = q_t if state.queries is None else torch.cat((state.queries, q_t), dim=2)
    state.queries = queries[:, :, -block_q:]
    kv_row = _kv_rows(batch, kv_heads, q_heads // kv_heads, q_t.device)
    if t % refresh == 0:
        state.selection = _refresh(state, t, kv_row, topk=topk, block_q=block_q,
                                   block_k=block_k, query_stride=query_stride, window=window,
                                   representative=representative)
    def layout(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos, ok = _key_layout(state.selection.rows(i, j), block_k=block_k, sink=sink,
                              window=window, span=refresh, causal=True)
        return pos, ok & (pos <= t)

    acc = accumulation_dtype(q_t.dtype)
    capacity, dv = state.keys.shape[2], state.values.shape[-1]
    bias = _window_bias(1, window + refresh, window + t - int(state.selection.start[0]), True,
                        acc, q_t.device)
    out = _attend(q_t.to(acc).reshape(-1, 1, dim), state.keys.reshape(-1, dim),
                  state.values.reshape(-1, dv), kv_row * capacity, layout,
                  sink + _n_nodes(topk, block_k) * block_k + window + refresh, bias, scale)
    return out.reshape(batch, q_heads, 1, dv).to(q_t.dtype), state


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
               "r_m: decoding re-runs the search every refresh steps", low=1),
    ),
    init_state=init_state,
    step=step,
    test_options={"topk": 8, "block_q": 4, "block_k": 2, "sink": 2, "window": 6, "refresh": 4},
)
