"""Train the byte-level LM (:mod:`subq.models.lm`) on a text corpus with the one trainer:
``subq train lm --mixer NAME --preset {tiny,mini,small} --steps N --seq-len L --batch B``.

The loss is the mean next-byte cross-entropy (nats) plus the mixers' auxiliary losses (HAX's
ranking loss); the evaluation reports bits per byte (``nats / ln 2``) on the held-out
documents at the training length and at 2x and 4x it where the mixer takes such lengths
(CAB's extrapolation question), over the same number of bytes at every length, and on the
training split at the training length.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lm import LM, MIXERS, PRESETS, lm_config
from ..tasks.text import WindowSampler, bits_per_byte, eval_windows, load_corpus
from .arguments import add_trainer_arguments, trainer_config
from .trainer import TrainerConfig, train_task, unwrap

#: The trainer's settings for the LM: AdamW lr 2e-3 (betas 0.9, 0.95, weight decay 0.1 on
#: matrices), 100 warm-up steps, cosine to 10 %, batches of 16 windows, a checkpoint every 100
#: steps and an evaluation every 250.
TRAINER_DEFAULTS = TrainerConfig(out="", steps=2000, batch=16, lr=2e-3, min_lr_ratio=0.1,
                                 warmup=100, eval_every=250, checkpoint_every=100,
                                 log_every=10)


@dataclass
class LMTaskConfig:
    """The model and the data of one run.

    ``eval_bytes`` bytes of the held-out split are scored at every evaluation length
    (``eval_bytes // length`` windows); ``extrapolate`` lists the multiples of ``seq_len``
    evaluated besides 1.
    """

    mixer: str = "dense"
    preset: str = "tiny"
    options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    text: str | None = None
    eval_bytes: int = 65536
    extrapolate: tuple[int, ...] = (2, 4)
    eval_batch: int = 8


class LMTask:
    """Next-byte prediction on a :class:`~subq.tasks.text.ByteCorpus`."""

    def __init__(self, cfg: LMTaskConfig, seed: int) -> None:
        if cfg.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {', '.join(MIXERS)}; got {cfg.mixer!r}")
        if cfg.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {cfg.preset!r}")
        self.cfg = cfg
        self.corpus = load_corpus(cfg.text)
        self.sampler = WindowSampler(self.corpus.train, cfg.seq_len, seed)
        self.lengths = [cfg.seq_len * m for m in (1, *cfg.extrapolate)]

    def config(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "corpus": self.corpus.name,
                "train_bytes": self.corpus.train.numel()}

    def model_config(self):
        return lm_config(self.cfg.preset, self.cfg.mixer, options=dict(self.cfg.options),
                         max_len=max(self.lengths))

    def build_model(self) -> LM:
        return LM(self.model_config())

    def batch(self, step: int, size: int, start: int, count: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.batch(step, size, start=start, count=count)
        return inputs.to(device), targets.to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        logits = model(inputs)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return nll + unwrap(model).aux_loss(), inputs.numel()

    def bpb(self, model: LM, data: torch.Tensor, length: int) -> float:
        """Bits per byte of ``model`` on ``eval_bytes // length`` windows of ``data``."""
        device = next(model.parameters()).device
        inputs, targets = eval_windows(data, length, max(1, self.cfg.eval_bytes // length))
        total, count = 0.0, 0
        for i in range(0, inputs.shape[0], self.cfg.eval_batch):
            x = inputs[i:i + self.cfg.eval_batch].to(device)
            y = targets[i:i + self.cfg.eval_batch].to(device)
            logits = model(x).float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        return bits_per_byte(total / count)

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        entries = [{"split": "train", "length": self.cfg.seq_len,
                    "bpb": self.bpb(model, self.corpus.train, self.cfg.seq_len)}]
        for length in self.lengths:
            if model.supports_length(length) and self.corpus.valid.numel() > length:
                entries.append({"split": "valid", "length": length,
                                "bpb": self.bpb(model, self.corpus.valid, length)})
        return entries


def default_out(cfg: LMTaskConfig, seed: int) -> str:
    return str(Path("runs") / "lm" / f"{cfg.mixer}-{cfg.preset}-L{cfg.seq_len}-s{seed}")


def train(cfg: LMTaskConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) one LM run; returns the trainer's summary plus the parameter count
    (empty on ranks other than 0)."""
    if not trainer.out:
        trainer = replace(trainer, out=default_out(cfg, trainer.seed))
    task = LMTask(cfg, trainer.seed)
    return train_task(task, trainer, lambda params: (
        f"lm {cfg.mixer} ({cfg.preset}): {params:,} parameters; corpus "
        f"{task.corpus.name}: {task.corpus.train.numel():,} train bytes "
        f"({task.corpus.train_documents} documents), {task.corpus.valid.numel():,} "
        f"held out ({task.corpus.valid_documents}); out {trainer.out}"))


def parse_option(text: str) -> tuple[str, Any]:
    """``"window=128"`` -> ``("window", 128)``; values are Python literals or plain strings."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--option takes NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train lm ...``."""
    from .commands import train_subparsers

    p = train_subparsers(subparsers).add_parser(
        "lm", help="a byte-level LM whose token mixer is any mechanism")
    defaults = LMTaskConfig()
    p.add_argument("--mixer", choices=MIXERS, default=defaults.mixer)
    p.add_argument("--preset", choices=tuple(PRESETS), default=defaults.preset)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--text", default=None,
                   help="your own corpus: a text file or a folder of *.txt/*.rst/*.md, or "
                        "'pydoc_data' for the standard library's small one (default: "
                        "Python's documentation, Debian python3.11-doc)")
    p.add_argument("--option", type=parse_option, action="append", default=[],
                   metavar="NAME=VALUE", help="a mixer option, e.g. window=128 (repeatable)")
    p.add_argument("--eval-bytes", type=int, default=defaults.eval_bytes)
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = LMTaskConfig(mixer=args.mixer, preset=args.preset, options=dict(args.option),
                       seq_len=args.seq_len, text=args.text, eval_bytes=args.eval_bytes)
    result = train(cfg, trainer_config(args))
    if result:
        evals = ", ".join(f"{e['split']}@{e['length']} {e['bpb']:.4f} bpb"
                          for e in result["evals"])
        print(f"step {result['step']}, loss {result['loss']:.4f}, "
              f"{result['seconds']:.0f} s training; {evals}")
    return 0
