"""HiP's mask estimation: the hierarchical top-k tree search over key blocks (Lee et al., ``hip``).

For one query block with representative queries ``Q_rep`` and ``n`` searchable key blocks of
``block_k`` keys, with ``m`` nodes (``m = topk // block_k``):

1. Start from ``m`` groups of blocks: group ``i`` covers blocks ``[floor(n i / m),
   floor(n (i + 1) / m))``; if ``n <= m`` this already selects every block.
2. Split every group into a left half ``(start, floor(size / 2))`` and a right half
   ``(start + floor(size / 2), size - floor(size / 2))``; a branch is scored by its
   representative block ``r`` (``center``: ``start + floor(size / 2)``, ``first``: ``start``)
   as ``max_{q in Q_rep, j in block r} q . k_j``; empty branches score ``-inf``.
3. Keep the ``m`` best of the ``2m`` branches (ties: the branch earlier in position order) and
   repeat while ``m 2^it < n``, i.e. ``ceil(log2(n / m))`` times, until every kept branch is one
   block. The kept blocks are the selection: exactly ``min(m, n)`` distinct blocks.

:func:`search_blocks` runs the search vectorised over rows (batch x heads x query blocks): per
iteration, one gather of the representative keys (``2m b_k`` per row, never the branches'
other keys), one batched matmul against the row's representative queries, and the stable
top-``m`` by one ``topk`` threshold plus cumulative sums (:func:`best_in_order`, no sort):
O(rows x m x block_k x D x log(n / m)) time, never a rows x n tensor; the integer work runs on
chunks of rows, the gathers on cache-sized sub-chunks. :func:`search_blocks_loop` is the
obvious per-row loop, kept for the tests.
"""

from __future__ import annotations

import torch

REPRESENTATIVES = ("center", "first")
# Rows are searched in chunks whose index tensors hold about _CHUNK_NODES entries (few, large
# integer ops); their representative keys are gathered and scored in sub-chunks of about
# _GATHER_ELEMENTS elements (4 MiB in float32: in L3, and large enough for both cores).
# Measured at 16K on 2 quiet threads: chunks 4x / 16x smaller than these ran 1.3x / 1.5x slower.
_CHUNK_NODES = 1 << 20
_GATHER_ELEMENTS = 1 << 20


def search_iterations(n_blocks: int, n_nodes: int) -> int:
    """``ceil(log2(n_blocks / n_nodes))`` for ``n_blocks > n_nodes``, else 0."""
    iterations = 0
    while n_nodes << iterations < n_blocks:
        iterations += 1
    return iterations


def best_in_order(score: torch.Tensor, n_best: int) -> torch.Tensor:
    """``(rows, n_best)``: the indices of the ``n_best`` largest scores of each row, ties going
    to the earlier index, listed in increasing index order: a stable descending sort's first
    ``n_best`` entries, sorted, found with one unsorted ``topk`` (its smallest value is the
    threshold) and cumulative sums (no sort)."""
    rows, count = score.shape
    threshold = score.topk(n_best, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    greater = score > threshold
    tied = score == threshold
    room = n_best - greater.sum(dim=1, keepdim=True)
    keep = greater | (tied & (tied.cumsum(dim=1) <= room))
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, n_best)
    index = torch.arange(count, device=score.device).expand(rows, -1)
    out = torch.zeros(rows, n_best + 1, dtype=index.dtype, device=score.device)
    return out.scatter_(1, slot, index)[:, :n_best]


def _search_chunk(q_rep, q_ok, keys, key_ok, key_offset, range_end, iterations, n_nodes,
                  block_k, representative, min_range, aligned, per_key):
    rows, _, dim = q_rep.shape
    device = q_rep.device
    n_blocks = (range_end + block_k - 1) // block_k  # (rows,)
    node = torch.arange(n_nodes + 1, device=device)
    # Nodes are block ranges [lo, hi), in int32 (the caller indexes fewer than 2^31 keys):
    # half the memory traffic of the integer work.
    bounds = ((n_blocks[:, None] * node) // n_nodes).int()
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    # A missing representative becomes a copy of the first (which always exists): the max over
    # representatives is unchanged and needs no mask. Stored transposed, (rows, D, R), so that
    # the scores are one (2m b_k, D) x (D, R) product per row.
    q_t = torch.where(q_ok[..., None], q_rep, q_rep[:, :1]).transpose(1, 2).contiguous()
    # Aligned: keys are gathered a whole block at a time (keys viewed as (S / b_k, b_k D)).
    # Per-key validity is needed only when some range ends inside a block or keys are padded.
    table = keys.view(-1, block_k * dim) if aligned else keys
    base = (key_offset // block_k if aligned else key_offset).int()[:, None]
    within = torch.arange(block_k, device=device, dtype=torch.int32)
    width = 2 * n_nodes * block_k
    sub = max(1, min(rows, _GATHER_ELEMENTS // (width * max(dim, 1))))
    gathered = torch.empty(sub, width, dim, dtype=keys.dtype, device=device)
    dots = torch.empty(sub, width, q_t.shape[-1], dtype=q_t.dtype, device=device)
    min_blocks = -(-min_range // block_k)
    for it in range(iterations):
        # Children [lo, mid) and [mid, hi), mid = lo + floor(size / 2), interleaved (rows, 2m);
        # a child's representative block is its centre (lo + floor(size / 2)) or its first.
        mid = (lo + hi) // 2
        child_lo = torch.stack((lo, mid), dim=2).view(rows, -1)
        child_hi = torch.stack((mid, hi), dim=2).view(rows, -1)
        rep = (child_lo + child_hi) // 2 if representative == "center" else child_lo
        # Every node has >= min_blocks // (m 2^it) blocks: while that is >= 2 no child is empty.
        may_be_empty = min_blocks // (n_nodes << it) < 2
        pos = ok = None
        if per_key or not aligned:
            pos = rep[..., None] * block_k + within  # (rows, 2m, b_k) key positions
        if per_key:
            ok = (pos < range_end[:, None, None]) & (child_lo < child_hi)[..., None]
        if aligned:
            index = base + rep
        else:
            index = (base[..., None] + (pos if ok is None else torch.where(ok, pos, 0))
                     ).view(rows, -1)
        if key_ok is not None:
            ok = ok & key_ok[(base[..., None] * block_k + pos) if aligned
                             else index.view(ok.shape)]
        parts = []
        for i in range(0, rows, sub):
            n = min(sub, rows - i)
            torch.index_select(table, 0, index[i:i + n].view(-1),
                               out=gathered[:n].view(-1, table.shape[-1]))
            torch.bmm(gathered[:n].to(q_t.dtype), q_t[i:i + n], out=dots[:n])  # (n, 2m b_k, R)
            parts.append(dots[:n].amax(dim=2) if per_key
                         else dots[:n].view(n, 2 * n_nodes, -1).amax(dim=2))
        score = torch.cat(parts) if len(parts) > 1 else parts[0]
        if per_key:
            score = score.view(rows, -1, block_k).masked_fill(~ok, float("-inf")).amax(dim=2)
        elif may_be_empty:
            score = score.masked_fill(child_lo == child_hi, float("-inf"))
        best = best_in_order(score, n_nodes)
        if (n_nodes << it) < min_blocks:
            lo, hi = child_lo.gather(1, best), child_hi.gather(1, best)
        else:
            active = ((n_nodes << it) < n_blocks)[:, None]
            lo = torch.where(active, child_lo.gather(1, best), lo)
            hi = torch.where(active, child_hi.gather(1, best), hi)
    return lo.long(), hi - lo == 1


def search_blocks(q_rep: torch.Tensor, q_ok: torch.Tensor, keys: torch.Tensor,
                  key_offset: torch.Tensor, range_end: torch.Tensor, max_range: int, *,
                  n_nodes: int, block_k: int, representative: str,
                  key_ok: torch.Tensor | None = None, min_range: int = 0,
                  row_length: int | None = None, aligned_ranges: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree search for every row at once.

    Args:
        q_rep: ``(N, R, D)`` representative queries of each row (query block).
        q_ok: ``(N, R)`` which representatives exist (the first must).
        keys: ``(S, D)`` every key, flattened; row ``n`` searches ``keys[key_offset[n] + j]``
            for key positions ``0 <= j < range_end[n]``.
        key_offset: ``(N,)`` long, where row ``n``'s keys start in ``keys``.
        range_end: ``(N,)`` long, the searchable key positions ``[0, range_end)``.
        max_range: an upper bound of ``range_end`` (a Python int: it fixes the iterations;
            rows needing fewer iterations keep their nodes in the extra ones).
        n_nodes: ``m``, the number of blocks each row selects.
        block_k: keys per block.
        representative: ``"center"`` or ``"first"``.
        key_ok: ``(S,)`` bool, False for padding keys (they never score), or None.
        min_range: a lower bound of ``range_end`` (while every row still needs an iteration,
            the bookkeeping for rows that do not is skipped).
        row_length: when given, every ``key_offset`` is a multiple of it (lets the keys be
            gathered a block at a time if ``block_k`` divides it).
        aligned_ranges: every ``range_end`` is a multiple of ``block_k``.

    Returns:
        ``blocks (N, m)`` block indices (block ``b`` holds keys ``[b block_k, (b + 1) block_k)``)
        in increasing order where valid, and ``valid (N, m)`` bool.
    """
    with torch.no_grad():
        rows = q_rep.shape[0]
        iterations = search_iterations(-(-max_range // block_k), n_nodes)
        chunk = max(1, _CHUNK_NODES // (2 * n_nodes * block_k))
        aligned = (row_length is not None and row_length % block_k == 0
                   and keys.shape[0] % block_k == 0)
        per_key = key_ok is not None or not aligned_ranges
        parts = [_search_chunk(q_rep[i:i + chunk], q_ok[i:i + chunk], keys, key_ok,
                               key_offset[i:i + chunk], range_end[i:i + chunk], iterations,
                               n_nodes, block_k, representative, min_range, aligned, per_key)
                 for i in range(0, rows, chunk)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def search_blocks_loop(q_rep: torch.Tensor, q_ok: torch.Tensor, keys: torch.Tensor,
                       key_offset: torch.Tensor, range_end: torch.Tensor, *, n_nodes: int,
                       block_k: int, representative: str,
                       key_ok: torch.Tensor | None = None) -> list[list[int]]:
    """The same search, one row and one branch at a time, in plain Python; returns each row's
    selected block indices, sorted. A test aid: slow, obvious, independent of the vectorised
    form."""
    selections = []
    for n in range(q_rep.shape[0]):
        end, offset = int(range_end[n]), int(key_offset[n])
        queries = q_rep[n][q_ok[n]]
        total = -(-end // block_k)

        def score(start: int, size: int, end=end, offset=offset, queries=queries) -> float:
            if size == 0:
                return float("-inf")
            first = (start + size // 2 if representative == "center" else start) * block_k
            best = float("-inf")
            for j in range(first, min(first + block_k, end)):
                if key_ok is None or bool(key_ok[offset + j]):
                    best = max(best, float((queries @ keys[offset + j]).max()))
            return best

        nodes = [(total * i // n_nodes, total * (i + 1) // n_nodes - total * i // n_nodes)
                 for i in range(n_nodes)]
        groups = total / n_nodes
        while groups > 1:
            children = []
            for start, size in nodes:
                children += [(start, size // 2), (start + size // 2, size - size // 2)]
            ranked = sorted(range(len(children)), key=lambda c: (-score(*children[c]), c))
            nodes = [children[c] for c in sorted(ranked[:n_nodes])]
            groups /= 2
        selections.append(sorted(start for start, size in nodes if size == 1))
    return selections
