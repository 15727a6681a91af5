"""The explicit O(L^2) form of Combiner [combiner]: every variant written as a direct mask and
a list of regions, and the implied attention matrix materialised from them (paper Eq. 8-9):

    A_ij = 1[j in D_i] p~(j|i) + sum_{Omega seen by i} 1[j in Omega] p(j|Omega) p(Omega|i)

    p~(j|i), p(Omega|i)  = one softmax over [scale q_i.k_j (j in D_i) || scale q_i.k_Omega]
    p(j|Omega)           = softmax_{j in Omega}(scale q_Omega.k_j)
    q_Omega, k_Omega     = pool_{j in Omega} q_j, k_j   (Axial: the token's own q, k)

Nothing here is shared with the fast path (:mod:`subq.ops.combiner_fast`): the regions are
enumerated from their definitions as index sets over positions, the summaries pooled by
explicit masks. Shapes: q, k ``(B, H, L, D)`` with heads already matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import accumulation_dtype, masked_softmax


@dataclass(frozen=True)
class Regions:
    """``direct (L, L)``: j in D_i; ``members (R, L)``: j in Omega_r; ``visible (L, R)``: query
    i sees region r; ``token (R,)``: the position whose q and k summarise region r (Axial), or
    ``None`` when q and k are pooled over the members."""

    direct: torch.Tensor
    members: torch.Tensor
    visible: torch.Tensor
    token: torch.Tensor | None = None


def _relation(a: torch.Tensor, b: torch.Tensor, causal: bool) -> torch.Tensor:
    """``b < a`` (causal: strictly earlier) or ``b != a`` (non-causal: any other)."""
    return b < a if causal else b != a


def fixed_regions(length: int, span: int, causal: bool, device: torch.device) -> Regions:
    s = min(span, length)
    i = torch.arange(length, device=device)
    block = i // s
    ids = torch.arange(-(-length // s), device=device)
    direct = block[:, None] == block[None, :]
    if causal:
        direct = direct & (i[None, :] <= i[:, None])
    return Regions(direct, block[None, :] == ids[:, None],
                   _relation(block[:, None], ids[None, :], causal))


def logsparse_regions(length: int, causal: bool, device: torch.device) -> Regions:
    i = torch.arange(length, device=device)
    members, visible = [], []
    for level in range((length - 1).bit_length()):
        size = 1 << level
        ids = torch.arange(-(-length // size), device=device)
        own = i >> level
        members.append((i[None, :] >> level) == ids[:, None])
        seen = ids[None, :] == (own[:, None] ^ 1)
        if causal:
            seen = seen & (ids[None, :] < own[:, None])
        visible.append(seen)
    if not members:
        return Regions(torch.eye(length, dtype=torch.bool, device=device),
                       torch.zeros(0, length, dtype=torch.bool, device=device),
                       torch.zeros(length, 0, dtype=torch.bool, device=device))
    return Regions(torch.eye(length, dtype=torch.bool, device=device),
                   torch.cat(members, dim=0), torch.cat(visible, dim=1))


def axial_regions(length: int, span: int, causal: bool, device: torch.device) -> Regions:
    m = min(span, length)
    i = torch.arange(length, device=device)
    row, col = i // m, i % m
    same_row = row[:, None] == row[None, :]
    direct = same_row & (i[None, :] <= i[:, None]) if causal else same_row
    # Region g (a cell of the rows x m grid): the row of token t = min(g, L - 1), summarised by
    # token t's own query and key, seen through column g % m.
    grid = torch.arange(-(-length // m) * m, device=device)
    token = grid.clamp(max=length - 1)
    visible = (col[:, None] == (grid % m)[None, :]) & _relation(row[:, None], (grid // m)[None, :],
                                                                causal)
    return Regions(direct, row[token][:, None] == row[None, :], visible, token=token)


def mixture_regions(length: int, span: int, causal: bool, device: torch.device) -> Regions:
    m = min(span, length)
    i = torch.arange(length, device=device)
    row, col = i // m, i % m
    grid = torch.arange(-(-length // m) * m, device=device)
    g_row, g_col = grid // m, grid % m
    same_row = row[:, None] == row[None, :]
    same_col = col[:, None] == col[None, :]
    direct = (same_col & _relation(row[:, None], row[None, :], causal)) | (
        same_row & (i[None, :] <= i[:, None]) if causal else same_row)
    members, visible = [], []
    # Column g_col over the rows above (below) g_row, seen by row g_row's other columns.
    for below in (False,) if causal else (False, True):
        rows_in = row[None, :] > g_row[:, None] if below else row[None, :] < g_row[:, None]
        members.append((col[None, :] == g_col[:, None]) & rows_in)
        visible.append((row[:, None] == g_row[None, :]) & (col[:, None] != g_col[None, :]))
    # Row g_row left (right) of column g_col, seen by column g_col in the other rows.
    for right in (False, True):
        cols_in = col[None, :] > g_col[:, None] if right else col[None, :] < g_col[:, None]
        members.append((row[None, :] == g_row[:, None]) & cols_in)
        visible.append((col[:, None] == g_col[None, :])
                       & _relation(row[:, None], g_row[None, :], causal))
    members, visible = torch.cat(members, dim=0), torch.cat(visible, dim=1)
    nonempty = members.any(dim=-1)
    return Regions(direct, members[nonempty], visible[:, nonempty])


def regions(variant: str, length: int, span: int, causal: bool,
            device: torch.device) -> Regions:
    """The direct sets and regions of ``variant`` for a sequence of ``length`` tokens."""
    if variant == "fixed":
        return fixed_regions(length, span, causal, device)
    if variant == "logsparse":
        return logsparse_regions(length, causal, device)
    if variant == "axial":
        return axial_regions(length, span, causal, device)
    return mixture_regions(length, span, causal, device)


def _pool(x: torch.Tensor, members: torch.Tensor, summary: str) -> torch.Tensor:
    """``(B, H, L, D)`` pooled over each region's members ``(R, L)`` -> ``(B, H, R, D)``."""
    region, position = members.nonzero(as_tuple=True)
    b, h, _, d = x.shape
    src = x[:, :, position]
    index = region.view(1, 1, -1, 1).expand_as(src)
    empty = x.new_zeros(b, h, members.shape[0], d)
    return empty.scatter_reduce(2, index, src, "amax" if summary == "max" else "mean",
                                include_self=False)


def _parts(q: torch.Tensor, k: torch.Tensor, regions: Regions, scale: float, summary: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct weights ``(B, H, L, L)``, region weights ``(B, H, L, R)`` (one joint softmax) and
    within-region distributions ``(B, H, R, L)``, in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    if regions.token is not None:
        region_q, region_k = q[:, :, regions.token], k[:, :, regions.token]
    else:
        region_q = _pool(q, regions.members, summary)
        region_k = _pool(k, regions.members, summary)
    inner = masked_softmax(region_q @ k.transpose(-1, -2) * scale, regions.members)
    logits = torch.cat([q @ k.transpose(-1, -2), q @ region_k.transpose(-1, -2)], dim=-1)
    p = masked_softmax(logits * scale, torch.cat([regions.direct, regions.visible], dim=-1))
    length = q.shape[2]
    return p[..., :length], p[..., length:], inner


def implied_matrix(q: torch.Tensor, k: torch.Tensor, regions: Regions, scale: float,
                   summary: str) -> torch.Tensor:
    """``A = direct + region weights @ within-region distributions``, ``(B, H, L, L)``."""
    direct, region, inner = _parts(q, k, regions, scale, summary)
    return direct + region @ inner


def implied_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, regions: Regions,
                   scale: float, summary: str) -> torch.Tensor:
    """``A @ v`` summed as ``direct @ v + region weights @ (distributions @ v)`` (the same
    O(L^2) terms as :func:`implied_matrix`, without the L x R x L product)."""
    direct, region, inner = _parts(q, k, regions, scale, summary)
    v = v.to(direct.dtype)
    return direct @ v + region @ (inner @ v)
