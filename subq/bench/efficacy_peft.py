"""NTK-Attention as parameter-efficient fine-tuning against LoRA, prefix tuning and full
fine-tuning of SmolLM2-135M (``subq train peft``), one fresh process per run (the LM grid's
runner, :func:`subq.bench.efficacy.run_grid`), and the report: trainable parameters, the
final score, seconds per step and peak memory per method and task, the curves, and NTK
against prefix tuning as the prefix grows.

Grid (:data:`PEFT_GRID`), every entry on the same steps, batch, data and seed:

* ``lookup`` (exact match): NTK; LoRA at the rank matched to NTK's count (20) and at 64;
  prefix tuning at the matched length (98) and at 8, 64 and 512 tokens (the prefix-length
  claim: NTK stands for a prefix of any length in ``Hq (d^2 + d)`` numbers); full fine-tuning.
* ``domain`` (held-out perplexity on Python's documentation): NTK, LoRA at both ranks, the
  matched prefix, full fine-tuning.

``subq bench efficacy --tasks peft`` runs it into ``OUT/peft``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipes.trainer import read_metrics
from .docs_section import write_section
from .efficacy import RESULT, read_rusage, run_name


@dataclass(frozen=True)
class PeftEntry:
    """One fine-tune of the grid: ``method`` on ``task`` with ``options`` (``rank``,
    ``prefix_length``; absent: matched to NTK's count)."""

    name: str
    task: str
    method: str
    options: dict[str, int] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    note: str = ""
    transplant: None = None


PEFT_GRID: tuple[PeftEntry, ...] = tuple(
    entry for task in ("lookup", "domain") for entry in (
        PeftEntry(f"{task}-ntk", task, "ntk", note="NTK-Attention, every layer"),
        PeftEntry(f"{task}-lora", task, "lora", note="LoRA on q and v, rank matched to NTK"),
        PeftEntry(f"{task}-lora-r64", task, "lora", {"rank": 64}, note="LoRA, rank 64"),
        PeftEntry(f"{task}-prefix", task, "prefix", note="prefix tuning, length matched to "
                  "NTK"),
        *(PeftEntry(f"{task}-prefix-{m}", task, "prefix", {"prefix_length": m},
                    note=f"prefix tuning, {m} tokens") for m in (8, 64, 512)
          if task == "lookup"),
        PeftEntry(f"{task}-full", task, "full", note="full fine-tuning"),
    ))


@dataclass(frozen=True)
class PeftBudget:
    """What every run gets: steps, rows per step of each task, the domain task's window, the
    evaluation cadence and size (held-out lookup examples, held-out tokens), and the corpus;
    each method its recipe's learning rate (:data:`subq.recipes.peft.METHOD_LR`)."""

    steps: int = 150
    lookup_batch: int = 16
    domain_batch: int = 8
    seq_len: int = 128
    eval_every: int = 50
    eval_examples: int = 256
    eval_tokens: int = 16384
    text: str | None = None

    def command(self, entry: PeftEntry, seed: int, out: Path, chunk: float | None,
                source: Path | None = None) -> list[str]:
        """The ``subq train peft`` command of one run (resumes from ``out``)."""
        batch = self.lookup_batch if entry.task == "lookup" else self.domain_batch
        cmd = [sys.executable, "-m", "subq", "train", "peft", "--method", entry.method,
               "--task", entry.task, "--steps", str(self.steps), "--batch", str(batch),
               "--seq-len", str(self.seq_len), "--seed", str(seed), "--eval-every",
               str(self.eval_every), "--eval-examples", str(self.eval_examples),
               "--eval-tokens", str(self.eval_tokens), "--checkpoint-every", "25",
               "--log-every", "5",
               "--no-progress", "--resume", "--out", str(out)]
        for name, value in entry.options.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        if self.text is not None:
            cmd += ["--text", self.text]
        if chunk is not None:
            cmd += ["--time-limit", repr(float(chunk))]
        return cmd


SCORE = {"lookup": ("exact_match", True), "domain": ("perplexity", False)}
"""Each task's score and whether higher is better."""


def _run_summary(folder: Path, task: str) -> dict[str, Any]:
    metric, _ = SCORE[task]
    metrics = read_metrics(folder)
    evals = [m for m in metrics if m.get("split") == "valid"]
    steps = [m for m in metrics if "tokens_per_s" in m]
    rusage = read_rusage(folder)
    finished = (folder / RESULT).exists()
    config = _saved_config(folder)
    return {"finished": finished, "score": evals[-1][metric] if finished and evals else None,
            "nll": evals[-1]["nll"] if finished and evals else None,
            "start": evals[0][metric] if evals and evals[0]["step"] == 0 else None,
            "curve": [(e["step"], e[metric]) for e in evals],
            "nll_curve": [(e["step"], e["nll"]) for e in evals],
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps
            else None,
            "seconds_per_step": config.get("seconds_per_step"),
            "trainable": config.get("trainable"),
            "peak_rss_mib": max((r["max_rss_mib"] for r in rusage), default=None),
            "wall_s": sum(r["wall_s"] for r in rusage)}


def _saved_config(folder: Path) -> dict[str, Any]:
    """The trainable count and training seconds per step a run recorded."""
    from ..recipes.peft import RECORD

    path = folder / RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def collect_peft(out: Path, grid: tuple[PeftEntry, ...] = PEFT_GRID) -> list[dict[str, Any]]:
    """One row per entry (its first seed): score, start, curve, trainable count, seconds
    per step, tokens/s, peak RSS, wall time and status."""
    rows = []
    for entry in grid:
        folder = out / "runs" / run_name(entry, entry.seeds[0])
        summary = _run_summary(folder, entry.task) if folder.exists() else None
        status = ("missing" if summary is None else
                  "finished" if summary["finished"] else "unfinished")
        rows.append({"name": entry.name, "task": entry.task, "method": entry.method,
                     "options": entry.options, "note": entry.note, "status": status,
                     **(summary or {})})
    return rows


def keep_recorded(rows: list[dict[str, Any]], budget: dict[str, Any],
                  record: dict[str, Any] | None) -> list[str]:
    """Put in ``rows``, in place, the finished rows of an earlier report's ``record`` (``docs/
    data/peft.json``) for the entries this run folder lacks, where that report's budget equals
    this one: a grid may span sessions, and ``results/`` need not survive one. Returns the
    names kept, which the report lists."""
    if record is None or record.get("budget") != budget:
        return []
    recorded = {r["name"]: r for r in record["rows"] if r["status"] == "finished"}
    kept = []
    for n, row in enumerate(rows):
        if row["status"] == "missing" and row["name"] in recorded:
            rows[n] = recorded[row["name"]]
            kept.append(row["name"])
    return kept


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_peft(budget: dict[str, Any], rows: list[dict[str, Any]],
                kept: list[str] | tuple[str, ...] = ()) -> str:
    """The tables of the PEFT grid as markdown (``kept``: runs taken from an earlier report,
    :func:`keep_recorded`)."""
    lines = [
        f"Budget per run: {budget['steps']} steps; `lookup` batches of "
        f"{budget['lookup_batch']} examples, `domain` batches of {budget['domain_batch']} "
        f"windows of {budget['seq_len']} tokens; AdamW (betas 0.9, 0.95, no weight decay), "
        "20 warm-up steps, cosine to 10 %, lr 1e-3 for NTK, LoRA and the prefix and 3e-5 "
        "for full fine-tuning; seed 0; two threads, one run at a time. Seconds per step: "
        "training time over steps (evaluations excluded); peak RSS: the training process's "
        "(the 135 M-parameter model in float32 included).", ""]
    if kept:
        lines += ["Runs of an earlier session under the same budget, kept from its record "
                  "(`docs/data/peft.json`; their run folders were not in this one): "
                  + ", ".join(f"`{name}`" for name in kept) + ".", ""]
    for task, (metric, higher) in SCORE.items():
        chosen = [r for r in rows if r["task"] == task]
        if not chosen:
            continue
        label = {"exact_match": "exact match", "perplexity": "perplexity"}[metric]
        evaluated = sorted({step for r in chosen for step, _ in r.get("curve") or []})
        header = (["run", "trainable"] + [f"step {step}" for step in evaluated]
                  + ["final NLL (nats)", "s / step", "tokens / s", "peak RSS (MiB)", "status"])
        lines += [f"### `{task}`: held-out {label} ({'higher' if higher else 'lower'} is "
                  f"better) at each evaluation", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        spec = ".3f" if metric == "exact_match" else ".2f"
        ordered = sorted(chosen, key=lambda r: (r.get("score") is None,
                                                -(r.get("score") or 0) if higher
                                                else (r.get("score") or 0),
                                                r.get("nll") or 0))
        for r in ordered:
            curve = dict(r.get("curve") or [])
            cells = ([f"`{r['name']}`", _fmt(r.get("trainable"), ",")]
                     + [_fmt(curve.get(step), spec) for step in evaluated]
                     + [_fmt(r.get("nll"), ".4f"), _fmt(r.get("seconds_per_step"), ".2f"),
                        _fmt(r.get("tokens_per_s"), ",.0f"),
                        _fmt(r.get("peak_rss_mib"), ",.0f"), r["status"]])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += prefix_length_table(rows)
    lines += ["Entries:", ""] + [f"* `{r['name']}`: {r['note']}" for r in rows]
    return "\n".join(lines) + "\n"


def prefix_length_table(rows: list[dict[str, Any]], task: str = "lookup") -> list[str]:
    """NTK-Attention beside prefix tuning as the prefix grows (the matched length included):
    markdown lines, empty when the task has no prefix runs."""
    prefixes = sorted((r for r in rows if r["task"] == task and r["method"] == "prefix"
                       and r.get("trainable")), key=lambda r: r["trainable"])
    ntk = [r for r in rows if r["task"] == task and r["method"] == "ntk"]
    if not prefixes:
        return []
    metric, _ = SCORE[task]
    lines = [f"### Prefix length on `{task}`: prefix tuning with m tokens against NTK-Attention",
             "", f"| prefix | trainable | final {metric.replace('_', ' ')} | final NLL (nats) "
             "| s / step |", "|---|---|---|---|---|"]
    for r in prefixes:
        m = r["options"].get("prefix_length", "matched")
        lines.append(f"| m = {m} | {_fmt(r.get('trainable'), ',')} | "
                     f"{_fmt(r.get('score'), '.3f')} | {_fmt(r.get('nll'), '.4f')} | "
                     f"{_fmt(r.get('seconds_per_step'), '.2f')} |")
    for r in ntk:
        lines.append(f"| NTK (any m) | {_fmt(r.get('trainable'), ',')} | "
                     f"{_fmt(r.get('score'), '.3f')} | {_fmt(r.get('nll'), '.4f')} | "
                     f"{_fmt(r.get('seconds_per_step'), '.2f')} |")
    return lines + [""]


PEFT_MARKERS = ("<!-- peft-report:start -->", "<!-- peft-report:end -->")
"""Where the report goes in ``docs/peft.md``."""


#: The plot's panels: (task, curve key, y label, log scale).
PANELS = (("lookup", "curve", "held-out exact match", False),
          ("lookup", "nll_curve", "held-out answer NLL (nats, log scale)", True),
          ("domain", "curve", "held-out perplexity (log scale)", True))


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Each panel of :data:`PANELS` that has a curve of two points or more, one line per run:
    colour by method, line style by variant (the matched or default entry solid)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    from .plots import save_figure

    panels = [p for p in PANELS if any(r["task"] == p[0] and len(r.get(p[1]) or []) > 1
                                       for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.5),
                             squeeze=False)
    colours = {"ntk": "tab:red", "lora": "tab:blue", "prefix": "tab:green", "full": "black"}
    variants = ("--", ":", "-.", (0, (1, 3)))
    for ax, (task, key, label, log) in zip(axes[0], panels, strict=False):
        seen: dict[str, int] = {}
        for r in rows:
            if r["task"] != task or len(r.get(key) or []) < 2:
                continue
            style = "-" if not r["options"] else variants[seen.get(r["method"], 0) % 4]
            if r["options"]:
                seen[r["method"]] = seen.get(r["method"], 0) + 1
            steps, values = zip(*r[key], strict=True)
            ax.plot(steps, values, linestyle=style, color=colours[r["method"]], marker="o",
                    markersize=3, label=r["name"].removeprefix(task + "-"))
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
            if task == "domain":
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_title(f"SmolLM2-135M, task {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def write_peft_report(out: Path, grid: tuple[PeftEntry, ...] = PEFT_GRID,
                      docs: Path | None = None) -> Path:
    """``OUT/peft.json``, ``OUT/peft.md`` and the curves' plot (with ``docs``: the section
    between :data:`PEFT_MARKERS` of ``docs/peft.md``, ``docs/data/peft.json`` and
    ``docs/img/peft_curves.png``, with the finished runs of the previous ``docs/data/peft.json``
    that ``OUT`` lacks, :func:`keep_recorded`)."""
    budget = json.loads((out / "budget.json").read_text())
    rows = collect_peft(out, grid)
    kept = []
    if docs is not None and (docs / "data" / "peft.json").exists():
        kept = keep_recorded(rows, budget, json.loads((docs / "data" / "peft.json").read_text()))
    record = {"budget": budget, "rows": rows}
    text = render_peft(budget, rows, kept)
    (out / "peft.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curves(rows, out / "peft_curves.png")
    path = out / "peft.md"
    path.write_text(text)
    if docs is not None:
        (docs / "data").mkdir(parents=True, exist_ok=True)
        (docs / "data" / "peft.json").write_text(json.dumps(record, indent=1) + "\n")
        plot_curves(rows, docs / "img" / "peft_curves.png")
        write_section(docs / "peft.md", PEFT_MARKERS, text)
    return path
