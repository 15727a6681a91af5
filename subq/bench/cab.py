"""CAB's efficiency length (Zhang et al., ``cab``, arXiv 2210.07661).

Dense attention's cost is fitted by least squares with a quadratic ``a L^2 + b L + c`` and the
efficient mechanism's with a line ``d L + e``; the efficiency length is the larger root of

    a L^2 + (b - d) L + (c - e) = 0,

the length from which the mechanism is cheaper than dense attention. CAB fits the time line
on the points ``L >= 512`` (dropping its smallest length) and the memory line on all points.
The measured crossover is the first measured length at which the mechanism is cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def efficiency_length(lengths: Sequence[float], dense: Sequence[float],
                      mechanism: Sequence[float], line_from: float = 0) -> float | None:
    """The larger root of (quadratic fit of ``dense``) - (line fit of ``mechanism``).

    ``lengths``, ``dense`` and ``mechanism`` are aligned; the line uses the points with
    ``L >= line_from``. Returns ``None`` when fewer than 3 (quadratic) or 2 (line) points are
    given, when the fitted curves never cross, or when the larger root is not positive.
    """
    x = np.asarray(lengths, dtype=float)
    y_dense = np.asarray(dense, dtype=float)
    y_mech = np.asarray(mechanism, dtype=float)
    keep = x >= line_from
    if len(x) < 3 or keep.sum() < 2:
        return None
    a, b, c = np.polyfit(x, y_dense, 2)
    d, e = np.polyfit(x[keep], y_mech[keep], 1)
    if a == 0:
        return None if b == d else _positive((e - c) / (b - d))
    disc = (b - d) ** 2 - 4 * a * (c - e)
    if disc < 0:
        return None
    roots = ((-(b - d) + s * math.sqrt(disc)) / (2 * a) for s in (1, -1))
    return _positive(max(roots))


def _positive(root: float) -> float | None:
    return float(root) if root > 0 else None


def measured_crossover(lengths: Sequence[int], dense: Sequence[float],
                       mechanism: Sequence[float]) -> int | None:
    """The first measured length at which the mechanism costs less than dense attention."""
    for n, d, m in zip(lengths, dense, mechanism, strict=True):
        if m < d:
            return int(n)
    return None


#: How far past the longest measured length an extrapolated efficiency length is reported.
EXTRAPOLATION_FACTOR = 16


def efficiency_text(lengths: Sequence[int], dense: Sequence[float],
                    mechanism: Sequence[float], fitted: float | None) -> str:
    """The efficiency length as a reader needs it, from the measured points and CAB's fit:

    * ``"< L_min"`` when the mechanism is cheaper at every measured length;
    * ``"N (measured M)"`` when it becomes cheaper within the measured lengths (N the fit's
      root, M the first measured length where it is cheaper);
    * ``"> L_max (extrapolated: N)"`` when it is dearer at every measured length and the fits
      cross within ``EXTRAPOLATION_FACTOR`` x the longest length, ``"not within 16x L_max"``
      when they cross beyond that, ``"never"`` when they do not cross.
    """
    if not lengths:
        return "—"
    cheaper = [m < d for d, m in zip(dense, mechanism, strict=True)]
    if all(cheaper):
        return f"< {min(lengths):,}"
    crossover = measured_crossover(lengths, dense, mechanism)
    if crossover is not None:
        return f"{fitted:,.0f} (measured {crossover:,})" if fitted else f"{crossover:,}"
    longest = max(lengths)
    if fitted is None:
        return "never"
    if fitted <= EXTRAPOLATION_FACTOR * longest:
        return f"> {longest:,} (extrapolated: {fitted:,.0f})"
    return f"not within {EXTRAPOLATION_FACTOR}x {longest:,}"
