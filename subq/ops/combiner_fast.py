"""Fast paths of Combiner [combiner] (Ren et al., NeurIPS 2021): sub-quadratic, never an L x L
tensor. Each variant builds, per query, a few groups of logits (direct keys and region
summaries), takes ONE joint masked softmax over all groups (Fixed, Axial: each group's softmax
apart, merged exactly by the groups' log-sum-exps), and mixes the direct values with
the region "local expectations" ``sum_{j in Omega} p(j|Omega) v_j``, each computed once per
region and shared by every query that sees it.

Inputs are ``(B, H, L, D)`` in the accumulation dtype with the key/value heads already expanded
to the query heads; outputs ``(B, H, L, Dv)``. The sequence is padded to a whole grid inside
and the padding is masked out of every direct set, pool and within-region softmax.
The exact O(L^2) counterpart is :mod:`subq.ops.combiner_regions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    fused_attention_with_lse,
    fused_kernel_applies,
    masked_softmax,
    merge_weights,
)

# einsum forms that mix a probability group with its values on an (n, m) grid:
# "row": key (r, e) of the query's own grid row; "col": key (s, c) of the query's grid column.
_MIX = {
    "row": "bhrce,bhred->bhrcd",
    "col": "bhrcs,bhscd->bhrcd",
}


def _grid(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, H, L, d) -> (B, H, rows, cols, d), padded at the end with copies of the last token
    (masked out wherever a real token is meant; Axial's summary of a missing cell of the last
    row is that of the row's last token)."""
    b, h, length, d = x.shape
    missing = rows * cols - length
    if missing:
        x = torch.cat([x, x[:, :, -1:].expand(b, h, missing, d)], dim=2)
    return x.view(b, h, rows, cols, d)


def _valid(length: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows, cols) bool: which grid cells hold a real token."""
    return (torch.arange(rows * cols, device=device) < length).view(rows, cols)


def _block_pool(x: torch.Tensor, ok: torch.Tensor, summary: str) -> torch.Tensor:
    """Pool ``x (B, H, n, s, d)`` over its valid cells ``ok (n, s)`` -> ``(B, H, n, d)``;
    a block with no valid cell gives 0."""
    okx = ok[..., None]
    if summary == "max":
        pooled = x.masked_fill(~okx, float("-inf")).amax(dim=-2)
        return torch.where(ok.any(-1)[..., None], pooled, 0.0)
    return (x * okx).sum(-2) / ok.sum(-1).clamp(min=1)[..., None]


def _shift(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Move entries one place forward along ``dim``; the first becomes 0 (exclusive scans)."""
    first = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def _exclusive_scan_pool(x: torch.Tensor, ok: torch.Tensor, axis: int, summary: str,
                         reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix (``reverse``: suffix) pool of the grid ``x (B, H, n, m, d)`` along grid ``axis``
    (0: rows, 1: columns) over the valid cells strictly before each cell.

    Returns ``(pooled (B, H, n, m, d), nonempty (n, m))``; empty prefixes pool to 0.
    """
    dim = axis + 2
    if reverse:
        x, ok = x.flip(dim), ok.flip(axis)
    okx = ok[..., None]
    count = _shift(torch.cumsum(ok.long(), dim=axis), axis)
    if summary == "max":
        pooled = _shift(torch.cummax(x.masked_fill(~okx, float("-inf")), dim=dim).values, dim)
    else:
        pooled = _shift(torch.cumsum(x * okx, dim=dim), dim) / count.clamp(min=1)[..., None]
    nonempty = count > 0
    pooled = torch.where(nonempty[..., None], pooled, 0.0)
    if reverse:
        pooled, nonempty = pooled.flip(dim), nonempty.flip(axis)
    return pooled, nonempty


def _joint(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]) -> torch.Tensor:
    """One softmax over the concatenated logit groups, each group's weights then mixed with its
    values. ``groups``: ``(logits (B, H, n, m, w), allowed (n, m, w), values, form)``; every
    row allows at least one direct key, so a plain softmax is safe."""
    n, m = groups[0][0].shape[2:4]
    allowed = torch.cat([ok.expand(n, m, lg.shape[-1]) for lg, ok, _, _ in groups], dim=-1)
    logits = torch.cat([g[0] for g in groups], dim=-1).masked_fill_(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out, offset = None, 0
    for lg, _, values, form in groups:
        width = lg.shape[-1]
        part = torch.einsum(_MIX[form], p[..., offset:offset + width], values)
        out = part if out is None else out + part
        offset += width
    return out


def _ungrid(out: torch.Tensor, length: int) -> torch.Tensor:
    b, h, rows, cols, d = out.shape
    return out.reshape(b, h, rows * cols, d)[:, :, :length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            fused: bool, bias: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale q k^T + bias) v`` and its log-sum-exp for ``(Z, G, Lq, d)`` inputs:
    ``(Z, G, Lq, dv)``, ``(Z, G, Lq)``. ``causal``: key j only for query i >= j (top-left
    aligned when Lq != Lk); ``bias``: additive ``(Lq, Lk)`` mask of 0 / -inf. Every row must
    keep a key. ``fused``: torch's CPU flash kernel (no L x L tensor; its log-sum-exp carries
    no gradient, so only without autograd), otherwise the explicit softmax."""
    if fused:
        return fused_attention_with_lse(q, k, v, causal=causal, attn_mask=bias, scale=scale)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if bias is not None:
        logits = logits + bias
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse[..., None]), v), lse


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`_attend` may use the flash kernel (:func:`fused_kernel_applies`)."""
    return fused_kernel_applies(q, v, k)


def _rows(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, length: int, causal: bool,
          scale: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every cell of the ``(Z, n, m, d)`` grid to the real tokens of its own row
    (causal: columns ``<= c``); a short last row is attended over its real cells only."""
    n, m = qg.shape[1:3]
    full = length // m
    if full == n:
        return _attend(qg, kg, vg, scale, causal, fused)
    last = length - full * m
    head = _attend(qg[:, :full], kg[:, :full], vg[:, :full], scale, causal, fused)
    tail = _attend(qg[:, full:], kg[:, full:, :last], vg[:, full:, :last], scale, causal, fused)
    return torch.cat([head[0], tail[0]], dim=1), torch.cat([head[1], tail[1]], dim=1)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor, slice]], fused: bool) -> torch.Tensor:
    """Joint softmax over disjoint logit groups from each group's own softmax: ``parts`` are
    ``(out (Z, n', m, dv), lse (Z, n', m), rows)`` over grid rows ``rows`` of ``(Z, n, m)``,
    the first over every row. ``out = sum_g exp(lse_g - logsumexp_g lse_g) out_g`` (exact)."""
    n = parts[0][1].shape[1]
    lses = []
    for _, lse, rows in parts:
        start, stop, _ = rows.indices(n)
        lses.append(F.pad(lse, (0, 0, start, n - stop), value=float("-inf")))
    weights = [w[..., None] for w in merge_weights(lses)]
    first = parts[0][0]
    out = first.mul_(weights[0]) if fused else first * weights[0]
    for (part, _, rows), weight in zip(parts[1:], weights[1:], strict=True):
        out[:, rows].addcmul_(part, weight[:, rows])
    return out


def _span_pool(xg: torch.Tensor, ok: torch.Tensor, summary: str, ragged: bool) -> torch.Tensor:
    """Pool the grid ``(Z, n, s, d)`` over each row's real cells ``ok (n, s)`` -> ``(Z, n, d)``
    (``ragged``: the last row has padding cells). Padding cells copy the last real token, so a
    max over the whole row is already the max over the real ones."""
    if summary == "max":
        return xg.amax(dim=-2)
    if not ragged:
        return xg.mean(dim=-2)
    return _block_pool(xg, ok, summary)


def _heads_grid(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, H, L, d) -> (B * H, rows, cols, d) grid (see :func:`_grid`)."""
    b, h, _, d = x.shape
    return _grid(x, rows, cols).reshape(b * h, rows, cols, d)


def _from_heads_grid(out: torch.Tensor, b: int, length: int) -> torch.Tensor:
    z, rows, cols, d = out.shape
    return out.reshape(b, z // b, rows * cols, d)[:, :, :length]


def fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
          span: int, summary: str) -> torch.Tensor:
    """Combiner-Fixed: direct = own span (causal: ``j <= i``); regions = the other spans
    (causal: the earlier ones), key = pooled span keys, value = the span's expectation under
    its pooled query. The direct and region softmaxes are taken apart and merged exactly by
    their log-sum-exps. O(L (s + L/s))."""
    length = q.shape[2]
    s = min(span, length)
    n = -(-length // s)
    fused = _fused(q, k, v)
    qg, kg, vg = (_heads_grid(x, n, s) for x in (q, k, v))
    z, dv = qg.shape[0], vg.shape[-1]
    direct = _rows(qg, kg, vg, length, causal, scale, fused)
    if n == 1:
        return _from_heads_grid(direct[0], q.shape[0], length)
    ok = _valid(length, n, s, q.device)
    span_q, span_k = (_span_pool(x, ok, summary, length < n * s) for x in (qg, kg))
    inner = masked_softmax(torch.einsum("znd,znjd->znj", span_q, kg) * scale, ok)
    span_v = torch.einsum("znj,znjd->znd", inner, vg)
    a = torch.arange(n, device=q.device)
    if causal:
        # Spans 1.. (queries) against summaries 0..n-2: span a sees summary b < a.
        sees, first = a[None, :-1] < a[1:, None], 1
        span_k, span_v = span_k[:, :-1], span_v[:, :-1]
    else:
        sees, first = a[None, :] != a[:, None], 0
    bias = torch.zeros(sees.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~sees, float("-inf")).repeat_interleave(s, dim=0)
    queries = qg[:, first:].reshape(z, 1, (n - first) * s, -1)
    out, lse = _attend(queries, span_k[:, None], span_v[:, None], scale, False, fused, bias)
    region = (out.view(z, n - first, s, dv), lse.view(z, n - first, s), slice(first, None))
    return _from_heads_grid(_merge([(*direct, slice(None)), region], fused), q.shape[0],
                            length)


def axial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
          span: int) -> torch.Tensor:
    """Combiner-Axial (row-major, row summary ``none``): direct = own row (causal: columns
    ``<= c``); region (r', c) for every other row r' (causal: r' < r) has key ``k[r', c]`` and
    value the full row attention output at ``(r', c)``; a missing cell of a short last row
    stands for that row through its last token. Row, column-above and column-below softmaxes
    are taken apart (the column ones on transposed views of the grid) and merged exactly by
    their log-sum-exps. O(L (m + L/m))."""
    length = q.shape[2]
    m = min(span, length)
    n = -(-length // m)
    fused = _fused(q, k, v)
    qg, kg, vg = (_heads_grid(x, n, m) for x in (q, k, v))
    row_out, row_lse = _rows(qg, kg, vg, length, False, scale, fused)
    direct = _rows(qg, kg, vg, length, True, scale, fused) if causal else (row_out, row_lse)
    parts = [(*direct, slice(None))]
    if n > 1:
        qc, kc, rc = (x.transpose(1, 2) for x in (qg, kg, row_out))
        # Rows 1.. see rows above: query row r against key rows 0..n-2, key row r' < r.
        out, lse = _attend(qc[:, :, 1:], kc[:, :, :-1], rc[:, :, :-1], scale, True, fused)
        parts.append((out.transpose(1, 2), lse.transpose(1, 2), slice(1, None)))
        if not causal:
            # Rows ..n-2 see rows below: query row r against key rows 1.., key row r' > r.
            r = torch.arange(n - 1, device=q.device)
            bias = torch.zeros(n - 1, n - 1, dtype=q.dtype, device=q.device).masked_fill_(
                r[None, :] < r[:, None], float("-inf"))
            out, lse = _attend(qc[:, :, :-1], kc[:, :, 1:], rc[:, :, 1:], scale, False, fused,
                               bias)
            parts.append((out.transpose(1, 2), lse.transpose(1, 2), slice(None, -1)))
    return _from_heads_grid(_merge(parts, fused), q.shape[0], length)


def mixture(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
            span: int, summary: str) -> torch.Tensor:
    """Combiner-Mixture: on the (rows x m) grid, query (r, c) attends directly to its row
    (causal: columns ``<= c``) and its column (other rows; causal: above), and to the
    summaries of every other column above row r (non-causal: and below), and of every other
    row left of column c and right of it (causal: rows above only). O(L (m + L/m))."""
    length = q.shape[2]
    m = min(span, length)
    n = -(-length // m)
    qr, kr, vr = (_grid(x, n, m) for x in (q * scale, k, v))
    ok = _valid(length, n, m, q.device)
    c = torch.arange(m, device=q.device)
    r = torch.arange(n, device=q.device)
    other_rows = (r[None, :] < r[:, None]) if causal else (r[None, :] != r[:, None])
    other_cols = c[None, :] != c[:, None]
    groups = [
        (torch.einsum("bhrcd,bhred->bhrce", qr, kr),
         ok[:, None, :] & ((c[None, :] <= c[:, None]) if causal else True), vr, "row"),
        (torch.einsum("bhrcd,bhscd->bhrcs", qr, kr),
         other_rows[:, None, :] & ok.t()[None], vr, "col"),
    ]
    # Column c' over the rows above r (below r): one region per (r, c'), seen from row r.
    for reverse in (False,) if causal else (False, True):
        col_k, nonempty = _exclusive_scan_pool(kr, ok, 0, summary, reverse)
        col_q, _ = _exclusive_scan_pool(qr, ok, 0, summary, reverse)
        rows_in = (r[None, :] > r[:, None]) if reverse else (r[None, :] < r[:, None])
        inner_ok = rows_in[:, None, :] & ok.t()[None]
        inner = masked_softmax(torch.einsum("bhrcd,bhscd->bhrcs", col_q, kr), inner_ok)
        col_v = torch.einsum("bhrcs,bhscd->bhrcd", inner, vr)
        groups.append((torch.einsum("bhrcd,bhred->bhrce", qr, col_k),
                       nonempty[:, None, :] & other_cols, col_v, "row"))
    # Row r' left of column c (right of c): one region per (r', c), seen from column c.
    for reverse in (False, True):
        row_k, nonempty = _exclusive_scan_pool(kr, ok, 1, summary, reverse)
        row_q, _ = _exclusive_scan_pool(qr, ok, 1, summary, reverse)
        cols_in = (c[None, :] > c[:, None]) if reverse else (c[None, :] < c[:, None])
        inner_ok = cols_in[None] & ok[:, None, :]
        inner = masked_softmax(torch.einsum("bhrcd,bhred->bhrce", row_q, kr), inner_ok)
        row_v = torch.einsum("bhrce,bhred->bhrcd", inner, vr)
        groups.append((torch.einsum("bhrcd,bhscd->bhrcs", qr, row_k),
                       other_rows[:, None, :] & nonempty.t()[None], row_v, "col"))
    return _ungrid(_joint(groups), length)


def _pair_pool(x: torch.Tensor, count: torch.Tensor, summary: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One level up the dyadic tree: pool ``(Z, n, d)`` block summaries pairwise to
    ``(Z, n / 2, d)``; ``count (n,)`` real tokens per block. Max: empty blocks hold -inf;
    mean: ``x`` holds sums."""
    z, n, d = x.shape
    pairs = x.view(z, n // 2, 2, d)
    pooled = pairs.amax(dim=2) if summary == "max" else pairs.sum(dim=2)
    return pooled, count.view(n // 2, 2).sum(-1)


def _finish_pool(x: torch.Tensor, count: torch.Tensor, summary: str) -> torch.Tensor:
    """Block summaries from :func:`_pair_pool`'s running values; empty blocks give 0."""
    if summary == "max":
        return torch.where(count[:, None] > 0, x, 0.0)
    return x / count.clamp(min=1)[:, None]


def logsparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
              summary: str) -> torch.Tensor:
    """Combiner-Logsparse: direct = {i}; at every level l the sibling ``(i >> l) ^ 1`` of the
    aligned dyadic block of size ``2**l`` holding i is one region (causal: only left siblings,
    which tile ``[0, i)``). ``ceil(log2 L)`` regions per query, O(L log L). Block summaries are
    pooled pairwise up the tree; every per-level product is a batched matrix-vector product
    on a view of q, k or v, and the values are mixed in place, so no per-level copy of the
    sequence is made."""
    b, h, length, d = q.shape
    dv = v.shape[-1]
    z = b * h
    levels = (length - 1).bit_length()
    padded = 1 << levels
    # Padding copies the last token: a max pool over a block with a real token ignores it.
    q, k, v = (_grid(x, 1, padded).reshape(z, padded, x.shape[-1]) for x in (q, k, v))
    ok = torch.arange(padded, device=q.device) < length
    count = ok.long()
    pool_q, pool_k = (x if summary == "max" or padded == length
                      else x.masked_fill(~ok[:, None], 0.0) for x in (q, k))
    logits = [torch.matmul(q[:, :, None, :], k[:, :, :, None]).view(z, padded) * scale]
    allowed = [torch.ones_like(ok)]
    sibling_values = []
    for level in range(levels):
        size, blocks = 1 << level, padded >> level
        if level:
            pool_q, _ = _pair_pool(pool_q, count, summary)
            pool_k, count = _pair_pool(pool_k, count, summary)
            block_q, block_k = (_finish_pool(x, count, summary) for x in (pool_q, pool_k))
            kb, vb = k.view(z, blocks, size, d), v.view(z, blocks, size, dv)
            inner = torch.matmul(kb, block_q[..., None]).view(z, blocks, size) * scale
            inner = masked_softmax(inner, ok.view(blocks, size))
            block_v = torch.matmul(inner[:, :, None, :], vb).view(z, blocks, dv)
        else:
            # Single tokens: the summary is the token, its expectation its value (padding
            # blocks are never seen).
            block_k, block_v = k, v
        sibling = torch.arange(blocks, device=q.device) ^ 1
        seen = (count > 0)[sibling]
        if causal:
            seen = seen & (sibling < torch.arange(blocks, device=q.device))
        qb = q.view(z, blocks, size, d)
        logits.append(torch.matmul(qb, block_k[:, sibling, :, None]).view(z, padded) * scale)
        allowed.append(seen.repeat_interleave(size))
        sibling_values.append(block_v[:, sibling])
    p = masked_softmax(torch.stack(logits, dim=-1), torch.stack(allowed, dim=-1))
    out = p[..., :1] * v
    for level, block_v in enumerate(sibling_values):
        size = 1 << level
        blocks = padded >> level
        out.view(z, blocks, size, dv).addcmul_(p[..., level + 1].view(z, blocks, size, 1),
                                               block_v[:, :, None, :])
    return out[:, :length].reshape(b, h, length, dv)
