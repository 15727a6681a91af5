"""Combiner [combiner]: full attention at sparse cost (Ren et al., NeurIPS 2021).

Every query i reaches every key of its support (causal: ``j <= i``, else all j), either
directly or through a region summary, with ONE joint softmax (paper Eq. 8-9):

    out_i = sum_{j in D_i} p~(j|i) v_j
            + sum_{Omega in R_i} p(Omega|i) sum_{j in Omega} p(j|Omega) v_j

    [p~(.|i) || p(.|i)] = softmax([scale q_i.k_j, j in D_i || scale q_i.k_Omega, Omega in R_i])
    p(j|Omega)          = softmax_{j in Omega}(scale q_Omega.k_j)    (computed once per region)
    q_Omega, k_Omega    = maxpool_{j in Omega} q_j, k_j              (``summary="mean"``: mean)

so each row of the implied matrix ``A`` sums to 1, is positive on the whole support, and is
rank-1 over a region. Variants (causal form; the non-causal one takes both sides):

* ``fixed``: spans of ``span`` tokens; D_i = own span (``j <= i``), R_i = earlier spans.
* ``logsparse``: D_i = {i}; R_i = the dyadic blocks tiling [0, i) (non-causal: the siblings of
  i's aligned blocks at every level, both sides).
* ``axial``: rows of ``span`` columns; D_i = own row (columns ``<= c``); region (r', c) for each
  earlier row r' has key ``k[r', c]`` and value the full row-r' attention output at column c
  (the official ``row_summary='none'``; the learned ``'proj'`` summary belongs in ``subq.nn``).
* ``mixture``: D_i = own row (``<= c``) and own column (earlier rows); regions: every other
  column above row r, and every earlier row left of c and right of c (non-causal: also
  columns below r and rows below). Non-causal Fixed and Axial exclude the query's own span/row
  from the regions, as the paper does (the official TF code covers it twice). A short last
  row (L not a multiple of ``span``) is seen from its missing columns through its last token.

Options: ``variant="fixed"``, ``span=128`` (span of Fixed, row length of Axial/Mixture: the
official code's 128; ``None``: ``ceil(sqrt(L))``, the span that balances the two costs, but
then the pattern, and so a causal row's output, depends on the total length L: a prefix
computed alone differs from the same prefix inside a longer sequence), ``summary="max"``.
Cost O(L (span + L/span)) (Logsparse O(L log L)); never an L x L tensor. Patterns:
noncausal self, causal self. Cross attention is not defined (the summaries pool queries at
key positions); ``key_padding_mask`` is not supported. Shapes: q ``(B, Hq, L, D)``,
k ``(B, Hkv, L, D)``, v ``(B, Hkv, L, Dv)``.
"""

from __future__ import annotations

import math

import torch

from ..registry import SELF_PATTERNS, Mechanism, Option
from . import combiner_fast
from .combiner_regions import implied_matrix, implied_output, regions
from .common import accumulation_dtype, repeat_kv

VARIANTS = ("fixed", "logsparse", "axial", "mixture")
#: The official code's span: fixed, so that a causal output never depends on later tokens or
#: on the total length.
DEFAULT_SPAN = 128


def default_span(length: int) -> int:
    """``ceil(sqrt(L))``, at least 1: the span that balances direct and region logits."""
    root = math.isqrt(max(length, 1))
    return root if root * root >= length else root + 1


def _checked(key_padding_mask: torch.Tensor | None, cross: bool) -> None:
    if key_padding_mask is not None:
        raise NotImplementedError(
            "combiner does not support key_padding_mask: its region summaries max-pool whole "
            "spans, so a padding key would still shape the summary of its region")
    if cross:
        raise NotImplementedError(
            "combiner does not support cross attention: region summaries pool the queries at "
            "the region's key positions, which do not exist when queries and keys differ")


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       causal: bool = False, cross: bool = False, scale: float | None = None,
                       key_padding_mask: torch.Tensor | None = None, variant: str = "fixed",
                       span: int | None = DEFAULT_SPAN, summary: str = "max") -> torch.Tensor:
    """Combiner attention, the sub-quadratic fast path (see the module docstring).

    ``q (B, Hq, L, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` -> ``(B, Hq, L, Dv)``.
    """
    _checked(key_padding_mask, cross)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    span = default_span(length) if span is None else span
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(acc), repeat_kv(k, groups).to(acc), repeat_kv(v, groups).to(acc)
    if variant == "fixed":
        out = combiner_fast.fixed(q, k, v, causal, scale, span, summary)
    elif variant == "logsparse":
        out = combiner_fast.logsparse(q, k, v, causal, scale, summary)
    elif variant == "axial":
        out = combiner_fast.axial(q, k, v, causal, scale, span)
    else:
        out = combiner_fast.mixture(q, k, v, causal, scale, span, summary)
    return out.to(dtype)


def weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, cross: bool = False,
            scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
            variant: str = "fixed", span: int | None = DEFAULT_SPAN, summary: str = "max"
            ) -> torch.Tensor:
    """The implied attention matrix ``A (B, Hq, L, L)``: direct weights plus region weight x
    within-region distribution, materialised from the regions' definitions."""
    _checked(key_padding_mask, cross)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    span = default_span(length) if span is None else span
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    return implied_matrix(q, k, regions(variant, length, span, causal, q.device), scale, summary)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              cross: bool = False, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, variant: str = "fixed",
              span: int | None = DEFAULT_SPAN, summary: str = "max") -> torch.Tensor:
    """``A @ v`` for the implied matrix of :func:`weights`: the O(L^2) explicit Combiner."""
    _checked(key_padding_mask, cross)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    span = default_span(length) if span is None else span
    groups = q.shape[1] // k.shape[1]
    out = implied_output(q, repeat_kv(k, groups), repeat_kv(v, groups),
                         regions(variant, length, span, causal, q.device), scale, summary)
    return out.to(q.dtype)


MECHANISM = Mechanism(
    name="combiner",
    paper="combiner",
    summary="full-support attention, direct keys + region summaries in one softmax, "
            "O(L (s + L/s)), span s = 128",
    fn=combiner_attention,
    reference=reference,
    weights=weights,
    patterns=SELF_PATTERNS,
    exact=False,
    options=(
        Option("variant", str, "fixed", "factorisation: fixed, logsparse, axial or mixture",
               choices=VARIANTS),
        Option("span", int, DEFAULT_SPAN, "span length (fixed) / row length (axial, "
               "mixture), the official 128; None: ceil(sqrt(L)), which makes a causal output "
               "depend on the total length; logsparse ignores it", low=1, nullable=True),
        Option("summary", str, "max", "pooling of region keys and queries (axial uses the "
               "token's own)", choices=("max", "mean")),
    ),
    # Mean summaries keep the contract's finite-difference gradcheck away from max-pool ties;
    # tests/ops/test_combiner.py holds every variant with max summaries to the reference.
    test_options={"variant": "mixture", "span": 8, "summary": "mean"},
)
