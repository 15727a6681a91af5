"""Train a small model on a synthetic recall task on the CPU, one mixer per run
(``subq train recall --task joint_recall --mixer mamba+hax``), the scaled-down version of the
joint-recall experiment of ``[hax]`` (Table 1).

Every run is seeded: training batches are drawn from ``seed * 10^6 + step`` and the validation
set from a separate seed, so a resumed run sees exactly the batches a straight run would.
Checkpoints (model, optimiser, step, history) are written atomically every
``checkpoint_every`` steps to ``<out>/<task>-<mixer>-s<seed>.pt`` and picked up on restart.
At the end the validation accuracy (per-sample, the paper's metric) is appended to
``<results>/recall.csv`` and ``<results>/recall.png`` plots the best accuracy per mixer.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.recall_lm import MIXERS, RecallLM
from ..tasks import RecallBatch, joint_recall, mqar, per_sample_accuracy
from ..tasks.joint_recall import IGNORE, vocab_size
from .checkpoint import load_if_exists, save_atomic

TASKS = ("joint_recall", "mqar")
CSV_FIELDS = ["task", "mixer", "seed", "steps", "d_model", "n_layers", "k_total", "lr",
              "accuracy", "best_accuracy", "train_seconds"]


@dataclass
class RecallConfig:
    """One run. Defaults: 2 layers, hidden 64, joint recall with (n_c, n_k) in [2, 6]^2 and
    16 values, k_total = 16 sparse keys (8 + 8), AdamW lr 3e-3 with linear warm-up."""

    task: str = "joint_recall"
    mixer: str = "mamba+hax"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    d_model: int = 64
    n_layers: int = 2
    k_total: int = 16
    num_hash: int = 8
    n_context: tuple[int, int] = (2, 6)
    n_key: tuple[int, int] = (2, 6)
    n_value: int = 16
    mqar_vocab: int = 256
    mqar_length: int = 128
    mqar_pairs: int = 16
    valid_samples: int = 256
    eval_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    out: str = "runs/recall"
    results: str = "results"

    def data(self, num: int, seed: int) -> RecallBatch:
        if self.task == "joint_recall":
            return joint_recall(num, n_context=self.n_context, n_key=self.n_key,
                                n_value=self.n_value, seed=seed)
        return mqar(num, vocab_size=self.mqar_vocab, input_seq_len=self.mqar_length,
                    num_kv_pairs=self.mqar_pairs, seed=seed)

    def vocab(self) -> int:
        if self.task == "joint_recall":
            return vocab_size(self.n_value, self.n_key[1], self.n_context[1])
        return self.mqar_vocab

    def checkpoint_path(self) -> Path:
        return Path(self.out) / f"{self.task}-{self.mixer}-s{self.seed}.pt"


def _check(cfg: RecallConfig) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {cfg.mixer!r}")
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")


def build_model(cfg: RecallConfig) -> RecallLM:
    torch.manual_seed(cfg.seed)
    length = cfg.data(1, 0).inputs.shape[1]
    return RecallLM(cfg.vocab(), cfg.d_model, cfg.n_layers, cfg.mixer, k_total=cfg.k_total,
                    num_hash=cfg.num_hash, max_length=length)


@torch.no_grad()
def evaluate(model: RecallLM, data: RecallBatch, batch_size: int = 64) -> float:
    """Mean per-sample accuracy (x100) on ``data``."""
    model.eval()
    accs = [per_sample_accuracy(model(data.inputs[i:i + batch_size]),
                                data.labels[i:i + batch_size])
            for i in range(0, data.inputs.shape[0], batch_size)]
    model.train()
    return 100.0 * float(torch.cat(accs).nanmean())


def train(cfg: RecallConfig) -> dict:
    """Train (or resume) one run; returns the final row of the results table."""
    _check(cfg)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    start, history, seconds = 0, [], 0.0
    saved = load_if_exists(cfg.checkpoint_path())
    if saved is not None:
        if saved["step"] > cfg.steps:
            raise ValueError(f"--steps {cfg.steps} is below the step of the checkpoint to "
                             f"resume ({saved['step']} in {cfg.checkpoint_path()}): its model "
                             "is not the model of this budget")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start, history, seconds = saved["step"], saved["history"], saved["seconds"]
    valid = cfg.data(cfg.valid_samples, seed=10**9 + cfg.seed)

    def checkpoint(step: int) -> None:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "step": step, "history": history,
                     "seconds": seconds, "config": asdict(cfg)}, cfg.checkpoint_path())

    model.train()
    for step in range(start, cfg.steps):
        tic = time.perf_counter()
        torch.manual_seed(cfg.seed * 10**6 + step)  # the LSH redraw of this step
        batch = cfg.data(cfg.batch_size, seed=cfg.seed * 10**6 + step)
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                               ignore_index=IGNORE) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - tic
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            history.append((done, loss.item(), evaluate(model, valid)))
            print(f"[{cfg.mixer}] step {done} loss {history[-1][1]:.4f} "
                  f"valid acc {history[-1][2]:.1f}%", flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done)
    accuracy = history[-1][2] if history else evaluate(model, valid)
    row = {"task": cfg.task, "mixer": cfg.mixer, "seed": cfg.seed, "steps": cfg.steps,
           "d_model": cfg.d_model, "n_layers": cfg.n_layers, "k_total": cfg.k_total,
           "lr": cfg.lr, "accuracy": round(accuracy, 2),
           "best_accuracy": round(max([h[2] for h in history], default=accuracy), 2),
           "train_seconds": round(seconds, 1)}
    write_results(row, Path(cfg.results))
    return row


def write_results(row: dict, folder: Path) -> None:
    """Append ``row`` to ``recall.csv`` (replacing the same task/mixer/seed/steps) and redraw
    ``recall.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "recall.csv"
    rows = []
    if table.exists():
        with table.open() as f:
            rows = [r for r in csv.DictReader(f)
                    if (r["task"], r["mixer"], r["seed"], r["steps"]) !=
                    (row["task"], row["mixer"], str(row["seed"]), str(row["steps"]))]
    rows.append({k: str(v) for k, v in row.items()})
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_results(rows, folder / "recall.png")


def plot_results(rows: list[dict], path: Path) -> None:
    """Bar chart: best validation accuracy per (task, mixer), over the runs in ``rows``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, float] = {}
    for r in rows:
        key = f"{r['task']}\n{r['mixer']}"
        best[key] = max(best.get(key, 0.0), float(r["accuracy"]))
    fig, ax = plt.subplots(figsize=(1.2 * len(best) + 2, 3.5))
    ax.bar(list(best), list(best.values()), color="tab:blue")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("recall accuracy per mixer (subq train recall)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train recall ...``."""
    train_parser = subparsers.add_parser("train", help="training recipes")
    recipes = train_parser.add_subparsers(dest="recipe", required=True)
    p = recipes.add_parser("recall", help="a small model on joint recall / MQAR (CPU)")
    defaults = RecallConfig()
    p.add_argument("--task", choices=TASKS, default=defaults.task)
    p.add_argument("--mixer", choices=MIXERS, default=defaults.mixer)
    for name in ("steps", "batch_size", "warmup", "d_model", "n_layers", "k_total",
                 "num_hash", "n_value", "valid_samples", "eval_every", "checkpoint_every",
                 "seed", "mqar_vocab", "mqar_length", "mqar_pairs"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                       default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--n-context", type=_pair, default=defaults.n_context,
                   help="inclusive range lo,hi")
    p.add_argument("--n-key", type=_pair, default=defaults.n_key, help="inclusive range lo,hi")
    p.add_argument("--out", default=defaults.out, help="checkpoint folder")
    p.add_argument("--results", default=defaults.results, help="table and plot folder")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in RecallConfig.__dataclass_fields__}
    row = train(RecallConfig(**fields))
    print(", ".join(f"{k}={v}" for k, v in row.items()))
    return 0
