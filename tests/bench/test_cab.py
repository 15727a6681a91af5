import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from subq.bench.cab import efficiency_length, efficiency_text, measured_crossover

DATA = Path(__file__).resolve().parents[1] / "data" / "cab_abc_cost.csv"


def _cab_costs() -> tuple[list[int], dict[tuple[str, str], list[float]]]:
    rows = [r for r in csv.reader(DATA.read_text().splitlines()) if r and not r[0].startswith("#")]
    lengths = [int(x) for x in rows[0][2:]]
    return lengths, {(r[0], r[1]): [float(x) for x in r[2:]] for r in rows[1:]}


def test_cab_golden_abc_efficiency_lengths():
    lengths, cost = _cab_costs()
    time_length = efficiency_length(lengths, cost["time_ms", "vanilla"], cost["time_ms", "abc"],
                                    line_from=512)
    memory_length = efficiency_length(lengths, cost["memory_mb", "vanilla"],
                                      cost["memory_mb", "abc"])
    assert round(time_length) == 1877
    assert round(memory_length) == 70


def test_efficiency_length_recovers_a_planted_crossover():
    a, slope = float(torch.rand(()) + 0.5), float(torch.rand(()) * 1000 + 500)
    lengths = np.array([256, 512, 1024, 2048, 4096], dtype=float)
    dense = a * lengths ** 2
    mechanism = slope * lengths
    assert efficiency_length(lengths, dense, mechanism) == pytest.approx(slope / a, rel=1e-6)
    assert measured_crossover(lengths, dense, mechanism) == next(
        int(n) for n in lengths if slope * n < a * n * n)


def test_no_crossover_when_the_mechanism_is_always_dearer():
    lengths = [1, 2, 3, 4]
    assert efficiency_length(lengths, [1, 2, 3, 4], [10, 20, 30, 40]) is None
    assert measured_crossover(lengths, [1, 2, 3, 4], [10, 20, 30, 40]) is None


def _quadratic_and_line(lengths, a, d, e):
    dense = [a * n * n for n in lengths]
    mech = [d * n + e for n in lengths]
    return dense, mech, efficiency_length(lengths, dense, mech)


def test_efficiency_text_reads_as_a_user_needs_it():
    lengths = [1024, 2048, 4096, 8192]
    # Cheaper everywhere: no extrapolated root, the honest "below the shortest length".
    dense, mech, fitted = _quadratic_and_line(lengths, 1e-6, 1e-4, 0.0)
    assert efficiency_text(lengths, dense, mech, fitted) == "< 1,024"
    # Crossing inside the measured range: the fit's root and the measured crossover.
    dense, mech, fitted = _quadratic_and_line(lengths, 1e-6, 3e-3, 0.0)  # root at 3000
    assert efficiency_text(lengths, dense, mech, fitted) == "3,000 (measured 4,096)"
    # Dearer everywhere, crossing within 16x the longest length: extrapolated, labelled.
    dense, mech, fitted = _quadratic_and_line(lengths, 1e-6, 5e-2, 0.0)  # root at 50,000
    assert efficiency_text(lengths, dense, mech, fitted) == "> 8,192 (extrapolated: 50,000)"
    # Crossing far past that: not reported as a number.
    dense, mech, fitted = _quadratic_and_line(lengths, 1e-6, 1.0, 0.0)  # root at 1e6
    assert efficiency_text(lengths, dense, mech, fitted) == "not within 16x 8,192"
    # Fits that never cross.
    dense = [1.0 - 1e-9 * n * n for n in lengths]
    mech = [2.0 + 1e-3 * n for n in lengths]
    assert efficiency_text(lengths, dense, mech, efficiency_length(lengths, dense, mech)) \
        == "never"
