"""``subq bench efficacy``: CAB's efficacy half for causal language modelling. Every mixer of a
fixed grid trains the byte LM (:mod:`subq.recipes.lm`) at equal parameters (the LM solves each
mixer's MLP width for dense's count) and on equal tokens (the same steps, batch, length, data
order and seed), one fresh ``subq train lm`` process per run; HiP is also applied
training-free to the trained dense model (its weights, HiP's attention). The report
(:mod:`subq.bench.efficacy_report`) answers "which mechanism, at what quality cost, at my
length": held-out bits per byte at the training length and at 2x and 4x, parameters, training
tokens/s, peak memory, the gap to dense.

Resumable: each run lives in ``OUT/runs/<name>-s<seed>/``; a run whose ``result.json`` exists
is skipped, an unfinished one resumes from its checkpoint, so ``--chunk SECONDS`` (each
process stops after that long) splits the grid over several calls.

    subq bench efficacy                       # the default grid and budget, OUT=results/efficacy
    subq bench efficacy --entries dense local mamba --steps 200 --preset tiny
    subq bench efficacy --tasks vision        # the Fashion-MNIST grid into OUT/vision

``--tasks vision`` runs the noncausal side (:mod:`subq.bench.efficacy_vision`) on the same
runner, and its report adds CAB's compositional index over the mechanisms on both tasks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..recipes.trainer import CHECKPOINT, read_metrics

RESULT = "result.json"
RUSAGE = "rusage.jsonl"
TRANSPLANT = "transplant.json"


@dataclass(frozen=True)
class Entry:
    """One system of the grid: a label, the LM mixer and its options (over the LM's
    ``DEFAULT_OPTIONS``), the seeds it trains with, and, for a training-free entry, the entry
    whose trained weights it evaluates with this mixer (``transplant``)."""

    name: str
    mixer: str
    options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    transplant: str | None = None
    note: str = ""


#: Luo et al.'s stability claim is about seeds, so its two systems train with three.
_LUO_SEEDS = (0, 1, 2)

DEFAULT_GRID: tuple[Entry, ...] = (
    Entry("dense", "dense", note="softmax attention, RoPE"),
    Entry("local", "local", note="sliding window, 63 keys back"),
    Entry("linear", "linear", note="linear attention (the mechanism's default ReLU features)"),
    Entry("kernelized_rpe", "kernelized_rpe", seeds=_LUO_SEEDS,
          note="NPRF + learned RPE (Luo et al.)"),
    Entry("prf", "kernelized_rpe", {"normalize": False, "rpe": False}, seeds=_LUO_SEEDS,
          note="Performer's PRF, no normalisation, no RPE (Luo et al.'s baseline)"),
    Entry("combiner-fixed", "combiner", {"variant": "fixed"}, note="Combiner-Fixed, span 16"),
    Entry("combiner-axial", "combiner", {"variant": "axial"}, note="Combiner-Axial, span 16"),
    Entry("fixed", "fixed", note="Sparse Transformer's fixed pattern, span 16"),
    Entry("axial", "axial", note="row + column sparse attention, span 16"),
    Entry("scout+swa", "scout+swa", note="SCOUT block over sliding-window attention"),
    Entry("scout+mamba", "scout+mamba", note="SCOUT block over Mamba"),
    Entry("mamba", "mamba", note="Mamba"),
    Entry("mamba+hax", "mamba+hax", note="HAX over Mamba"),
    Entry("hip (dense weights)", "hip", transplant="dense",
          note="HiP applied training-free to the trained dense model"),
)


@dataclass(frozen=True)
class Budget:
    """What every trained run of the grid gets: the same model size, steps, batch, length,
    learning rate, evaluation and data. The default: the ``mini`` preset (0.82 M parameters),
    1000 steps of 8 x 256 bytes (2.05 M training bytes)."""

    preset: str = "mini"
    steps: int = 1000
    batch: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    eval_every: int = 250
    eval_bytes: int = 65536
    text: str | None = None

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    def command(self, entry: Entry, seed: int, out: Path, chunk: float | None,
                source: Path | None = None) -> list[str]:
        return train_command(entry, seed, self, out, chunk)


def run_name(entry: Entry, seed: int) -> str:
    return f"{entry.name.replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"


def train_command(entry: Entry, seed: int, budget: Budget, out: Path,
                  chunk: float | None) -> list[str]:
    """The ``subq train lm`` command of one run (resumes when ``out`` holds a checkpoint)."""
    cmd = [sys.executable, "-m", "subq", "train", "lm", "--mixer", entry.mixer,
           "--preset", budget.preset, "--seq-len", str(budget.seq_len),
           "--batch", str(budget.batch), "--steps", str(budget.steps), "--seed", str(seed),
           "--lr", repr(budget.lr), "--eval-every", str(budget.eval_every),
           "--eval-bytes", str(budget.eval_bytes), "--checkpoint-every", "50",
           "--log-every", "10", "--no-progress", "--resume", "--out", str(out)]
    for name, value in entry.options.items():
        cmd += ["--option", f"{name}={value!r}"]
    if budget.text is not None:
        cmd += ["--text", budget.text]
    if chunk is not None:
        cmd += ["--time-limit", repr(float(chunk))]
    return cmd


def transplant_command(entry: Entry, source: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "subq.bench.efficacy_transplant", "--source", str(source),
           "--mixer", entry.mixer, "--out", str(out)]
    for name, value in entry.options.items():
        cmd += ["--option", f"{name}={value!r}"]
    return cmd


def is_finished(run: Path) -> bool:
    return (run / RESULT).exists()


def _finished_training(run: Path, steps: int) -> bool:
    evals = [m for m in read_metrics(run) if "split" in m]
    return any(e["step"] == steps for e in evals)


@dataclass
class _Job:
    entry: Entry
    seed: int
    folder: Path
    command: list[str]
    source: Path | None = None
    started: float = 0.0


def plan(grid: Sequence[Any], budget: Any, out: Path, chunk: float | None) -> list[_Job]:
    """Every unfinished run, trained runs before the training-free ones that read them. A run
    with a source (a transplant's trained run, a distillation's teacher) waits for it; the
    budget builds each training command (``budget.command(entry, seed, folder, chunk,
    source)``)."""
    by_name = {e.name: e for e in grid}
    jobs, later = [], []
    for entry in grid:
        for seed in entry.seeds:
            folder = out / "runs" / run_name(entry, seed)
            if is_finished(folder):
                continue
            origin = entry.transplant or getattr(entry, "teacher", None)
            if origin is not None and origin not in by_name:
                raise ValueError(f"entry {entry.name!r} reads {origin!r}, which is not in the "
                                 "grid")
            source = None
            if origin is not None:  # a transplant reads its own seed; a teacher is seed 0's
                source_seed = seed if entry.transplant else by_name[origin].seeds[0]
                source = out / "runs" / run_name(by_name[origin], source_seed)
            if entry.transplant is None:
                jobs.append(_Job(entry, seed, folder,
                                 budget.command(entry, seed, folder, chunk, source), source))
            else:
                later.append(_Job(entry, seed, folder,
                                  transplant_command(entry, source, folder), source))
    return jobs + later


def read_rusage(run: Path) -> list[dict[str, Any]]:
    """The ``{"exit", "wall_s", "max_rss_mib"}`` records of every process of a run (one per
    chunk), from its ``rusage.jsonl`` (empty when it has none)."""
    path = run / RUSAGE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _parameters(run: Path) -> int:
    """The parameter count a run recorded: its checkpoint's, or a transplant's record."""
    if (run / TRANSPLANT).exists():
        return json.loads((run / TRANSPLANT).read_text())["parameters"]
    import torch

    return torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)["parameters"]


def _record(job: _Job, status: int, rusage: Any, budget: Budget) -> bool:
    """Append the process's peak memory and wall time to the run's ``rusage.jsonl``; write
    ``result.json`` when the run is complete. Returns whether it is."""
    job.folder.mkdir(parents=True, exist_ok=True)
    entry = {"exit": status, "wall_s": round(time.perf_counter() - job.started, 1),
             "max_rss_mib": round(rusage.ru_maxrss / 1024, 1)}
    with (job.folder / RUSAGE).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    done = status == 0 and (job.entry.transplant is not None
                            or _finished_training(job.folder, budget.steps))
    if done:
        result = {"entry": asdict(job.entry), "seed": job.seed, "budget": asdict(budget),
                  "parameters": _parameters(job.folder)}
        (job.folder / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    return done


def run_grid(grid: Sequence[Any], budget: Any, out: Path, *, jobs: int = 2,
             threads: int = 1, chunk: float | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Run every unfinished run of ``grid``, ``jobs`` processes at a time with ``threads``
    intra-op threads each; a training-free entry starts once its source run is finished.
    Returns counts of ``finished`` and ``unfinished`` runs and those that ``failed``."""
    log = log or functools.partial(print, flush=True)
    out = Path(out)
    _check_budget(out, budget)
    pending = plan(grid, budget, out, chunk)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[int, _Job] = {}
    counts = {"finished": 0, "unfinished": 0, "failed": 0}
    while pending or running:
        ready = [j for j in pending if j.source is None or is_finished(j.source)]
        blocked = not ready and not running
        if blocked:  # a transplant whose source did not finish in this call
            counts["unfinished"] += len(pending)
            break
        while ready and len(running) < jobs:
            job = ready.pop(0)
            pending.remove(job)
            job.folder.mkdir(parents=True, exist_ok=True)
            log(f"start {job.folder.name}")
            job.started = time.perf_counter()
            with (job.folder / "stdout.txt").open("a") as stdout:
                process = subprocess.Popen(job.command, stdout=stdout,
                                           stderr=subprocess.STDOUT, env=env)
            running[process.pid] = job
        pid, status, rusage = os.wait4(-1, 0)
        job = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        done = _record(job, code, rusage, budget)
        key = "finished" if done else ("failed" if code else "unfinished")
        counts[key] += 1
        log(f"{key} {job.folder.name} (exit {code}, "
            f"{time.perf_counter() - job.started:.0f} s)")
    return counts


def _check_budget(out: Path, budget: Any) -> None:
    """One folder holds one budget: rerunning with another one would mix them."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "budget.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != asdict(budget):
            differ = sorted(k for k in saved if saved[k] != asdict(budget).get(k))
            raise ValueError(f"{out} holds runs of another budget (differs in {differ}); "
                             "pass another --out or the same settings")
    else:
        path.write_text(json.dumps(asdict(budget), indent=1) + "\n")


def select(names: Sequence[str] | None, grid: Sequence[Any] = DEFAULT_GRID) -> list[Any]:
    """The entries named (all when ``names`` is empty), in grid order; a transplant's source
    (or a distillation's teacher) is added when missing."""
    if not names:
        return list(grid)
    by_name = {e.name: e for e in grid}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown entries {unknown}; the grid has: {list(by_name)}")
    wanted = set(names)
    wanted |= {by_name[n].transplant for n in names if by_name[n].transplant}
    wanted |= {t for n in names if (t := getattr(by_name[n], "teacher", None))}
    return [e for e in grid if e.name in wanted]


def add_command(sub: argparse._SubParsersAction) -> None:
    """``subq bench efficacy ...``."""
    defaults = Budget()
    p = sub.add_parser("efficacy", help="train the LM grid at equal parameters and tokens; "
                       "writes OUT/efficacy.{json,md} and plots")
    p.add_argument("--tasks", nargs="+", choices=("lm", "vision", "peft"), default=["lm"],
                   help="lm: the byte-LM grid (OUT); vision: the Fashion-MNIST grid "
                        "(OUT/vision) and CAB's compositional index over both; peft: "
                        "NTK-Attention against LoRA, prefix and full fine-tuning of SmolLM2 "
                        "(OUT/peft, report in docs/peft.md)")
    p.add_argument("--peft-entries", nargs="+", metavar="NAME",
                   help="PEFT grid entries (default: all)")
    p.add_argument("--peft-steps", type=int, default=150)
    p.add_argument("--entries", nargs="+", metavar="NAME",
                   help=f"grid entries (default: all): {[e.name for e in DEFAULT_GRID]}")
    p.add_argument("--vision-entries", nargs="+", metavar="NAME",
                   help="vision grid entries (default: all)")
    p.add_argument("--vision-preset", default="micro")
    p.add_argument("--vision-steps", type=int, default=1000)
    p.add_argument("--vision-batch", type=int, default=64)
    p.add_argument("--data", help="the Fashion-MNIST idx folder (default: the Debian package)")
    p.add_argument("--preset", default=defaults.preset)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-bytes", type=int, default=defaults.eval_bytes)
    p.add_argument("--text", help="the corpus (default: Python's documentation, as for "
                   "`subq train lm`)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--chunk", type=float, help="seconds each process trains before it stops "
                   "with a checkpoint; call again to go on")
    p.add_argument("--out", default="results/efficacy")
    p.add_argument("--report-only", action="store_true", help="only re-render the report")
    p.add_argument("--docs", action="store_true",
                   help="also write the report into docs/efficacy.md, docs/img, docs/data")
    p.add_argument("--docs-dir", default="docs")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from .efficacy_peft import PEFT_GRID, PeftBudget, write_peft_report
    from .efficacy_report import write_report
    from .efficacy_vision import VISION_GRID, VisionBudget, write_vision_report

    out, docs = Path(args.out), Path(args.docs_dir) if args.docs else None
    runs = []
    if "lm" in args.tasks:
        runs.append((select(args.entries), Budget(
            preset=args.preset, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
            lr=args.lr, eval_every=args.eval_every, eval_bytes=args.eval_bytes,
            text=args.text), out))
    if "vision" in args.tasks:
        runs.append((select(args.vision_entries, VISION_GRID), VisionBudget(
            preset=args.vision_preset, steps=args.vision_steps, batch=args.vision_batch,
            data=args.data), out / "vision"))
    if "peft" in args.tasks:
        runs.append((select(args.peft_entries, PEFT_GRID),
                     PeftBudget(steps=args.peft_steps, text=args.text), out / "peft"))
    for grid, budget, folder in runs:
        if not args.report_only:
            started = time.perf_counter()
            counts = run_grid(grid, budget, folder, jobs=args.jobs, threads=args.threads,
                              chunk=args.chunk)
            print(f"{counts} in {(time.perf_counter() - started) / 60:.1f} min")
        if isinstance(budget, Budget):
            print(f"report: {write_report(folder, grid, docs)}")
        elif isinstance(budget, PeftBudget):
            print(f"report: {write_peft_report(folder, tuple(grid), docs)}")
        else:
            print(f"report: {write_vision_report(folder, out, tuple(grid), docs)}")
    return 0
