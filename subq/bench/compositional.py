"""CAB's compositional index (Zhang et al. 2023, "CAB: Comprehensive Attention Benchmarking on
Long Sequence Modeling", spec ``cab.md``): one number per method and attention pattern that
averages standardised metrics of different tasks::

    z_m   = w_m (x_m - mu_m) / sigma_m          w_m = +1 (higher is better) or -1 (lower)
    task  = mean of z_m over the task's metrics
    index = mean of the task scores over the pattern's tasks

CAB fixes ``mu_m, sigma_m`` per pattern (its leaderboard's constants: :data:`CAB_METRICS`);
:func:`population_metrics` takes them from the methods being compared instead (mean and
population standard deviation over them), which is what subq's efficacy report does for its
own tasks, so the index says how many standard deviations a method stands above the field.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric of a task: its ``name``, the ``task`` it belongs to, whether higher is
    better, and the standardising constants ``mu`` and ``sigma``."""

    name: str
    task: str
    higher_is_better: bool
    mu: float
    sigma: float


def task_scores(scores: Mapping[str, float], metrics: Sequence[Metric]) -> dict[str, float]:
    """The mean standardised score of each task over its metrics present in ``scores``."""
    by_task: dict[str, list[float]] = {}
    for m in metrics:
        if m.name not in scores:
            continue
        if m.sigma <= 0:
            raise ValueError(f"metric {m.name!r} has sigma {m.sigma}; it must be > 0")
        sign = 1.0 if m.higher_is_better else -1.0
        by_task.setdefault(m.task, []).append(sign * (scores[m.name] - m.mu) / m.sigma)
    return {task: statistics.fmean(values) for task, values in by_task.items()}


def compositional_index(scores: Mapping[str, float], metrics: Sequence[Metric]) -> float:
    """The index of one method: the mean over tasks of :func:`task_scores`. ``ValueError``
    when a metric is missing from ``scores`` (CAB scores a method on all of a pattern's
    tasks)."""
    missing = [m.name for m in metrics if m.name not in scores]
    if missing:
        raise ValueError(f"scores lack the metrics {missing}")
    return statistics.fmean(task_scores(scores, metrics).values())


def population_metrics(rows: Mapping[str, Mapping[str, float]],
                       template: Sequence[tuple[str, str, bool]]) -> list[Metric]:
    """Metrics ``(name, task, higher_is_better)`` standardised over ``rows`` (method ->
    scores): ``mu`` the mean and ``sigma`` the population standard deviation of each metric
    over the methods that have it (``sigma`` 1 when they all agree)."""
    metrics = []
    for name, task, higher in template:
        values = [row[name] for row in rows.values() if name in row]
        if not values:
            raise ValueError(f"no method has the metric {name!r}")
        sigma = statistics.pstdev(values) if len(values) > 1 else 0.0
        metrics.append(Metric(name, task, higher, statistics.fmean(values), sigma or 1.0))
    return metrics


def _cab(names: str, tasks: Sequence[tuple[str, Sequence[int]]], signs: str,
         mu: Sequence[float], sigma: Sequence[float]) -> list[Metric]:
    task_of = {i: task for task, indices in tasks for i in indices}
    return [Metric(name, task_of[i], sign == "+", m, s)
            for i, (name, sign, m, s) in enumerate(zip(names.split(), signs, mu, sigma,
                                                       strict=True))]


CAB_METRICS: dict[str, list[Metric]] = {
    "noncausal_self": _cab(
        "fs2_mcd fs2_msd ttts_mcd ttts_msd rouge1 rouge2 rougeL psnr ssim mlm_ppl",
        [("tts", range(4)), ("summarization", (4, 5, 6)), ("super_resolution", (7, 8)),
         ("mlm", (9,))], "----+++++-",
        [3.4245, 1.97429, 4.06947, 2.19021, 34.88667, 6.79333, 31.96889, 23.208, 0.6758,
         36.292],
        [0.06832, 0.0361768, 0.09422, 0.03866, 1.39697, 1.41078, 1.31499, 0.27499, 0.01557,
         62.30827]),
    "causal_self": _cab(
        "ttts_mcd ttts_msd rouge1 rouge2 rougeL lm_ppl",
        [("tts", (0, 1)), ("summarization", (2, 3, 4)), ("lm", (5,))], "--+++-",
        [4.08325, 2.20085, 32.9575, 6.0925, 30.2575, 22.26],
        [0.04529, 0.01372, 1.92754, 0.41007, 1.61951, 8.29944]),
    "noncausal_cross": _cab(
        "cd_l1 cd_l2 f_score ett_mse ett_mae ecl_mse ecl_mae weather_mse weather_mae",
        [("point_cloud", (0, 1, 2)), ("forecasting", range(3, 9))], "--+------",
        [7.7025, 0.24775, 0.7625, 1.18933, 0.80625, 0.47575, 0.511, 0.62025, 0.58075],
        [0.64789, 0.03366, 0.03906, 0.05615, 0.02193, 0.01057, 0.00601, 0.18948, 0.10312]),
    "causal_cross": _cab(
        "ttts_mcd ttts_msd rouge1 rouge2 rougeL",
        [("tts", (0, 1)), ("summarization", (2, 3, 4))], "--+++",
        [5.5037, 2.6278, 31.35, 5.26, 28.8],
        [1.29239, 0.42726, 3.77103, 1.26028, 3.28638]),
}
"""CAB's leaderboard constants per attention pattern (its ``compositional_index.py``)."""


__all__ = ["CAB_METRICS", "Metric", "compositional_index", "population_metrics", "task_scores"]
