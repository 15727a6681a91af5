"""HAX: context-dependent sparse attention, sign-bit LSH buckets plus learned key selection
(``[hax]``, Zhan, Zhao, Zhu, Tang, NeurIPS 2025, Sec. 4 and Eq. 6-7).

One masked softmax over a sparse causal set ``S_i`` of at most ``k_lsh + k_ks`` keys:

    out_i = sum_{j in S_i} softmax_j(scale * q_i . k_j) v_j,     S_i = S_LSH(i) u S_KS(i)

* sign-bit LSH: ``H ~ N(0, 1)^{D x h}``, ``code(x) = sum_b [x~ . H_b > 0] 2^b`` (``2^h``
  buckets; ``hash="argmax"``: ``code(x) = argmax_b x~ . H_b``, ``h`` buckets). ``S_LSH(i)`` =
  the ``k_lsh`` most recent keys ``j <= i`` with ``code(k~_j) == code(q~_i)``.
* key selection: per-key scores ``s_j`` (the ``key_scores`` option; by default the key
  norms ``|k_j|``, so the op runs without the learned scoring MLP of :mod:`subq.nn.hax`).
  ``S_KS(i)`` = the top-``k_ks`` keys of ``{0..i}`` by score (ties: the earlier key wins).
* the paper's context-independent baselines (``arch``): ``window`` (``0 <= i-j < window``),
  ``sink`` (``j < sinks``), ``dilated`` (``j % dilation == dilation-1``), ``window+dilated``,
  and ``full`` (dense causal).

``x~`` is the centred vector: ``center="prefix_mean"`` (default) subtracts the mean of the
queries (keys) at positions ``<= i``; ``"none"`` nothing; ``"sequence_mean"`` the mean over the
whole sequence, as the released code does. That last one lets bucket ``i`` depend on later
tokens: it is NOT causal (no prefix consistency, no decoding) and exists to reproduce the code.
Per-token normalisation does not change a sign or an argmax, so it is not an option.

Projections ``H``: the ``projections`` tensor ``(D, h)`` if given, else drawn from
``generator`` (a fresh draw per call: the training regime), else from ``torch.Generator``
seeded with ``seed`` (the same draw every call: the evaluation regime). Fast path,
reference, weights and decoding see the same ``H`` for the same options.

Fast path (never an L x L tensor): keys are sorted by bucket (stable, so by position within a
bucket), each query finds its bucket's segment and the end of its causal prefix by binary
search, giving its ``k_lsh`` most recent bucket keys, O(L log L); key selection ranks the keys
once (stable sort) and takes the running top-k by a doubling scan over blocks of ``C`` keys
plus one top-k per query over the ``k_ks + C`` candidates of its block (see
:func:`key_selection_ranks`); the union drops LSH slots whose key is selected (a rank test).
The LSH keys are gathered per query, the selection candidates are shared per block and scored
by one matrix product per block: O(L (k_lsh + k_ks + C) D). Decoding keeps, per (batch,
head), the keys that are still among the ``k_lsh`` most recent of their bucket (a per-bucket
deque) and the running top-``k_ks`` by score (a key's score depends on its prefix only, so
the set evolves by insert/evict).

Shapes ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)``, ``key_scores
(B, Hkv, L)``. Pattern: causal self. Not exact. ``key_padding_mask``: not supported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import Mechanism, Option, Pattern
from . import masks
from .common import accumulation_dtype, repeat_kv
from .dense import dense_attention
from .hax_sparse import SparseSlots, sparse_softmax
from .reference import masked_attention, masked_weights

ARCHS = ("hax", "lsh", "ks", "window", "sink", "dilated", "window+dilated", "full")
COMPONENTS = {"hax": ("lsh", "ks"), "lsh": ("lsh",), "ks": ("ks",), "window": ("window",),
              "sink": ("sink",), "dilated": ("dilated",),
              "window+dilated": ("window", "dilated"), "full": ("full",)}
DEFAULTS = dict(arch="hax", k_lsh=32, k_ks=32, window=32, sinks=32, dilation=64, num_hash=8,
                hash="sign", center="prefix_mean", seed=0, generator=None, projections=None,
                key_scores=None)
_MAX_SIGN_BITS = 62


# ---------------------------------------------------------------- shared pieces (one place)

def lsh_projections(dim: int, *, num_hash: int, seed: int, generator: torch.Generator | None,
                    projections: torch.Tensor | None,
                    device: torch.device | str | None) -> torch.Tensor:
    """``H (D, h)`` in float64 on ``device``: the given tensor, else a draw from ``generator``,
    else a draw from a generator seeded with ``seed``."""
    if projections is not None:
        if projections.dim() != 2 or projections.shape[0] != dim:
            raise ValueError(f"option 'projections' must have shape (D={dim}, h), "
                             f"got {tuple(projections.shape)}")
        return projections.to(device=device or projections.device, dtype=torch.float64)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    draw = torch.randn(dim, num_hash, generator=generator, dtype=torch.float64,
                       device=generator.device)
    return draw if device is None else draw.to(device)


def center(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``x (B, H, L, D)`` minus its prefix mean / sequence mean / nothing."""
    if mode == "none":
        return x
    if mode == "sequence_mean":
        return x - x.mean(dim=2, keepdim=True)
    count = torch.arange(1, x.shape[2] + 1, device=x.device, dtype=x.dtype)[:, None]
    return x - x.cumsum(dim=2) / count


def bucket_codes(x: torch.Tensor, projections: torch.Tensor, hash: str) -> torch.Tensor:
    """int64 bucket of every (already centred) vector of ``x (..., D)``: sign bits of
    ``x . H`` read as a binary number, or the argmax over the ``h`` projections."""
    proj = x @ projections.to(x.dtype)
    if hash == "argmax":
        return proj.argmax(dim=-1)
    h = proj.shape[-1]
    if h > _MAX_SIGN_BITS:
        raise ValueError(f"option 'num_hash' must be <= {_MAX_SIGN_BITS} for hash='sign' "
                         f"(the bucket is an int64 of h bits), got {h}")
    bits = torch.ones(h, dtype=torch.int64, device=x.device).cumsum(0).sub(1)
    return ((proj > 0).long() << bits).sum(dim=-1)


def key_scores_or_norms(k: torch.Tensor, key_scores: torch.Tensor | None) -> torch.Tensor:
    """Scores ``(B, Hkv, L)`` in the accumulation dtype: the given ones or the key norms."""
    acc = accumulation_dtype(k.dtype)
    if key_scores is None:
        return k.detach().to(acc).norm(dim=-1)
    if tuple(key_scores.shape) != tuple(k.shape[:3]):
        raise ValueError(f"option 'key_scores' must have shape (B, Hkv, L)={tuple(k.shape[:3])},"
                         f" got {tuple(key_scores.shape)}")
    return key_scores.detach().to(device=k.device, dtype=acc)


@dataclass(frozen=True)
class _Prepared:
    """What every form computes the same way: bucket codes and key scores."""

    q_codes: torch.Tensor | None   # (B, Hq, L)
    k_codes: torch.Tensor | None   # (B, Hkv, L)
    scores: torch.Tensor | None    # (B, Hkv, L)


def _prepare(q, k, options) -> _Prepared:
    parts = COMPONENTS[options["arch"]]
    q_codes = k_codes = scores = None
    if "lsh" in parts:
        acc = accumulation_dtype(q.dtype)
        proj = lsh_projections(q.shape[-1], num_hash=options["num_hash"], seed=options["seed"],
                               generator=options["generator"],
                               projections=options["projections"], device=q.device)
        q_codes = bucket_codes(center(q.detach().to(acc), options["center"]), proj,
                               options["hash"])
        k_codes = bucket_codes(center(k.detach().to(acc), options["center"]), proj,
                               options["hash"])
    if "ks" in parts:
        scores = key_scores_or_norms(k, options["key_scores"])
    return _Prepared(q_codes, k_codes, scores)


def _options(given: dict) -> dict:
    return {**DEFAULTS, **given}


# ---------------------------------------------------------------- dense (reference) masks

def lsh_mask(q_codes: torch.Tensor, k_codes: torch.Tensor, k_lsh: int) -> torch.Tensor:
    """Dense ``(B, Hq, L, L)``: ``j <= i``, same bucket, and at most ``k_lsh`` same-bucket
    keys in ``[j, i]`` (so ``j`` is one of the ``k_lsh`` most recent of its bucket)."""
    groups = q_codes.shape[1] // k_codes.shape[1]
    k_codes = k_codes.repeat_interleave(groups, dim=1)
    length = q_codes.shape[2]
    same = (q_codes[..., :, None] == k_codes[..., None, :]) & masks.causal_mask(
        length, length, q_codes.device)
    newer_or_self = same.flip(-1).cumsum(-1).flip(-1)
    return same & (newer_or_self <= k_lsh)


def key_selection_mask(scores: torch.Tensor, k_ks: int) -> torch.Tensor:
    """Dense ``(B, Hkv, L, L)``: ``j <= i`` and fewer than ``k_ks`` keys ``j' <= i`` rank
    above ``j`` (higher score, or equal score and earlier)."""
    length = scores.shape[-1]
    idx = torch.arange(length, device=scores.device)
    better = (scores[..., :, None] > scores[..., None, :]) | (
        (scores[..., :, None] == scores[..., None, :]) & (idx[:, None] < idx[None, :]))
    rank = better.long().cumsum(dim=-2)  # rank[i, j] = #{j' <= i better than j}
    return masks.causal_mask(length, length, scores.device) & (rank < k_ks)


def hax_mask(q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
    """The dense ``(B, Hq, L, L)`` union mask ``S`` of the chosen ``arch``."""
    options = _options(options)
    prep = _prepare(q, k, options)
    b, hq, length = q.shape[:3]
    groups = hq // k.shape[1]
    causal = masks.causal_mask(length, length, q.device)
    i, j = masks.positions(length, length, q.device)
    allowed = torch.zeros(b, hq, length, length, dtype=torch.bool, device=q.device)
    for part in COMPONENTS[options["arch"]]:
        if part == "lsh":
            allowed |= lsh_mask(prep.q_codes, prep.k_codes, options["k_lsh"])
        elif part == "ks":
            allowed |= key_selection_mask(prep.scores, options["k_ks"]).repeat_interleave(
                groups, dim=1)
        elif part == "window":
            allowed |= causal & (i - j < options["window"])
        elif part == "sink":
            allowed |= causal & (j < options["sinks"])
        elif part == "dilated":
            allowed |= causal & (j % options["dilation"] == options["dilation"] - 1)
        else:
            allowed |= causal
    return allowed


# ---------------------------------------------------------------- fast index sets

def lsh_indices(q_codes: torch.Tensor, k_codes: torch.Tensor, k_lsh: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, valid)`` each ``(B, Hq, L, k_lsh)``: the ``k_lsh`` most recent keys ``j <= i``
    of query ``i``'s bucket, by a stable sort of the keys by bucket and binary search."""
    b, hq, length = q_codes.shape
    hkv = k_codes.shape[1]
    order = torch.sort(k_codes, dim=-1, stable=True).indices        # by bucket, then position
    sorted_codes = k_codes.gather(-1, order)
    new_segment = torch.ones_like(sorted_codes, dtype=torch.bool)
    new_segment[..., 1:] = sorted_codes[..., 1:] != sorted_codes[..., :-1]
    segment = new_segment.long().cumsum(-1) - 1                    # dense bucket rank < L
    combined = segment * (length + 1) + order                      # increasing along the sort

    codes = q_codes.reshape(b, hkv, -1)                            # (B, Hkv, G * L)
    pos = torch.arange(length, device=q_codes.device).repeat(hq // hkv)
    lo = torch.searchsorted(sorted_codes, codes)
    hi = torch.searchsorted(sorted_codes, codes, right=True)
    found = hi > lo
    seg_q = segment.gather(-1, lo.clamp(max=length - 1))
    end = torch.searchsorted(combined, seg_q * (length + 1) + pos, right=True)
    slot = end[..., None] - k_lsh + torch.arange(k_lsh, device=q_codes.device)
    valid = found[..., None] & (slot >= lo[..., None]) & (slot < end[..., None])
    idx = order.gather(-1, slot.clamp(0, length - 1).flatten(-2)).view(slot.shape)
    return idx.view(b, hq, length, k_lsh), valid.view(b, hq, length, k_lsh)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, Hkv, L)`` at ``idx (B, Hq, ...)``: query head ``h`` reads kv head ``h // G``."""
    b, hkv = x.shape[:2]
    return x.gather(-1, idx.reshape(b, hkv, -1)).view(idx.shape)


def _smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest entries of each row of ``x``, ascending."""
    return x.topk(k, dim=-1, largest=False, sorted=True).values


@dataclass(frozen=True)
class Selection:
    """The running top-k of key selection in rank space (see :func:`key_selection_ranks`).

    ``order (B, H, L)``: keys by (score descending, position ascending); ``rank``: its inverse
    (unique integers, so no ties remain). Queries go in ``n`` blocks of ``C``; for query ``t`` of
    block ``m``, ``candidates (B, H, n, C, k + C)`` holds the ranks of the top-k of blocks
    ``< m`` then those of block ``m``'s own keys (``L`` for keys after ``t`` and empty slots);
    ``chosen (B, H, n, C, k)`` its ``k`` smallest, ascending."""

    order: torch.Tensor
    rank: torch.Tensor
    candidates: torch.Tensor
    chosen: torch.Tensor

    @property
    def selected(self) -> torch.Tensor:
        """``(B, H, L, k)`` ranks of the top-k of ``{0..i}``, ascending, ``L`` in empty slots."""
        return self.chosen.flatten(2, 3)[:, :, :self.rank.shape[-1]]

    @property
    def threshold(self) -> torch.Tensor:
        """``(B, H, L, 1)``: key ``j <= i`` is selected iff ``rank[j] <= threshold[i]``."""
        return self.selected[..., -1:]


def key_selection_ranks(scores: torch.Tensor, k_ks: int) -> Selection:
    """The running top-``k_ks`` of every prefix, O(L (k + C) log L) without a loop over L.

    Keys are ranked once by a stable sort. In blocks of ``C = max(k_ks, 16)`` keys the top-k
    of every block prefix comes from a doubling scan (``ceil(log2(L / C))`` merges of two
    top-k lists: merging is associative), and query ``i`` takes the k smallest ranks among
    that of the blocks before its own and its own block's keys ``<= i``.
    """
    b, h, length = scores.shape
    dev = scores.device
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.zeros_like(order).scatter(
        -1, order, torch.arange(length, device=dev).expand_as(order))
    size = max(k_ks, 16)
    n = -(-length // size)
    blocks = F.pad(rank, (0, n * size - length), value=length).view(b, h, n, size)
    top = _smallest(blocks, k_ks)                                  # (B, H, n, k)
    shift = 1
    while shift < n:  # top[m] <- the k smallest of blocks 0..m
        earlier = F.pad(top[..., :-shift, :], (0, 0, shift, 0), value=length)
        top = _smallest(torch.cat([top, earlier], dim=-1), k_ks)
        shift *= 2
    before = F.pad(top[..., :-1, :], (0, 0, 1, 0), value=length)  # blocks < m
    seen = torch.ones(size, size, dtype=torch.bool, device=dev).tril()
    own = torch.where(seen, blocks[..., None, :], length)         # (B, H, n, C, C)
    candidates = torch.cat([before[..., None, :].expand(b, h, n, size, k_ks), own], dim=-1)
    return Selection(order, rank, candidates, _smallest(candidates, k_ks))


def key_selection_indices(scores: torch.Tensor, k_ks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, valid)`` each ``(B, Hkv, L, k_ks)``: the running top-``k_ks`` of the prefix
    ``{0..i}`` by (score descending, position ascending), from :func:`key_selection_ranks`."""
    return _selected_slots(key_selection_ranks(scores, k_ks))


def _selected_slots(selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    selected, length = selection.selected, selection.rank.shape[-1]
    return _take(selection.order, selected.clamp(max=max(length - 1, 0))), selected < length


def _positional_indices(length: int, part: str, options: dict, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, valid)`` each ``(L, n)`` for the window / sink / dilated baselines."""
    i = torch.arange(length, device=device)[:, None]
    if part == "window":
        idx = i - torch.arange(min(options["window"], length), device=device)
    elif part == "sink":
        idx = torch.arange(min(options["sinks"], length), device=device).expand(length, -1)
    else:
        dil = options["dilation"]
        idx = (torch.arange(length // dil, device=device) * dil + dil - 1).expand(length, -1)
    valid = (idx >= 0) & (idx <= i)
    return idx.clamp(min=0), valid


def _selected_member(rank: torch.Tensor, threshold: torch.Tensor, j: torch.Tensor
                     ) -> torch.Tensor:
    """Whether causal key ``j (B, Hq, L, n)`` is in the running top-k: its rank is at most
    the largest selected rank of its row (``L`` when fewer than k keys exist, i.e. all)."""
    return _take(rank, j) <= threshold


def _positional_member(part: str, options: dict, query: torch.Tensor,
                       j: torch.Tensor) -> torch.Tensor:
    """Whether key ``j (..., L, n)`` (causal for its query ``query (L, 1)``) is in the
    window / sink / dilated pattern."""
    if part == "window":
        return query - j < options["window"]
    if part == "sink":
        return j < options["sinks"]
    return j % options["dilation"] == options["dilation"] - 1


def _slot_sets(q: torch.Tensor, k: torch.Tensor, options: dict, prep: _Prepared,
               selection: Selection | None, with_ks: bool = True
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(idx, valid)`` each ``(B, Hq, L, n)`` per component of the union (``ks`` left out
    unless ``with_ks``). A slot is dropped when its key belongs to a later component, so the
    union holds each key once (a membership test, no sort): ``lsh`` (first in ``hax``) against
    the selection threshold of ``ks``, ``window`` against ``dilated``."""
    b, hq, length = q.shape[:3]
    groups = hq // k.shape[1]
    query = torch.arange(length, device=q.device)[:, None]
    sets, members = [], []
    for part in COMPONENTS[options["arch"]]:
        if part == "lsh":
            sets.append(lsh_indices(prep.q_codes, prep.k_codes, options["k_lsh"]))
            members.append(None)  # never tested: lsh comes first in every union
        elif part == "ks":
            if with_ks:
                idx, ok = _selected_slots(selection)
                sets.append((repeat_kv(idx, groups), repeat_kv(ok, groups)))
            members.append(functools.partial(_selected_member, selection.rank,
                                             repeat_kv(selection.threshold, groups)))
        else:
            idx, ok = _positional_indices(length, part, options, q.device)
            sets.append((idx.expand(b, hq, -1, -1), ok.expand(b, hq, -1, -1)))
            members.append(functools.partial(_positional_member, part, options, query))
    for n, (idx, ok) in enumerate(sets):
        for later in members[n + 1:]:
            ok = ok & ~later(idx)
        sets[n] = (idx, ok)
    return sets


def _union(sets: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    if not sets:
        empty = torch.zeros(*q.shape[:3], 0, dtype=torch.long, device=q.device)
        return empty, empty.bool()
    if len(sets) == 1:
        return sets[0]
    return torch.cat([s[0] for s in sets], dim=-1), torch.cat([s[1] for s in sets], dim=-1)


def hax_indices(q: torch.Tensor, k: torch.Tensor, **options
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path's sparse set as ``(idx, valid)`` each ``(B, Hq, L, n)``: every row holds
    each key of ``S_i`` exactly once."""
    options = _options(options)
    prep = _prepare(q, k, options)
    selection = (key_selection_ranks(prep.scores, options["k_ks"])
                 if "ks" in COMPONENTS[options["arch"]] else None)
    return _union(_slot_sets(q, k, options, prep, selection), q)


def _candidate_positions(selection: Selection) -> torch.Tensor:
    """``(B, Hkv, n, k + C)``: the positions of each block's candidate keys, the top-k of the
    blocks before it, then its own keys (clamped below L: a key past L is never shared)."""
    length = selection.rank.shape[-1]
    n, size, width = selection.candidates.shape[2:]
    before = selection.candidates[:, :, :, 0, :width - size]      # the same for every row
    prior = _take(selection.order, before.clamp(max=max(length - 1, 0)))
    own = torch.arange(n * size, device=prior.device).clamp(max=max(length - 1, 0))
    return torch.cat([prior, own.view(n, size).expand(*prior.shape[:2], n, size)], dim=-1)


# ---------------------------------------------------------------- the mechanism's callables

def hax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  cross: bool = False, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
    """HAX sparse attention, fast path: ``(B, Hq, L, D)`` -> ``(B, Hq, L, Dv)``.

    Options (defaults): ``arch="hax"`` (one of ``ARCHS``), ``k_lsh=32``, ``k_ks=32``,
    ``window=32``, ``sinks=32``, ``dilation=64``, ``num_hash=8``, ``hash="sign"``,
    ``center="prefix_mean"``, ``seed=0``, ``generator=None``, ``projections=None``,
    ``key_scores=None``. Time O(L log L + L k D), memory O(L k D).

    One softmax per query over two kinds of slots (:mod:`subq.ops.hax_sparse`): keys gathered
    by index (LSH, baselines), and, for key selection, the ``k + C`` candidates shared by a
    block of ``C`` queries (the top-k before the block and the block's own keys), scored by one
    matrix product per block and masked to the query's top-k; in chunks of queries, forward
    and backward (which recomputes the scores from the saved log-sum-exps: training memory
    O(L (D + k)), not O(L k D)).
    """
    if key_padding_mask is not None:
        raise NotImplementedError(
            "hax does not support key_padding_mask (its buckets and key selection count "
            "every key). Calling subq directly, for training or scoring: put padding at the "
            "end and pass no mask (a causal query never sees later keys), or run each row "
            "over its real tokens (subq.padded_rows.attention_by_rows; transformers' padded "
            "batches and subq.prefill_state do so)")
    options = _options(options)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if options["arch"] == "full":
        return dense_attention(q, k, v, causal=True, scale=scale)
    acc = accumulation_dtype(q.dtype)
    prep = _prepare(q, k, options)
    selection = (key_selection_ranks(prep.scores, options["k_ks"])
                 if "ks" in COMPONENTS[options["arch"]] else None)
    idx, ok = _union(_slot_sets(q, k, options, prep, selection, with_ks=False), q)
    cand = shared = None
    size = 1
    if selection is not None:
        size = selection.candidates.shape[3]
        shared = (selection.candidates <= selection.chosen[..., -1:]) & (
            selection.candidates < q.shape[2])                    # (B, Hkv, n, C, k + C)
        shared = repeat_kv(shared.flatten(2, 3)[:, :, :q.shape[2]], q.shape[1] // k.shape[1])
        cand = _candidate_positions(selection)
    slots = SparseSlots(idx, ok, cand, shared, size, scale)
    return sparse_softmax(q.to(acc), k.to(acc), v.to(acc), slots).to(q.dtype)


def reference(q, k, v, *, causal=True, cross=False, scale=None, key_padding_mask=None,
              **options):
    """Dense masked softmax over the explicit ``(L, L)`` union mask of :func:`hax_mask`."""
    if key_padding_mask is not None:
        raise NotImplementedError("hax does not support key_padding_mask")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_attention(q, k, v, hax_mask(q, k, **options), scale)


def weights(q, k, *, causal=True, cross=False, scale=None, key_padding_mask=None, **options):
    """The sparse attention matrix ``(B, Hq, L, L)``."""
    if key_padding_mask is not None:
        raise NotImplementedError("hax does not support key_padding_mask")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_weights(q, k, hax_mask(q, k, **options), scale)


# ---------------------------------------------------------------- decoding

@dataclass
class HaxCache:
    """Decoding state. Column ``n`` of the cache is the token at ``positions[n]``; per (batch,
    kv head) it is live while it is one of the ``k_lsh`` most recent keys of its bucket
    (``newer < k_lsh``), in the running top-``k_ks`` (``selected``), or inside a baseline's
    pattern. ``q_sum``/``k_sum`` hold the running sums for ``center="prefix_mean"``."""

    UNBATCHED: ClassVar[tuple[str, ...]] = ("projections", "positions")

    projections: torch.Tensor | None
    t: int
    q_sum: torch.Tensor | None  # (B, Hq, D) accumulation dtype; None before the first step
    k_sum: torch.Tensor     # (B, Hkv, D)
    keys: torch.Tensor      # (B, Hkv, N, D)
    values: torch.Tensor    # (B, Hkv, N, Dv)
    positions: torch.Tensor  # (N,)
    codes: torch.Tensor     # (B, Hkv, N) int64
    newer: torch.Tensor     # (B, Hkv, N) same-bucket keys after this one
    scores: torch.Tensor    # (B, Hkv, N)
    selected: torch.Tensor  # (B, Hkv, N) bool


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, **options) -> HaxCache:
    """An empty cache; draws the LSH projections once (as a prefill with these options)."""
    options = _options(options)
    if options["center"] == "sequence_mean":
        raise NotImplementedError("hax cannot decode with center='sequence_mean': that "
                                  "centre depends on future tokens (the released code's choice)")
    acc = accumulation_dtype(dtype)
    proj = None
    if "lsh" in COMPONENTS[options["arch"]]:
        proj = lsh_projections(head_dim, num_hash=options["num_hash"], seed=options["seed"],
                               generator=options["generator"],
                               projections=options["projections"], device=device)
    hb = (batch, kv_heads, 0)
    return HaxCache(
        projections=proj, t=0,
        q_sum=None,
        k_sum=torch.zeros(batch, kv_heads, head_dim, dtype=acc, device=device),
        keys=torch.zeros(*hb, head_dim, dtype=dtype, device=device),
        values=torch.zeros(*hb, value_dim, dtype=dtype, device=device),
        positions=torch.zeros(0, dtype=torch.long, device=device),
        codes=torch.zeros(hb, dtype=torch.long, device=device),
        newer=torch.zeros(hb, dtype=torch.long, device=device),
        scores=torch.zeros(hb, dtype=acc, device=device),
        selected=torch.zeros(hb, dtype=torch.bool, device=device),
    )


def _centred_now(x_t: torch.Tensor, running: torch.Tensor, t: int, mode: str) -> torch.Tensor:
    if mode == "none":
        return x_t
    return x_t - running / (t + 1)


def step(q_t, k_t, v_t, state: HaxCache, *, scale=None, **options) -> tuple[torch.Tensor,
                                                                              HaxCache]:
    """One token: update the buckets' recent-key lists and the running top-k, attend to the
    union, evict keys no later query can select. ``key_scores`` here is ``(B, Hkv, 1)``."""
    options = _options(options)
    parts = COMPONENTS[options["arch"]]
    acc = accumulation_dtype(q_t.dtype)
    t, s = state.t, state
    groups = q_t.shape[1] // k_t.shape[1]
    q_sum = q_t[:, :, 0].detach().to(acc)
    q_sum = q_sum if s.q_sum is None else s.q_sum + q_sum
    k_sum = s.k_sum + k_t[:, :, 0].detach().to(acc)
    keys = torch.cat([s.keys, k_t], dim=2)
    values = torch.cat([s.values, v_t], dim=2)
    positions = torch.cat([s.positions, s.positions.new_full((1,), t)])
    b, hkv = k_t.shape[:2]
    codes, newer = s.codes, s.newer
    q_code = None
    if "lsh" in parts:
        k_code = bucket_codes(_centred_now(k_t[:, :, 0].detach().to(acc), k_sum, t,
                                           options["center"]), s.projections, options["hash"])
        q_code = bucket_codes(_centred_now(q_t[:, :, 0].detach().to(acc), q_sum, t,
                                           options["center"]), s.projections, options["hash"])
        newer = newer + (codes == k_code[..., None]).long()
        codes = torch.cat([codes, k_code[..., None]], dim=-1)
        newer = torch.cat([newer, newer.new_zeros(b, hkv, 1)], dim=-1)
    else:
        codes = torch.cat([codes, codes.new_zeros(b, hkv, 1)], dim=-1)
        newer = torch.cat([newer, newer.new_zeros(b, hkv, 1)], dim=-1)
    scores, selected = s.scores, s.selected
    if "ks" in parts:
        given = options["key_scores"]
        if given is not None and tuple(given.shape) != (b, hkv, 1):
            raise ValueError(f"option 'key_scores' of a decoding step must have shape "
                             f"(B, Hkv, 1)={(b, hkv, 1)}, got {tuple(given.shape)}")
        score_t = key_scores_or_norms(k_t, given)
        scores = torch.cat([scores, score_t], dim=-1)
        selected = torch.cat([selected, selected.new_ones(b, hkv, 1)], dim=-1)
        over = selected.sum(-1) > options["k_ks"]
        low = torch.where(selected, scores, float("inf")).amin(-1, keepdim=True)
        worst = (selected & (scores == low)).long() * (positions + 1)  # ties: evict the latest
        evict = torch.zeros_like(selected).scatter(-1, worst.argmax(-1, keepdim=True), True)
        selected = selected & ~(evict & over[..., None])
    else:
        scores = torch.cat([scores, scores.new_zeros(b, hkv, 1)], dim=-1)
        selected = torch.cat([selected, selected.new_zeros(b, hkv, 1)], dim=-1)

    fixed = torch.zeros_like(positions, dtype=torch.bool)          # baselines' patterns
    keep_fixed = torch.zeros_like(fixed)
    for part in parts:
        if part == "window":
            fixed |= t - positions < options["window"]
            keep_fixed |= t + 1 - positions < options["window"]
        elif part == "sink":
            fixed |= positions < options["sinks"]
            keep_fixed |= positions < options["sinks"]
        elif part == "dilated":
            hit = positions % options["dilation"] == options["dilation"] - 1
            fixed, keep_fixed = fixed | hit, keep_fixed | hit
        elif part == "full":
            fixed, keep_fixed = fixed | True, keep_fixed | True
    lsh_live = newer < options["k_lsh"] if "lsh" in parts else torch.zeros_like(selected)
    allowed = repeat_kv((selected | fixed)[..., None], groups)[..., 0]
    if q_code is not None:
        in_bucket = repeat_kv(codes[..., None], groups)[..., 0] == q_code[..., None]
        allowed = allowed | (in_bucket & repeat_kv(lsh_live[..., None], groups)[..., 0])
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    out = masked_attention(q_t, keys, values, allowed[:, :, None], scale)

    keep = (lsh_live | selected).flatten(0, 1).any(0) | keep_fixed
    return out, HaxCache(s.projections, t + 1, q_sum, k_sum, keys[:, :, keep],
                         values[:, :, keep], positions[keep], codes[..., keep],
                         newer[..., keep], scores[..., keep], selected[..., keep])


def _sample_options(q, k, v, generator: torch.Generator) -> dict:
    """Fixed projections for the tests (so every call and every decoding step shares them)."""
    h = MECHANISM.test_options.get("num_hash", DEFAULTS["num_hash"])
    return {"projections": torch.randn(q.shape[-1], h, generator=generator,
                                       dtype=torch.float64).to(q.device)}


MECHANISM = Mechanism(
    name="hax",
    paper="hax",
    summary="sign-bit LSH buckets + top-k key selection, one sparse softmax, O(L k)",
    fn=hax_attention,
    reference=reference,
    weights=weights,
    patterns=frozenset({Pattern.CAUSAL_SELF}),
    exact=False,
    options=(
        Option("arch", str, "hax", "sparse pattern: hax = lsh + ks; lsh; ks; the CISA "
               "baselines window, sink, dilated, window+dilated; full = dense causal",
               choices=ARCHS),
        Option("k_lsh", int, 32, "keys per query from its LSH bucket (the most recent)", low=1),
        Option("k_ks", int, 32, "keys per query from key selection (top scores)", low=1),
        Option("window", int, 32, "arch window: keys with 0 <= i - j < window", low=1),
        Option("sinks", int, 32, "arch sink: the first `sinks` keys", low=1),
        Option("dilation", int, 64, "arch dilated: keys with j % dilation == dilation - 1",
               low=1),
        Option("num_hash", int, 8, "h random projections (2^h sign buckets; <= 62 for sign)",
               low=1),
        Option("hash", str, "sign", "sign: bucket = sign bits (Eq. 7); argmax: argmax over "
               "projections (Eq. 6)", choices=("sign", "argmax")),
        Option("center", str, "prefix_mean", "centre before hashing: prefix_mean (causal), "
               "none, sequence_mean (the released code's; non-causal, cannot decode)",
               choices=("prefix_mean", "none", "sequence_mean")),
        Option("seed", int, 0, "seed of the projections when neither `projections` nor "
               "`generator` is given", low=0),
        Option("generator", torch.Generator, None, "draw fresh projections from it on every "
               "call (training); None: use `seed`", nullable=True),
        Option("projections", torch.Tensor, None, "fixed projections H (D, h); overrides "
               "`seed`, `generator` and `num_hash`", nullable=True),
        Option("key_scores", torch.Tensor, None, "key-selection scores (B, Hkv, L) "
               "(decoding step: (B, Hkv, 1)); None: the key norms", nullable=True),
    ),
    init_state=init_state,
    step=step,
    test_options={"k_lsh": 4, "k_ks": 4, "num_hash": 3, "window": 4, "sinks": 4,
                  "dilation": 4},
    sample_options=_sample_options,
)
