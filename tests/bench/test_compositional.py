"""CAB's compositional index (subq/bench/compositional.py): CAB's own leaderboard rows for
vanilla attention recomputed from its raw scores and constants, and the population form
subq's report uses."""

from __future__ import annotations

import random

import pytest

from subq.bench.compositional import (
    CAB_METRICS,
    Metric,
    compositional_index,
    population_metrics,
    task_scores,
)


def _scores(pattern: str, raw: str) -> dict[str, float]:
    return dict(zip((m.name for m in CAB_METRICS[pattern]), map(float, raw.split()),
                    strict=True))


def test_cab_vanilla_rows_noncausal_and_causal_cross():
    """CAB's example.txt raw scores of vanilla attention give its leaderboard rows: NC
    0.449 / 0.744 -> 0.597, CC 1.047 / 0.867 -> 0.957."""
    nc = _scores("noncausal_cross", "7.425 0.231 0.779 1.138167 0.77467 0.478 0.508 0.449 0.4855")
    tasks = task_scores(nc, CAB_METRICS["noncausal_cross"])
    assert tasks["point_cloud"] == pytest.approx(0.449, abs=5e-4)
    assert tasks["forecasting"] == pytest.approx(0.744, abs=5e-4)
    assert compositional_index(nc, CAB_METRICS["noncausal_cross"]) == pytest.approx(0.597, abs=5e-4)
    cc = _scores("causal_cross", "4.0953 2.1985 34.61 6.35 31.66")
    tasks = task_scores(cc, CAB_METRICS["causal_cross"])
    assert tasks["tts"] == pytest.approx(1.047, abs=5e-4)
    assert tasks["summarization"] == pytest.approx(0.867, abs=5e-4)
    assert compositional_index(cc, CAB_METRICS["causal_cross"]) == pytest.approx(0.957, abs=5e-4)


def test_cab_vanilla_row_noncausal_self():
    """NS: TTS -0.301, summarisation -0.249, super-resolution -0.077, MLM 0.528 -> -0.025."""
    ns = _scores("noncausal_self", "3.4748 1.9735 4.0953 2.1985 34.61 6.35 31.66 23.18 0.675 3.42")
    tasks = task_scores(ns, CAB_METRICS["noncausal_self"])
    assert tasks["summarization"] == pytest.approx(-0.249, abs=5e-4)
    assert tasks["super_resolution"] == pytest.approx(-0.077, abs=5e-4)
    assert tasks["mlm"] == pytest.approx(0.528, abs=5e-4)
    assert tasks["tts"] == pytest.approx(-0.301, abs=5e-4)
    assert compositional_index(ns, CAB_METRICS["noncausal_self"]) == pytest.approx(-0.025,
                                                                                   abs=5e-4)


def test_signs_and_averaging_by_hand():
    metrics = [Metric("acc", "vision", True, 0.8, 0.1), Metric("bpb", "lm", False, 2.0, 0.5),
               Metric("ppl", "lm", False, 10.0, 2.0)]
    scores = {"acc": 0.9, "bpb": 1.5, "ppl": 14.0}
    # vision: +1; lm: mean(+1, -2) = -0.5; index: mean(1, -0.5) = 0.25
    assert task_scores(scores, metrics) == {"vision": pytest.approx(1.0),
                                            "lm": pytest.approx(-0.5)}
    assert compositional_index(scores, metrics) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ppl"):
        compositional_index({"acc": 0.9, "bpb": 1.5}, metrics)


def test_population_constants_centre_the_field():
    rng = random.Random(7)
    rows = {f"m{i}": {"acc": rng.uniform(0.7, 0.9), "bpb": rng.uniform(1.5, 3.0)}
            for i in range(6)}
    rows["dominant"] = {"acc": 0.95, "bpb": 1.2}  # best on both tasks
    metrics = population_metrics(rows, [("acc", "vision", True), ("bpb", "lm", False)])
    acc = [row["acc"] for row in rows.values()]
    assert metrics[0].mu == pytest.approx(sum(acc) / len(acc))
    indices = {m: compositional_index(row, metrics) for m, row in rows.items()}
    assert sum(indices.values()) == pytest.approx(0.0, abs=1e-12)  # z-scores sum to 0
    assert max(indices, key=indices.get) == "dominant"
    with pytest.raises(ValueError, match="sigma"):
        task_scores({"x": 1.0}, [Metric("x", "t", True, 0.0, 0.0)])
