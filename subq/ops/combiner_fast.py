"""Fast paths of Combiner [combiner] (Ren et al., NeurIPS 2021): sub-quadratic, never an L x L
tensor. Each variant builds, per query, a few groups of logits (direct keys and region
summaries), takes ONE joint masked softmax over all groups, and mixes the direct values with
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

from .common import masked_softmax

# einsum forms that mix a probability group with its values on an (n, m) grid:
# "row": key (r, e) of the query's own grid row; "col": key (s, c) of the query's grid column;
# "span": one summary per row s of the grid (Fixed's spans).
_MIX = {
    "row": "bhrce,bhred->bhrcd",
    "col": "bhrcs,bhscd->bhrcd",
    "span": "bhrcs,bhsd->bhrcd",
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


def fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
          span: int, summary: str) -> torch.Tensor:
    """Combiner-Fixed: direct = own span (causal: ``j <= i``); regions = the other spans
    (causal: the earlier ones). Span a's queries score one key set, its own s keys followed
    by the n span summaries, so the joint softmax is a plain softmax. O(L (s + L/s))."""
    length = q.shape[2]
    s = min(span, length)
    n = -(-length // s)
    qs, ks, vs = (_grid(x, n, s) for x in (q * scale, k, v))
    ok = _valid(length, n, s, q.device)
    span_q, span_k = _block_pool(qs, ok, summary), _block_pool(ks, ok, summary)
    inner = masked_softmax(torch.einsum("bhnd,bhnjd->bhnj", span_q, ks), ok)
    span_v = torch.einsum("bhnj,bhnjd->bhnd", inner, vs)
    b, h = q.shape[:2]
    keys = torch.cat([ks, span_k[:, :, None].expand(b, h, n, n, k.shape[-1])], dim=3)
    values = torch.cat([vs, span_v[:, :, None].expand(b, h, n, n, v.shape[-1])], dim=3)
    i = torch.arange(s, device=q.device)
    direct_ok = ok[:, None, :] & ((i[None, :] <= i[:, None]) if causal else True)
    r = torch.arange(n, device=q.device)
    region_ok = (r[None, :] < r[:, None]) if causal else (r[None, :] != r[:, None])
    allowed = torch.cat([direct_ok.expand(n, s, s), region_ok[:, None, :].expand(n, s, n)], -1)
    logits = torch.einsum("bhnid,bhnjd->bhnij", qs, keys).masked_fill_(~allowed, float("-inf"))
    out = torch.einsum("bhnij,bhnjd->bhnid", torch.softmax(logits, dim=-1), values)
    return _ungrid(out, length)


def axial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
          span: int) -> torch.Tensor:
    """Combiner-Axial (row-major, row summary ``none``): direct = own row (causal: columns
    ``<= c``); region (r', c) for every other row r' (causal: r' < r) has key ``k[r', c]`` and
    value the full row attention output at ``(r', c)``; a missing cell of a short last row
    stands for that row through its last token. O(L (m + L/m))."""
    length = q.shape[2]
    m = min(span, length)
    n = -(-length // m)
    qr, kr, vr = (_grid(x, n, m) for x in (q * scale, k, v))
    ok = _valid(length, n, m, q.device)
    row_logits = torch.einsum("bhrcd,bhred->bhrce", qr, kr)
    row_out = torch.einsum("bhrce,bhred->bhrcd", masked_softmax(row_logits, ok[:, None, :]), vr)
    c = torch.arange(m, device=q.device)
    r = torch.arange(n, device=q.device)
    direct_ok = ok[:, None, :] & ((c[None, :] <= c[:, None]) if causal else True)
    other_rows = (r[None, :] < r[:, None]) if causal else (r[None, :] != r[:, None])
    return _ungrid(_joint([
        (row_logits, direct_ok, vr, "row"),
        (torch.einsum("bhrcd,bhscd->bhrcs", qr, kr), other_rows[:, None, :], row_out, "col"),
    ]), length)


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


def logsparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
              summary: str) -> torch.Tensor:
    """Combiner-Logsparse: direct = {i}; at every level l the sibling ``(i >> l) ^ 1`` of the
    aligned dyadic block of size ``2**l`` holding i is one region (causal: only left siblings,
    which tile ``[0, i)``). ``ceil(log2 L)`` regions per query, O(L log L)."""
    b, h, length, _ = q.shape
    levels = (length - 1).bit_length()
    padded = 1 << levels
    q, k, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (q * scale, k, v))
    ok = torch.arange(padded, device=q.device) < length
    logits = [(q * k).sum(-1)]
    allowed = [torch.ones_like(ok)]
    sibling_values = []
    for level in range(levels):
        size = 1 << level
        blocks = padded >> level
        okl = ok.view(blocks, size)
        qb, kb, vb = (x.view(b, h, blocks, size, x.shape[-1]) for x in (q, k, v))
        block_q, block_k = _block_pool(qb, okl, summary), _block_pool(kb, okl, summary)
        inner = masked_softmax(torch.einsum("bhnd,bhnjd->bhnj", block_q, kb), okl)
        block_v = torch.einsum("bhnj,bhnjd->bhnd", inner, vb)
        index = torch.arange(blocks, device=q.device)
        sibling = index ^ 1
        seen = okl.any(-1)[sibling]
        if causal:
            seen = seen & (index % 2 == 1)
        logits.append(torch.einsum("bhnjd,bhnd->bhnj", qb, block_k[:, :, sibling]).reshape(
            b, h, padded))
        allowed.append(seen.repeat_interleave(size))
        sibling_values.append(block_v[:, :, sibling])
    p = masked_softmax(torch.stack(logits, dim=-1), torch.stack(allowed, dim=-1))
    out = p[..., :1] * v
    for level, block_v in enumerate(sibling_values):
        size = 1 << level
        pl = p[..., level + 1].view(b, h, padded >> level, size, 1)
        out = out + (pl * block_v[:, :, :, None, :]).reshape(b, h, padded, -1)
    return out[:, :, :length]
