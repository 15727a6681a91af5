"""The one training loop of subq: every recipe (LM, recall, and those to come) is a
:class:`Task` run by :class:`Trainer`.

One optimiser step at step ``s`` (0-based) over a global batch of ``batch`` rows::

    rows of the global batch -> ranks (torchrun) -> micro-batches (gradient accumulation)
    loss = mean over micro-batches of task.loss(micro)      (DDP averages over ranks)
    clip ||grad||_2 to grad_clip;  AdamW step at lr(s)
    lr(s) = lr * (s + 1) / warmup                                      for s < warmup
          = lr * (r + (1 - r) * (1 + cos(pi * t)) / 2),  t = (s - warmup) / (steps - warmup)
    with r = min_lr_ratio (r = 1: constant after the warm-up).
    with ema = d > 0, after each step: theta_ema <- d theta_ema + (1 - d) theta  (buffers copied)

The exponential moving average of the weights (DiT's and GroupMamba's recipes sample and
evaluate it) starts as a copy of the initial model; when it is on, every evaluation scores the
average, not the raw weights, and the checkpoint keeps both.

Exact resume: the task's batch of step ``s`` is a function of ``(seed, s)`` only and the
global RNG is reseeded from ``(seed, s)`` before every step, so nothing that happened before
a checkpoint (evaluation, a killed process) can change what follows it. The checkpoint
(``OUT/checkpoint.pt``, written to a temporary file then renamed) holds the model, the
optimiser, the schedule, the RNG states, the step (the data position) and the training
seconds; ``resume=True`` continues from it and first cuts ``OUT/metrics.jsonl`` back to the
checkpoint's step, so the metrics of a run killed at any moment and resumed equal those of a
run never killed.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (nccl on
CUDA, gloo on CPU), the model wrapped in DDP, every rank takes its slice of the global batch,
rank 0 alone logs, evaluates and writes checkpoints. The logged loss is the mean over ranks, so
it equals one process's loss on the same global batch.

``OUT/metrics.jsonl``: one JSON object per line: ``{"step", "loss", "lr", "tokens_per_s"}``
every ``log_every`` steps (the rate over the training steps since the last entry, evaluation
and checkpoints excluded), and the task's evaluation entries (``{"step", "split", ...}``):
every ``eval_every`` steps, at the end, and with ``eval_first`` at step 0 (where a fine-tune
starts).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..models.counting import num_parameters
from .checkpoint import CHECKPOINT, load_if_exists, save_atomic

METRICS = "metrics.jsonl"


class Task(Protocol):
    """What a recipe gives the trainer: a model, its data, its loss and its evaluation."""

    def config(self) -> dict[str, Any]:
        """The recipe's settings; a resume with different settings is refused."""

    def build_model(self) -> nn.Module:
        """A fresh model (the trainer has seeded the RNG)."""

    def batch(self, step: int, size: int, start: int, count: int,
              device: torch.device) -> Any:
        """Rows ``[start, start + count)`` of the global batch (``size`` rows) of ``step``, on
        ``device``; a function of the step (and the recipe's seed) only."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """``(mean loss, units)`` of one micro-batch; units (tokens, samples) feed the
        throughput. ``model`` may be DDP-wrapped: use :func:`unwrap` for its attributes."""

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        """Evaluation entries (each with a ``split``) of the unwrapped model in eval mode."""


@dataclass
class TrainerConfig:
    """The loop's knobs. ``batch`` counts rows per optimiser step over all ranks and
    micro-batches, so a run's math does not depend on ``accumulate`` or the world size.
    Weight decay applies to matrices (``dim >= 2``) only, or with ``decay_all`` to every
    parameter (torch AdamW's default: gains, biases and SSM vectors too)."""

    out: str = "runs/train"
    steps: int = 1000
    batch: int = 16
    accumulate: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    decay_all: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_first: bool = False
    checkpoint_every: int = 100
    time_limit: float = 0.0
    resume: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("batch", "accumulate", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every", "time_limit", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0: off), got {self.ema}")


#: Fields that may change between a run and its resume (they do not change the math).
_RESUMABLE_CHANGES = {"out", "steps", "log_every", "eval_every", "eval_first",
                      "checkpoint_every", "time_limit", "resume", "progress"}


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """The multiplier of ``cfg.lr`` at (0-based) ``step``: linear warm-up, cosine decay."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    r = cfg.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_task(task: Task, cfg: TrainerConfig, describe: Callable[[int], str]
               ) -> dict[str, Any]:
    """Train (or resume) ``task`` under ``cfg``, every recipe's entry: rank 0 first prints
    ``describe(parameters)``; returns the trainer's summary plus ``parameters`` (the model's
    count, shared tensors once), empty on other ranks."""
    runner = Trainer(task, cfg)
    params = num_parameters(unwrap(runner.model))
    if runner.is_main:
        print(describe(params), flush=True)
    result = runner.fit()
    runner.close()
    return {**result, "parameters": params} if runner.is_main else {}


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of ``OUT/metrics.jsonl`` (empty when there is none)."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class _World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_world() -> _World:
    """The torchrun process group when ``WORLD_SIZE`` > 1, else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if size == 1:
        return _World(0, 1, device)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return _World(dist.get_rank(), dist.get_world_size(), device)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_step(seed: int, step: int) -> None:
    """The RNG state every rank starts step ``step`` from (dropout, random projections)."""
    torch.manual_seed(seed * 10**6 + step)
    random.seed(seed * 10**6 + step)


class Trainer:
    """Runs a :class:`Task` under a :class:`TrainerConfig`; :meth:`fit` trains (or resumes)."""

    def __init__(self, task: Task, cfg: TrainerConfig) -> None:
        cfg.check()
        self.task, self.cfg = task, cfg
        self.world = _join_world()
        shards = self.world.size * cfg.accumulate
        if cfg.batch % shards:
            raise ValueError(f"batch ({cfg.batch}) must be a multiple of world size x "
                             f"accumulate ({self.world.size} x {cfg.accumulate})")
        self.rows = cfg.batch // shards
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = task.build_model().to(self.world.device)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trained if cfg.decay_all or p.dim() >= 2]
        other = [p for p in trained if not (cfg.decay_all or p.dim() >= 2)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": other, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg))
        self.step, self.seconds = 0, 0.0
        self.ema_model = None
        if cfg.ema > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.forward = self.model
        if self.world.size > 1:
            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that logs, evaluates and saves)."""
        return self.world.main

    def close(self) -> None:
        """Leave the process group (a no-op for one process)."""
        if self.world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # -- checkpoints ---------------------------------------------------------------------

    def _run_config(self) -> dict[str, Any]:
        return {"trainer": asdict(self.cfg), "task": self.task.config(),
                "world_size": self.world.size}

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        old, new = saved["config"], self._run_config()
        changed = [f"task.{k}" for k in sorted(set(old["task"]) | set(new["task"]))
                   if old["task"].get(k) != new["task"].get(k)]
        changed += [f"trainer.{f.name}" for f in fields(TrainerConfig)
                    if f.name not in _RESUMABLE_CHANGES
                    and old["trainer"].get(f.name, f.default) != new["trainer"][f.name]]
        if changed:
            raise ValueError(f"cannot resume {self.out / CHECKPOINT}: the run's settings "
                             f"differ ({', '.join(changed)}); use the same arguments or a new "
                             "--out")
        if saved["step"] > self.cfg.steps:
            raise ValueError(f"steps ({self.cfg.steps}) is below the step of the checkpoint "
                             f"to resume ({saved['step']} in {self.out / CHECKPOINT})")

    def _restore(self) -> None:
        saved = load_if_exists(self.out / CHECKPOINT, map_location=self.world.device)
        if saved is None:
            if self.world.main:
                (self.out / METRICS).unlink(missing_ok=True)
            return
        if not self.cfg.resume:
            raise ValueError(f"{self.out / CHECKPOINT} exists: pass --resume to continue that "
                             "run, or choose another --out")
        self._check_resumable(saved)
        self.model.load_state_dict(saved["model"])
        if self.ema_model is not None:
            self.ema_model.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        self.step, self.seconds = saved["step"], saved["seconds"]
        for group in self.optimizer.param_groups:  # the schedule of this run's steps
            group["lr"] = group["initial_lr"] * lr_factor(self.step, self.cfg)
        if self.world.main:
            kept = [m for m in read_metrics(self.out) if m["step"] <= self.step]
            save_lines_atomic(self.out / METRICS, [json.dumps(m) for m in kept])

    def save_checkpoint(self) -> None:
        if self.world.main:
            ema = {} if self.ema_model is None else {"ema": self.ema_model.state_dict()}
            save_atomic({"model": self.model.state_dict(), **ema,
                         "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
                         "step": self.step, "seconds": self.seconds,
                         "parameters": sum(p.numel() for p in self.model.parameters()),
                         "config": self._run_config()}, self.out / CHECKPOINT)
        self._barrier()

    # -- the loop ------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()

    def _log(self, entry: dict[str, Any]) -> None:
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / METRICS).open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16)

    def _micro_batches(self) -> Iterator[tuple[int, Any]]:
        base = self.world.rank * self.cfg.accumulate * self.rows
        for micro in range(self.cfg.accumulate):
            yield micro, self.task.batch(self.step, self.cfg.batch, base + micro * self.rows,
                                         self.rows, self.world.device)

    def train_step(self) -> tuple[float, int]:
        """One optimiser step; returns the loss (mean over ranks) and the units (all ranks)."""
        _seed_step(self.cfg.seed, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total, units = 0.0, 0
        for micro, batch in self._micro_batches():
            last = micro == self.cfg.accumulate - 1
            sync = (contextlib.nullcontext() if last or self.world.size == 1
                    else self.forward.no_sync())
            with sync:
                with self._autocast():
                    loss, count = self.task.loss(self.forward, batch)
                (loss / self.cfg.accumulate).backward()
            total += loss.item() / self.cfg.accumulate
            units += count
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        if self.world.size > 1:
            reduced = torch.tensor([total, float(units)], dtype=torch.float64,
                                   device=self.world.device)
            dist.all_reduce(reduced)
            total, units = reduced[0].item() / self.world.size, int(reduced[1].item())
        return total, units

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        decay = self.cfg.ema
        for average, param in zip(self.ema_model.parameters(), self.model.parameters(),
                                  strict=True):
            average.lerp_(param.detach(), 1.0 - decay)
        for average, buffer in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
            average.copy_(buffer)

    def evaluated_model(self) -> nn.Module:
        """What evaluations score: the weights' moving average when ``ema`` is on."""
        return self.model if self.ema_model is None else self.ema_model

    def evaluate(self) -> list[dict[str, Any]]:
        entries = []
        if self.world.main:
            model = self.evaluated_model()
            model.eval()
            with torch.no_grad(), self._autocast():
                entries = [{"step": self.step, **e} for e in self.task.evaluate(model)]
            self.model.train()
            for entry in entries:
                self._log(entry)
        self._barrier()
        return entries

    def _due(self, every: int) -> bool:
        return self.step == self.cfg.steps or (every > 0 and self.step % every == 0)

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train from the checkpoint (or from scratch) to ``cfg.steps``, or only to step
        ``until`` or until ``time_limit`` seconds have passed (then checkpoint and return, to
        be resumed). Returns ``{"step", "seconds", "loss", "evals", "finished"}``."""
        self._restore()
        if self.cfg.eval_first and self.step == 0:
            self.evaluate()
        stop = self.cfg.steps if until is None else min(until, self.cfg.steps)
        started = time.perf_counter()
        bar = _progress_bar(self.cfg.steps, self.step, self.cfg.progress and self.world.main)
        self.model.train()
        loss, evals, window_units, window_seconds = math.nan, [], 0, 0.0
        while self.step < stop:
            lr = self.optimizer.param_groups[0]["lr"]
            tic = time.perf_counter()
            loss, units = self.train_step()
            elapsed = time.perf_counter() - tic
            self.seconds += elapsed
            window_units, window_seconds = window_units + units, window_seconds + elapsed
            bar.update(1)
            if self._due(self.cfg.log_every):
                rate = window_units / max(1e-9, window_seconds)
                self._log({"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
                window_units, window_seconds = 0, 0.0
            if self._due(self.cfg.eval_every):
                evals = self.evaluate()
            out_of_time = (self.cfg.time_limit > 0
                           and time.perf_counter() - started > self.cfg.time_limit)
            if self._due(self.cfg.checkpoint_every) or self.step == stop or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        if self.step == self.cfg.steps and not evals and self.world.main:
            evals = [m for m in read_metrics(self.out)
                     if m["step"] == self.step and "split" in m]
        return {"step": self.step, "seconds": self.seconds, "loss": loss, "evals": evals,
                "finished": self.step == self.cfg.steps}


def save_lines_atomic(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                unit="step", file=sys.stderr)
