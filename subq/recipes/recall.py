"""Train a small model on a synthetic recall task on the CPU, one mixer per run
(``subq train recall --task joint_recall --mixer mamba+hax``), the scaled-down version of the
joint-recall experiment of ``[hax]`` (Table 1), on the one trainer (:mod:`.trainer`).

Every run is seeded: the training batch of step ``s`` is drawn from ``seed * 10^6 + s`` and
the validation set from a separate seed, so a resumed run sees exactly the batches a straight
run would. The run folder is ``<out>/<task>-<mixer>-s<seed>/`` (the trainer's
``checkpoint.pt`` and ``metrics.jsonl``); a restart picks the checkpoint up. At the end the
validation accuracy (per-sample, the paper's metric) is appended to ``<results>/recall.csv``
and ``<results>/recall.png`` plots the best accuracy per mixer.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.recall_lm import MIXERS, RecallLM
from ..tasks import RecallBatch, joint_recall, mqar, per_sample_accuracy
from ..tasks.joint_recall import IGNORE, vocab_size
from .arguments import add_trainer_arguments, trainer_config
from .trainer import Trainer, TrainerConfig, read_metrics, unwrap

TASKS = ("joint_recall", "mqar")
CSV_FIELDS = ["task", "mixer", "seed", "steps", "d_model", "n_layers", "k_total", "lr",
              "accuracy", "best_accuracy", "train_seconds"]

#: The trainer's settings for recall: AdamW lr 3e-3 (betas 0.9, 0.999, weight decay 0.1 on
#: every parameter), 100 warm-up steps then constant, batches of 32, an evaluation and a
#: checkpoint every 250 steps; a restart resumes. (Decaying only the matrices changes the
#: outcome: docs/mechanisms/hax.md.)
TRAINER_DEFAULTS = TrainerConfig(out="runs/recall", steps=2000, batch=32, lr=3e-3,
                                 min_lr_ratio=1.0, warmup=100, weight_decay=0.1, decay_all=True,
                                 beta2=0.999,
                                 eval_every=250, checkpoint_every=250, log_every=50,
                                 resume=True)


@dataclass
class RecallConfig:
    """The task and the model of one run. Defaults: 2 layers, hidden 64, joint recall with
    (n_c, n_k) in [2, 6]^2 and 16 values, k_total = 16 sparse keys (8 + 8)."""

    task: str = "joint_recall"
    mixer: str = "mamba+hax"
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

    def run_name(self, seed: int) -> str:
        return f"{self.task}-{self.mixer}-s{seed}"


def _check(cfg: RecallConfig) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {cfg.mixer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, data: RecallBatch, batch_size: int = 64) -> float:
    """Mean per-sample accuracy (x100) on ``data``."""
    accs = [per_sample_accuracy(model(data.inputs[i:i + batch_size]),
                                data.labels[i:i + batch_size])
            for i in range(0, data.inputs.shape[0], batch_size)]
    return 100.0 * float(torch.cat(accs).nanmean())


class RecallTask:
    """The recall recipe as a trainer task: next-token cross-entropy on the inquired values
    (other positions ignored) plus the mixers' auxiliary loss (HAX's ranking loss)."""

    def __init__(self, cfg: RecallConfig, seed: int) -> None:
        _check(cfg)
        self.cfg, self.seed = cfg, seed
        self.valid = cfg.data(cfg.valid_samples, seed=10**9 + seed)

    def config(self) -> dict:
        return {k: v for k, v in asdict(self.cfg).items() if k != "results"}

    def build_model(self) -> RecallLM:
        length = self.cfg.data(1, 0).inputs.shape[1]
        return RecallLM(self.cfg.vocab(), self.cfg.d_model, self.cfg.n_layers, self.cfg.mixer,
                        k_total=self.cfg.k_total, num_hash=self.cfg.num_hash,
                        max_length=length)

    def batch(self, step: int, size: int, start: int, count: int,
              device: torch.device) -> RecallBatch:
        data = self.cfg.data(size, seed=self.seed * 10**6 + step)
        rows = slice(start, start + count)
        return RecallBatch(data.inputs[rows].to(device), data.labels[rows].to(device))

    def loss(self, model: nn.Module, batch: RecallBatch) -> tuple[torch.Tensor, int]:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                               ignore_index=IGNORE) + unwrap(model).aux_loss()
        return loss, batch.inputs.numel()

    def evaluate(self, model: nn.Module) -> list[dict]:
        device = next(model.parameters()).device
        data = RecallBatch(self.valid.inputs.to(device), self.valid.labels.to(device))
        return [{"split": "valid", "accuracy": evaluate(model, data)}]


def train(cfg: RecallConfig, trainer: TrainerConfig = TRAINER_DEFAULTS) -> dict:
    """Train (or resume) one run; returns the final row of the results table."""
    _check(cfg)
    run = replace(trainer, out=str(Path(trainer.out) / cfg.run_name(trainer.seed)))
    runner = Trainer(RecallTask(cfg, trainer.seed), run)
    result = runner.fit()
    runner.close()
    if not runner.is_main:
        return {}
    accuracies = [m["accuracy"] for m in read_metrics(run.out) if "accuracy" in m]
    row = {"task": cfg.task, "mixer": cfg.mixer, "seed": trainer.seed, "steps": trainer.steps,
           "d_model": cfg.d_model, "n_layers": cfg.n_layers, "k_total": cfg.k_total,
           "lr": trainer.lr, "accuracy": round(accuracies[-1], 2),
           "best_accuracy": round(max(accuracies), 2),
           "train_seconds": round(result["seconds"], 1)}
    if result["finished"]:
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
    from .commands import train_subparsers

    p = train_subparsers(subparsers).add_parser(
        "recall", help="a small model on joint recall / MQAR (CPU)")
    defaults = RecallConfig()
    p.add_argument("--task", choices=TASKS, default=defaults.task)
    p.add_argument("--mixer", choices=MIXERS, default=defaults.mixer)
    for name in ("d_model", "n_layers", "k_total", "num_hash", "n_value", "valid_samples",
                 "mqar_vocab", "mqar_length", "mqar_pairs"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                       default=getattr(defaults, name))
    p.add_argument("--n-context", type=_pair, default=defaults.n_context,
                   help="inclusive range lo,hi")
    p.add_argument("--n-key", type=_pair, default=defaults.n_key, help="inclusive range lo,hi")
    p.add_argument("--results", default=defaults.results, help="table and plot folder")
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in RecallConfig.__dataclass_fields__}
    row = train(RecallConfig(**fields), trainer_config(args))
    if row:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    return 0
