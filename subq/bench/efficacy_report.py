"""The efficacy grid's report (:mod:`subq.bench.efficacy`): ``OUT/efficacy.json`` (every number
and curve point), ``OUT/efficacy.md`` (the table a user reads first) and the plots:
held-out bits per byte against steps, against the evaluation length, and against training
throughput (the quality/speed frontier), and the training loss of every seed of the entries
that train several.

Per entry: held-out bits per byte at the training length L and at 2L and 4L (the mean over
its finished seeds), the gap to dense at each, parameters, training tokens/s (median of the
logged windows, median over seeds), peak resident memory of the training process (the
largest over its chunks, from ``wait4``), and wall time.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..recipes.lm import TRAINER_DEFAULTS as LM_TRAINER
from ..recipes.trainer import read_metrics
from .docs_section import write_section
from .efficacy import RESULT, Budget, Entry, read_rusage, run_name

IMAGES = {"curves": "efficacy_curves.png", "lengths": "efficacy_lengths.png",
          "frontier": "efficacy_frontier.png", "seeds": "efficacy_seeds.png"}


def _run_summary(folder: Path, seq_len: int) -> dict[str, Any]:
    metrics = read_metrics(folder)
    evals = [m for m in metrics if "split" in m]
    losses = [m for m in metrics if "loss" in m]
    final = max((e["step"] for e in evals), default=None)
    rusage = read_rusage(folder)
    speeds = [m["tokens_per_s"] for m in losses]
    return {
        "finished": (folder / RESULT).exists(),
        "step": final,
        "valid": {e["length"]: e["bpb"] for e in evals
                  if e["step"] == final and e["split"] == "valid"},
        "train": next((e["bpb"] for e in evals if e["step"] == final and e["split"] == "train"),
                      None),
        "curve": [(e["step"], e["bpb"]) for e in evals
                  if e["split"] == "valid" and e["length"] == seq_len],
        "loss": [(m["step"], m["loss"]) for m in losses],
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_rss_mib": max((r["max_rss_mib"] for r in rusage), default=None),
        "wall_s": sum(r["wall_s"] for r in rusage),
        "parameters": (json.loads((folder / RESULT).read_text()).get("parameters")
                       if (folder / RESULT).exists() else None),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def collect(out: Path, grid: Sequence[Entry]) -> dict[str, Any]:
    """Every entry's numbers from ``OUT/runs``; entries with no finished seed are listed with
    ``status`` "unfinished" (or "missing" when no run was started)."""
    out = Path(out)
    budget = Budget(**json.loads((out / "budget.json").read_text()))
    lengths = [budget.seq_len * m for m in (1, 2, 4)]
    rows = []
    for entry in grid:
        seeds = {seed: _run_summary(out / "runs" / run_name(entry, seed), budget.seq_len)
                 for seed in entry.seeds
                 if (out / "runs" / run_name(entry, seed)).exists()}
        done = {s: r for s, r in seeds.items() if r["finished"]}
        status = "finished" if len(done) == len(entry.seeds) else (
            "partial" if done else "unfinished" if seeds else "missing")
        speeds = [r["tokens_per_s"] for r in done.values() if r["tokens_per_s"]]
        rows.append({
            "name": entry.name, "mixer": entry.mixer, "options": entry.options,
            "note": entry.note, "transplant": entry.transplant, "status": status,
            "seeds": sorted(done), "parameters": next(
                (r["parameters"] for r in done.values() if r["parameters"]), None),
            "bpb": {str(n): _mean([r["valid"][n] for r in done.values() if n in r["valid"]])
                    for n in lengths},
            "train_bpb": _mean([r["train"] for r in done.values() if r["train"] is not None]),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "peak_rss_mib": max((r["peak_rss_mib"] for r in done.values()
                                 if r["peak_rss_mib"] is not None), default=None),
            "wall_s": sum(r["wall_s"] for r in done.values()),
            "per_seed": {str(s): {"bpb": {str(n): b for n, b in r["valid"].items()},
                                  "curve": r["curve"], "loss": r["loss"], "step": r["step"]}
                         for s, r in seeds.items()},
        })
    dense = next((r for r in rows if r["name"] == "dense"), None)
    for row in rows:
        row["gap_to_dense"] = {n: (None if dense is None or row["bpb"][n] is None
                                   or dense["bpb"][n] is None
                                   else row["bpb"][n] - dense["bpb"][n]) for n in row["bpb"]}
    from .run import host_info

    return {"created": dt.datetime.now().isoformat(timespec="seconds"), "budget": vars(budget)
            | {"tokens": budget.tokens}, "lengths": lengths, "machine": host_info(),
            "rows": rows}


def _fmt(value: float | None, spec: str = ".3f", signed: bool = False) -> str:
    if value is None:
        return "—"
    return format(value, ("+" if signed else "") + spec)


def render_markdown(results: dict[str, Any], image_prefix: str = "") -> str:
    """The table (best held-out bits per byte at the training length first), the budget, the
    machine and the plots."""
    b, m = results["budget"], results["machine"]
    n1, n2, n4 = (str(n) for n in results["lengths"])
    rows = sorted(results["rows"], key=lambda r: (r["bpb"][n1] is None, r["bpb"][n1] or 0))
    lines = [
        "# subq efficacy: the byte LM with every mixer, equal parameters and tokens", "",
        f"{results['created']} · {m['cpu']} · torch {m['torch']} · subq {m['subq']} · commit "
        f"{(m.get('git_commit') or 'unknown')[:10]}", "",
        f"Budget per run: preset `{b['preset']}`, {b['steps']:,} steps of {b['batch']} x "
        f"{b['seq_len']} bytes ({b['tokens']:,} training bytes), AdamW lr {b['lr']:g} "
        f"(warm-up {LM_TRAINER.warmup} steps, cosine to {LM_TRAINER.min_lr_ratio:.0%}, weight "
        f"decay {LM_TRAINER.weight_decay:g}, clipping at {LM_TRAINER.grad_clip:g}), seed 0 "
        f"unless stated, evaluation every {b['eval_every']} steps on "
        f"{b['eval_bytes']:,} held-out bytes at each length; corpus "
        f"{b['text'] or 'Python documentation (python3.11-doc)'}. Bits per byte (lower is "
        "better), the mean over an entry's seeds; gap: the entry minus dense; wall: summed "
        "over the seeds; tokens/s: median over the logged windows and the seeds, on whatever "
        "else the machine ran at the time.", "",
        f"| mixer | parameters | held-out @ {n1} | @ {n2} | @ {n4} | gap @ {n1} | gap @ {n4} "
        "| train @ " + n1 + " | tokens/s | peak RSS (MiB) | wall (s) | seeds | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gap_to_dense"]
        lines.append(
            f"| `{r['name']}` | {_fmt(r['parameters'], ',')} | {_fmt(r['bpb'][n1])} | "
            f"{_fmt(r['bpb'][n2])} | {_fmt(r['bpb'][n4])} | {_fmt(g[n1], '.3f', True)} | "
            f"{_fmt(g[n4], '.3f', True)} | {_fmt(r['train_bpb'])} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_rss_mib'], ',.0f')} | "
            f"{r['wall_s']:,.0f} | {len(r['seeds'])} | {r['status']} |")
    lines += ["", "Entries:", ""]
    lines += [f"* `{r['name']}`: {r['note']}" + (f" (options {r['options']})"
                                                  if r["options"] else "")
              for r in results["rows"]]
    multi = [r for r in results["rows"] if len(r["per_seed"]) > 1]
    if multi:
        lines += ["", f"Per seed, held-out @ {n1}:", "", "| mixer | " + " | ".join(
            f"seed {s}" for s in sorted({s for r in multi for s in r["per_seed"]})) + " |"]
        seeds = sorted({s for r in multi for s in r["per_seed"]})
        lines.append("|---|" + "---|" * len(seeds))
        for r in multi:
            lines.append(f"| `{r['name']}` | " + " | ".join(
                _fmt(r["per_seed"].get(s, {}).get("bpb", {}).get(n1)) for s in seeds) + " |")
    lines += [""] + [f"![{name}]({image_prefix}{file})" for name, file in IMAGES.items()]
    return "\n".join(lines) + "\n"


def _legend(ax, **options) -> None:
    """A grid, and a legend where something was drawn."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **options)


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """The four PNGs of :data:`IMAGES` under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results["rows"] if r["seeds"]]
    n1 = str(results["lengths"][0])
    paths = []

    def save(fig, key):
        fig.tight_layout()
        path = folder / IMAGES[key]
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        curve = r["per_seed"][str(r["seeds"][0])]["curve"]
        if len(curve) > 1:
            ax.plot(*zip(*curve, strict=True), marker="o", ms=3, label=r["name"])
    ax.set(xlabel="step", ylabel=f"held-out bits per byte @ {n1}", title="held-out bpb "
           "against steps (first seed)")
    _legend(ax, ncol=2)
    save(fig, "curves")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        points = [(int(n), b) for n, b in r["bpb"].items() if b is not None]
        ax.plot(*zip(*points, strict=True), marker="o", label=r["name"])
    ax.set(xlabel="evaluation length (bytes)", ylabel="held-out bits per byte", xscale="log",
           title="length extrapolation (trained at the first length)")
    ax.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
    ax.minorticks_off()
    _legend(ax, ncol=2)
    save(fig, "lengths")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["tokens_per_s"] and r["bpb"][n1] is not None:
            ax.scatter(r["tokens_per_s"], r["bpb"][n1])
            ax.annotate(r["name"], (r["tokens_per_s"], r["bpb"][n1]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="training tokens/s (one thread)", ylabel=f"held-out bits per byte @ {n1}",
           title="quality against training speed")
    ax.grid(alpha=0.3)
    save(fig, "frontier")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results["rows"]:
        if len(r["per_seed"]) > 1:
            for s, run in sorted(r["per_seed"].items()):
                if run["loss"]:
                    ax.plot(*zip(*run["loss"], strict=True), lw=0.7,
                            label=f"{r['name']} seed {s}")
    ax.set(xlabel="step", ylabel="training loss (nats per byte)",
           title="training loss of every seed")
    _legend(ax)
    save(fig, "seeds")
    return paths


#: ``docs/efficacy.md`` keeps its prose; the generated report goes between these markers.
DOCS_MARKERS = ("<!-- efficacy-report:start -->", "<!-- efficacy-report:end -->")


def write_docs(results: dict[str, Any], docs: Path) -> Path:
    """The report into ``docs/efficacy.md`` between :data:`DOCS_MARKERS` (the page is created
    with them when missing), the plots into ``docs/img``, the numbers into
    ``docs/data/efficacy.json``."""
    write_plots(results, docs / "img")
    (docs / "data").mkdir(parents=True, exist_ok=True)
    (docs / "data" / "efficacy.json").write_text(json.dumps(results, indent=1) + "\n")
    report = render_markdown(results, image_prefix="img/").replace("# ", "## ", 1)
    return write_section(docs / "efficacy.md", DOCS_MARKERS, report)


def write_report(out: Path, grid: Sequence[Entry], docs: Path | None = None) -> Path:
    """``OUT/efficacy.json``, ``OUT/efficacy.md`` and the plots; with ``docs`` also
    :func:`write_docs`."""
    out = Path(out)
    results = collect(out, grid)
    (out / "efficacy.json").write_text(json.dumps(results, indent=1) + "\n")
    write_plots(results, out)
    path = out / "efficacy.md"
    path.write_text(render_markdown(results))
    if docs is not None:
        write_docs(results, docs)
    return path
