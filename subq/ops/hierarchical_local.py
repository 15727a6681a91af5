"""Scale-DiT's hierarchical local attention with low-resolution global guidance
(``hierarchical_local`` in DESIGN.md; Zhang & Tai, "Scale-DiT", arXiv 2510.16325).

The sequence is ``[text (T) | high-res grid (H x W) | low-res grid (H/r x W/r)]``, each grid in
the layout's token order (``window_first`` by default, ``hilbert`` or ``raster``; see
:mod:`subq.ops.token_order`). Query i attends key j iff (the official ``_build_mask``):

* text -> text and text -> high-res (text does not see low-res);
* high-res -> text;
* high-res -> high-res: |drow| <= radius and |dcol| <= radius (radius 8: a 17 x 17 window);
* high-res -> low-res: the low-res window (``lo_window``-sized, one per high-res
  ``window``-sized window) whose flat raster id differs by <= ``reach`` (1) from the query's
  high-res window id (own window and its flat neighbours, wrapping at row ends as the code does);
* low-res -> low-res: |drow| <= lo_radius and |dcol| <= lo_radius (radius 2: 5 x 5).

    out_i = sum_{j allowed(i)} softmax_j(scale * q_i . k_j) v_j

The :class:`Layout` builds this token mask (reference, O(N^2)) and, without ever forming it,
its block map (default 128 query x 64 key blocks, a block active iff any pair in it is
allowed). The fast path runs, per query block, one fused ``scaled_dot_product_attention``
over its active key blocks (sliced when contiguous, else gathered), with the in-block token
mask only where some pair is masked: time and memory O(N * active keys per query block),
never N x N.

Main entry: ``hierarchical_local_attention(q, k, v, layout=Layout.from_image(...))``. The
registry entry ``hierarchical_local`` takes the layout as scalar options and derives it from
the sequence length with :meth:`Layout.for_length` (first ``text`` tokens text, the rest split
r^2 : 1 into a high-res grid ``width`` wide and a low-res grid ``width / r`` wide, partial last
rows allowed); with the defaults, length 4864 is exactly Scale-DiT's 1K training geometry.
Pattern: noncausal self only (an image diffusion transformer attends bidirectionally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import Mechanism, Option, Pattern
from . import masks
from .common import accumulation_dtype, new_empty
from .reference import masked_attention, masked_weights
from .token_order import ORDERS, grid_order

TEXT, HIGH, LOW = 0, 1, 2
BLOCK_Q, BLOCK_K = 128, 64


@dataclass(frozen=True)
class Layout:
    """Where the text, high-res and low-res tokens of a Scale-DiT sequence sit, and the rules
    linking them. Grids are ``*_count`` tokens, ``*_width`` wide (partial last row allowed)."""

    text: int
    hi_count: int
    hi_width: int
    lo_count: int
    lo_width: int
    window: int = 16
    radius: int = 8
    lo_window: int = 4
    lo_radius: int = 2
    reach: int = 1
    order: str = "window_first"

    def __post_init__(self) -> None:
        for name in ("text", "hi_count", "lo_count", "radius", "lo_radius", "reach"):
            if getattr(self, name) < 0:
                raise ValueError(f"layout {name} must be >= 0, got {getattr(self, name)}")
        for name in ("hi_width", "lo_width", "window", "lo_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")
        if self.order not in ORDERS:
            raise ValueError(f"layout order must be one of {ORDERS}, got {self.order!r}")

    @classmethod
    def from_image(cls, image: int | tuple[int, int] = 1024, *, downsample: int = 4,
                   text: int = 512, patch: int = 16, window: int = 16, radius: int = 8,
                   lo_radius: int = 2, reach: int = 1, order: str = "window_first") -> Layout:
        """The layout of an ``image`` (pixels, side or (height, width)) at ``patch`` pixels per
        token, with a low-res guide ``downsample`` times smaller; Scale-DiT's defaults."""
        height, width = (image, image) if isinstance(image, int) else image
        hp, wp = height // patch, width // patch
        h, w = hp // downsample, wp // downsample
        return cls(text=text, hi_count=hp * wp, hi_width=wp, lo_count=h * w, lo_width=w,
                   window=window, radius=radius, lo_window=max(window // downsample, 1),
                   lo_radius=lo_radius, reach=reach, order=order)

    @classmethod
    def for_length(cls, length: int, *, text: int = 512, width: int = 64, downsample: int = 4,
                   window: int = 16, radius: int = 8, lo_radius: int = 2,
                   order: str = "window_first") -> Layout:
        """A layout for any sequence length: ``min(text, length)`` text tokens, the rest split
        ``downsample^2 : 1`` into a high-res grid ``width`` wide and a low-res grid
        ``ceil(width / downsample)`` wide."""
        text = min(text, length)
        lo = (length - text) // (downsample ** 2 + 1)
        return cls(text=text, hi_count=length - text - lo, hi_width=width, lo_count=lo,
                   lo_width=-(-width // downsample), window=window, radius=radius,
                   lo_window=max(window // downsample, 1), lo_radius=lo_radius, order=order)

    @property
    def length(self) -> int:
        return self.text + self.hi_count + self.lo_count

    def tokens(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Per sequence position: ``kind`` (TEXT/HIGH/LOW), grid ``row``/``col``, ``win`` (flat
        window id), ``(N,)`` int64 each; text tokens get row = col = win = 0."""
        parts = [dict(kind=torch.full((self.text,), TEXT, device=device),
                      row=torch.zeros(self.text, dtype=torch.long, device=device))]
        parts[0]["col"] = parts[0]["win"] = parts[0]["row"]
        for kind, count, width, window in ((HIGH, self.hi_count, self.hi_width, self.window),
                                           (LOW, self.lo_count, self.lo_width, self.lo_window)):
            raster = grid_order(count, width, window, self.order, device)
            row, col = raster // width, raster % width
            parts.append(dict(kind=torch.full((count,), kind, device=device), row=row, col=col,
                              win=(row // window) * -(-width // window) + col // window))
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def allowed(self, tokens: dict[str, torch.Tensor], i: torch.Tensor, j: torch.Tensor
                ) -> torch.Tensor:
        """The rule as a mask function: may the query at position ``i`` see the key at ``j``?
        ``i``, ``j`` broadcastable int tensors of positions ``< length``."""
        ki, kj = tokens["kind"][i], tokens["kind"][j]
        dr = (tokens["row"][i] - tokens["row"][j]).abs()
        dc = (tokens["col"][i] - tokens["col"][j]).abs()
        dw = (tokens["win"][i] - tokens["win"][j]).abs()
        return (((kj == TEXT) & (ki != LOW)) | ((ki == TEXT) & (kj == HIGH))
                | ((ki == HIGH) & (kj == HIGH) & (dr <= self.radius) & (dc <= self.radius))
                | ((ki == HIGH) & (kj == LOW) & (dw <= self.reach))
                | ((ki == LOW) & (kj == LOW) & (dr <= self.lo_radius) & (dc <= self.lo_radius)))

    def token_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense ``(N, N)`` mask (for references and plots only)."""
        i, j = masks.positions(self.length, self.length, device)
        return self.allowed(self.tokens(device), i, j)

    def _grid(self, kind: int, tokens, device) -> torch.Tensor:
        """``(rows, width)`` sequence positions of a grid's raster cells, -1 where absent."""
        count, width = ((self.hi_count, self.hi_width) if kind == HIGH
                        else (self.lo_count, self.lo_width))
        rows = -(-count // width)
        grid = torch.full((rows * width,), -1, dtype=torch.long, device=device)
        where = torch.nonzero(tokens["kind"] == kind).flatten()
        grid[tokens["row"][where] * width + tokens["col"][where]] = where
        return grid.view(rows, width)

    def local_pairs(self, device: torch.device | str | None = None):
        """Yield ``(i, j)`` position vectors of every allowed pair of the local rules
        (high->high, high->low, low->low), without duplicates and without an N x N tensor."""
        tokens = self.tokens(device)
        for kind, radius in ((HIGH, self.radius), (LOW, self.lo_radius)):
            grid = self._grid(kind, tokens, device)
            rows, width = grid.shape
            for dr in range(-min(radius, rows - 1), min(radius, rows - 1) + 1):
                for dc in range(-min(radius, width - 1), min(radius, width - 1) + 1):
                    qs = grid[max(0, -dr):rows - max(0, dr), max(0, -dc):width - max(0, dc)]
                    ks = grid[max(0, dr):rows - max(0, -dr), max(0, dc):width - max(0, -dc)]
                    ok = (qs >= 0) & (ks >= 0)
                    yield qs[ok], ks[ok]
        if self.hi_count == 0 or self.lo_count == 0:
            return
        lo = torch.nonzero(tokens["kind"] == LOW).flatten()
        lo_win = tokens["win"][lo]
        n_windows = int(lo_win.max()) + 1
        members = torch.full((n_windows, self.lo_window ** 2), -1, dtype=torch.long,
                             device=device)
        slot = torch.zeros_like(lo_win)  # rank of each token within its window
        order = torch.argsort(lo_win, stable=True)
        counts = torch.bincount(lo_win, minlength=n_windows)
        starts = torch.cumsum(counts, 0) - counts
        slot[order] = torch.arange(lo.numel(), device=device) - starts[lo_win[order]]
        members[lo_win, slot] = lo
        hi = torch.nonzero(tokens["kind"] == HIGH).flatten()
        for delta in range(-self.reach, self.reach + 1):
            target = tokens["win"][hi] + delta
            ok = (target >= 0) & (target < n_windows)
            keys = members[target[ok]]  # (n, lo_window^2)
            queries = hi[ok][:, None].expand_as(keys)
            present = keys >= 0
            yield queries[present], keys[present]

    def dense_rectangles(self) -> list[tuple[int, int, int, int]]:
        """``(i0, i1, j0, j1)`` position ranges of the all-to-all rules (text rows and text
        columns)."""
        t, hi_end = self.text, self.text + self.hi_count
        return [(0, t, 0, hi_end), (t, hi_end, 0, t)]

    def density(self, device: torch.device | str | None = None) -> float:
        """Fraction of allowed (query, key) pairs, counted without an N x N tensor."""
        count = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in self.dense_rectangles())
        count += sum(i.numel() for i, _ in self.local_pairs(device))
        return count / max(self.length, 1) ** 2

    def block_map(self, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """``(ceil(N / block_q), ceil(N / block_k))`` bool: blocks holding any allowed pair."""
        n_qb, n_kb = -(-self.length // block_q), -(-self.length // block_k)
        active = torch.zeros(n_qb * n_kb, dtype=torch.bool, device=device)
        view = active.view(n_qb, n_kb)
        for i0, i1, j0, j1 in self.dense_rectangles():
            if i1 > i0 and j1 > j0:
                view[i0 // block_q:-(-i1 // block_q), j0 // block_k:-(-j1 // block_k)] = True
        for i, j in self.local_pairs(device):
            active[(i // block_q) * n_kb + j // block_k] = True
        return view


@torch.compiler.assume_constant_result
def _plan(key: tuple) -> tuple:
    """The work of a layout as ``(slices, groups)``. ``slices``: ``(r0, r1, j0, j1)`` runs of
    query rows whose active keys are the contiguous range ``[j0, j1)``, all allowed (one
    unmasked fused call, no gather). ``groups``: query blocks with equal row and key counts,
    ``(qpos (n, rows), kpos (n, S), patterns (u, rows, S), pattern (n,))``: query and key
    positions per block and its in-block token mask as an additive bias (0 allowed, -inf not;
    equal masks stored once, most blocks share a handful). Depends on the layout only, so it
    is cached (and a constant for ``torch.compile``)."""
    if key in _PLANS:
        return _PLANS[key]
    *fields, block_q, block_k, device, dtype = key
    layout = Layout(*fields)
    active = layout.block_map(block_q, block_k, device)
    tokens = layout.tokens(device)
    n = layout.length
    offsets = torch.arange(block_k, device=device)
    slices: list[tuple[int, int, int, int]] = []
    blocks: dict[tuple[int, int], list] = {}
    for qb in range(active.shape[0]):
        qpos = torch.arange(qb * block_q, min((qb + 1) * block_q, n), device=device)
        kpos = (torch.nonzero(active[qb]).flatten()[:, None] * block_k + offsets).flatten()
        kpos = kpos[kpos < n]
        allowed = layout.allowed(tokens, qpos[:, None], kpos[None, :])
        r0, r1, j0, j1 = int(qpos[0]), int(qpos[-1]) + 1, int(kpos[0]), int(kpos[-1]) + 1
        if j1 - j0 == kpos.numel() and bool(allowed.all()):
            if slices and slices[-1][1] == r0 and slices[-1][2:] == (j0, j1):
                r0 = slices.pop()[0]
            slices.append((r0, r1, j0, j1))
        else:
            blocks.setdefault((qpos.numel(), kpos.numel()), []).append((qpos, kpos, allowed))
    groups = []
    for members in blocks.values():
        patterns, pattern = [], []
        for _, _, allowed in members:
            same = next((u for u, a in enumerate(patterns) if torch.equal(a, allowed)), None)
            pattern.append(len(patterns) if same is None else same)
            if same is None:
                patterns.append(allowed)
        bias = torch.zeros(len(patterns), *allowed.shape, dtype=dtype, device=device)
        bias.masked_fill_(~torch.stack(patterns), float("-inf"))
        groups.append((torch.stack([m[0] for m in members]), torch.stack([m[1] for m in members]),
                       bias, torch.tensor(pattern, device=device)))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = (tuple(slices), tuple(groups))
    return _PLANS[key]


_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 16
_CHUNK = 1 << 22  # gathered key elements per fused call: a few MiB, so buffers are recycled


def _plan_key(layout: Layout, block_q: int, block_k: int, device: torch.device,
              dtype: torch.dtype) -> tuple:
    return (layout.text, layout.hi_count, layout.hi_width, layout.lo_count, layout.lo_width,
            layout.window, layout.radius, layout.lo_window, layout.lo_radius, layout.reach,
            layout.order, block_q, block_k, str(device), dtype)


def _attend(q, k, v, mask, key_ok, heads, scale, gqa):
    """Fused attention of ``q (c, B*Hq, rows, D)`` over ``k, v (c, B*Hkv, S, D|Dv)`` with
    ``mask (c, 1, rows, S)`` (additive, or None) and ``key_ok (c, B, S)`` (or None); a query
    row left with no key outputs 0."""
    if key_ok is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=gqa)
    chunk, batch, keys = key_ok.shape
    allowed = key_ok[:, :, None, None, :].expand(chunk, batch, heads, q.shape[2], keys)
    allowed = allowed.reshape(chunk, batch * heads, q.shape[2], keys)
    if mask is not None:
        allowed = allowed & (mask == 0)
    seen = allowed.any(dim=-1, keepdim=True)  # rows with no key: attend all, output 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen, scale=scale,
                                         enable_gqa=gqa)
    return out * seen


def hierarchical_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 layout: Layout, scale: float | None = None,
                                 key_padding_mask: torch.Tensor | None = None,
                                 block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> torch.Tensor:
    """Block-sparse attention over a Scale-DiT sequence ``(B, Hq, N, D)`` -> ``(B, Hq, N, Dv)``
    with ``N == layout.length`` (keys and values ``(B, Hkv, N, D|Dv)``, ``Hq % Hkv == 0``).

    Only the active ``block_q x block_k`` blocks of ``layout.block_map`` are computed, with
    fused ``scaled_dot_product_attention`` calls: query rows whose active keys are one fully
    allowed range attend a slice of it unmasked; the other query blocks are batched by size,
    their key blocks gathered, the in-block token mask applied as a bias, so the result
    equals dense masked softmax attention.
    ``key_padding_mask (B, N)``: True marks keys to ignore; a query seeing no key outputs 0.
    """
    batch, heads, n, dim = q.shape
    if layout.length != n or k.shape[2] != n:
        raise ValueError(f"layout describes {layout.length} tokens but q has {n} and k "
                         f"{k.shape[2]}; they must match")
    gqa = heads != k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    # Batch and heads folded into one dim (B*H, N, D): the blocks become the batch dim.
    qf, kf, vf = (x.to(acc).flatten(0, 1) for x in (q, k, v))
    key_ok = None if key_padding_mask is None else ~key_padding_mask
    result = new_empty(qf.shape[0], n, vf.shape[-1], like=qf)
    slices, groups = _plan(_plan_key(layout, block_q, block_k, q.device, acc))
    for r0, r1, j0, j1 in slices:
        ok = None if key_ok is None else key_ok[None, :, j0:j1]
        result[:, r0:r1] = _attend(qf[None, :, r0:r1], kf[None, :, j0:j1], vf[None, :, j0:j1],
                                   None, ok, heads, scale, gqa)[0]
    for qpos, kpos, patterns, pattern in groups:
        rows, keys = qpos.shape[1], kpos.shape[1]
        step = max(1, _CHUNK // (kf.shape[0] * keys * dim))
        for c0 in range(0, qpos.shape[0], step):
            qi, ki = qpos[c0:c0 + step].flatten(), kpos[c0:c0 + step].flatten()
            chunk = qi.numel() // rows
            qc, kc, vc = (x.index_select(1, i).view(x.shape[0], chunk, -1, x.shape[-1])
                          .transpose(0, 1) for x, i in ((qf, qi), (kf, ki), (vf, ki)))
            ok = None if key_ok is None else key_ok[:, ki].view(batch, chunk, keys).transpose(0, 1)
            mask = patterns.index_select(0, pattern[c0:c0 + step])[:, None]
            out = _attend(qc, kc, vc, mask, ok, heads, scale, gqa)  # (chunk, B*Hq, rows, Dv)
            result.index_copy_(1, qi, out.transpose(0, 1).reshape(result.shape[0], -1,
                                                                   result.shape[-1]))
    return result.view(batch, heads, n, result.shape[-1]).to(dtype)


def _layout_of(length: int, text: int, width: int, downsample: int, window: int, radius: int,
               lo_radius: int, order: str) -> Layout:
    return Layout.for_length(length, text=text, width=width, downsample=downsample,
                             window=window, radius=radius, lo_radius=lo_radius, order=order)


def _registry_attention(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None,
                        text=512, width=64, downsample=4, window=16, radius=8, lo_radius=2,
                        order="window_first", block_q=BLOCK_Q, block_k=BLOCK_K):
    """Scale-DiT hierarchical local attention on a sequence whose layout is derived from its
    length (:meth:`Layout.for_length`); see :func:`hierarchical_local_attention`."""
    layout = _layout_of(q.shape[2], text, width, downsample, window, radius, lo_radius, order)
    return hierarchical_local_attention(q, k, v, layout=layout, scale=scale,
                                        key_padding_mask=key_padding_mask, block_q=block_q,
                                        block_k=block_k)


def _allowed(q, key_padding_mask, text, width, downsample, window, radius, lo_radius, order):
    layout = _layout_of(q.shape[2], text, width, downsample, window, radius, lo_radius, order)
    return masks.with_key_padding(layout.token_mask(q.device), key_padding_mask)


def reference(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None,
              text=512, width=64, downsample=4, window=16, radius=8, lo_radius=2,
              order="window_first", block_q=BLOCK_Q, block_k=BLOCK_K):
    """Dense softmax attention with the layout's explicit ``(N, N)`` token mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _allowed(q, key_padding_mask, text, width, downsample, window, radius, lo_radius,
                       order)
    return masked_attention(q, k, v, allowed, scale)


def weights(q, k, *, causal=False, cross=False, scale=None, key_padding_mask=None,
            text=512, width=64, downsample=4, window=16, radius=8, lo_radius=2,
            order="window_first", block_q=BLOCK_Q, block_k=BLOCK_K):
    """The masked attention matrix ``(B, Hq, N, N)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _allowed(q, key_padding_mask, text, width, downsample, window, radius, lo_radius,
                       order)
    return masked_weights(q, k, allowed, scale)


MECHANISM = Mechanism(
    name="hierarchical_local",
    paper="scale_dit",
    summary="Scale-DiT: text | high-res 2-D windows | low-res global guide, block-sparse",
    fn=_registry_attention,
    reference=reference,
    weights=weights,
    patterns=frozenset({Pattern.NONCAUSAL_SELF}),
    exact=False,
    options=(
        Option("text", int, 512, "leading text tokens (clamped to the length)", low=0),
        Option("width", int, 64, "high-res grid width in tokens (low-res: width / downsample)",
               low=1),
        Option("downsample", int, 4, "high-res : low-res side ratio r; tokens split r^2 : 1",
               low=1),
        Option("window", int, 16, "high-res window side (tokens); low-res: window / downsample",
               low=1),
        Option("radius", int, 8, "high-res sliding-window radius (|drow|, |dcol| <= radius)",
               low=0),
        Option("lo_radius", int, 2, "low-res sliding-window radius", low=0),
        Option("order", str, "window_first", "token order of both grids", choices=ORDERS),
        Option("block_q", int, BLOCK_Q, "query rows per block of the block map", low=1),
        Option("block_k", int, BLOCK_K, "keys per block of the block map", low=1),
    ),
    test_options={"text": 5, "width": 12, "downsample": 2, "window": 4, "radius": 1,
                  "lo_radius": 1, "block_q": 16, "block_k": 8},
)
