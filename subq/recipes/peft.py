"""Parameter-efficient fine-tuning of a pretrained language model on the one trainer:
``subq train peft --method {ntk,lora,prefix,full} --model smollm2 --task {lookup,domain}``.

The methods (:mod:`subq.integrations.peft`): NTK-Attention's prefix summaries on every layer,
LoRA on ``q_proj`` and ``v_proj``, prefix tuning, and full fine-tuning; LoRA's rank and the
prefix's length default to the values whose trainable count matches NTK's.

Tasks (both offline):

``lookup``
    :class:`~subq.tasks.lookup.KeyValueLookup`, a record format with labels from a seeded
    program; loss: the answer token's cross-entropy; score: exact match on held-out examples.
``domain``
    Domain adaptation to a held-out corpus, Python's documentation by default (the corpus of
    ``subq train lm``; ``--text`` for your own), tokenized by the model's tokenizer; loss:
    next-token cross-entropy over windows of ``seq_len`` tokens; score: held-out perplexity.

Every run evaluates before its first step (the pretrained model with the method added, which
for NTK and LoRA is the stock model) and every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.peft import METHODS, apply_peft, matched_prefix_length, trainable_count
from ..tasks.lookup import KeyValueLookup, LookupBatch
from ..tasks.text import WindowSampler, eval_windows, load_corpus, tokenize_split
from .arguments import add_trainer_arguments, trainer_config
from .trainer import TrainerConfig, train_task

TASKS = ("lookup", "domain")

#: Learning rate by method when ``--lr`` is not given: NTK-Attention's released code trains
#: its summaries at 1e-3, and LoRA and the prefix take the same; full fine-tuning of every
#: weight at 1e-3 would wreck a pretrained model, so it takes 3e-5.
METHOD_LR = {"ntk": 1e-3, "lora": 1e-3, "prefix": 1e-3, "full": 3e-5}

#: The trainer's settings: AdamW (betas 0.9, 0.95, no weight decay), 20 warm-up steps, cosine
#: to 10 %, batches of 16, evaluation every 50 steps, a checkpoint every 25.
TRAINER_DEFAULTS = TrainerConfig(out="", steps=200, batch=16, lr=METHOD_LR["ntk"],
                                 min_lr_ratio=0.1, warmup=20, weight_decay=0.0,
                                 eval_every=50, checkpoint_every=25, log_every=5,
                                 eval_first=True)


@dataclass
class PeftTaskConfig:
    """The model, the method and the data of one run. ``rank``/``prefix_length`` ``None``:
    matched to NTK-Attention's trainable count; ``layers`` ``None``: every layer."""

    method: str = "ntk"
    model: str = "smollm2"
    task: str = "lookup"
    rank: int | None = None
    alpha: float | None = None
    prefix_length: int | None = None
    layers: tuple[int, ...] | None = None
    pairs: int = 8
    eval_examples: int = 256
    seq_len: int = 128
    text: str | None = None
    eval_tokens: int = 16384
    eval_batch: int = 16


def pretrained_model(name: str) -> nn.Module:
    """A model :mod:`subq.integrations.models` knows, loaded offline."""
    from ..integrations.models import load

    return load(name)[0]


def pretrained_tokenizer(name: str):
    """That model's tokenizer (no weights loaded)."""
    from ..integrations.models import load_tokenizer

    return load_tokenizer(name)


class PeftTask:
    """One fine-tune: the pretrained model with the method added, and the task's data."""

    def __init__(self, cfg: PeftTaskConfig, seed: int) -> None:
        if cfg.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
        if cfg.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
        self.cfg, self.seed = cfg, seed
        self.tokenizer = pretrained_tokenizer(cfg.model)
        if cfg.task == "lookup":
            self.lookup = KeyValueLookup(self.tokenizer, cfg.pairs, seed)
            self.held_out = self.lookup.held_out(cfg.eval_examples)
        else:
            corpus = load_corpus(cfg.text)
            self.corpus_name = corpus.name
            self.train_ids = tokenize_split(corpus.train, self.tokenizer)
            self.valid_ids = tokenize_split(corpus.valid, self.tokenizer)
            self.sampler = WindowSampler(self.train_ids, cfg.seq_len, seed)
        self.trainable = 0

    def config(self) -> dict[str, Any]:
        data = ({"example_tokens": self.lookup.length} if self.cfg.task == "lookup" else
                {"corpus": self.corpus_name, "train_tokens": self.train_ids.numel(),
                 "valid_tokens": self.valid_ids.numel()})
        return {**asdict(self.cfg), **data}

    def init_ids(self, length: int) -> torch.Tensor:
        """Real text of the task whose keys and values start a prefix (Li & Liang)."""
        if self.cfg.task == "domain":
            return self.train_ids[:length].long()
        examples = self.lookup.batch(0, -(-length // self.lookup.length)).ids
        return examples.flatten()[:length]

    def build_model(self) -> nn.Module:
        model = pretrained_model(self.cfg.model)
        length = self.cfg.prefix_length
        if self.cfg.method == "prefix" and length is None:
            length = matched_prefix_length(model, self.cfg.layers)
        init = self.init_ids(length) if self.cfg.method == "prefix" else None
        apply_peft(model, self.cfg.method, rank=self.cfg.rank, alpha=self.cfg.alpha,
                   prefix_length=length, layers=self.cfg.layers, init_ids=init)
        self.trainable = trainable_count(model)
        return model

    def batch(self, step: int, size: int, start: int, count: int, device: torch.device):
        if self.cfg.task == "lookup":
            return self.lookup.batch(step, size, start, count).ids.to(device)
        inputs, targets = self.sampler.batch(step, size, start=start, count=count)
        return inputs.to(device), targets.to(device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        if self.cfg.task == "lookup":
            logits = _answer_logits(model, batch)
            return F.cross_entropy(logits, batch[:, -1]), batch[:, :-1].numel()
        inputs, targets = batch
        logits = model(input_ids=inputs).logits
        return (F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()),
                inputs.numel())

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        device = next(model.parameters()).device
        if self.cfg.task == "lookup":
            return [{"split": "valid", **lookup_scores(model, self.held_out,
                                                        self.cfg.eval_batch, device)}]
        count = max(1, self.cfg.eval_tokens // self.cfg.seq_len)
        inputs, targets = eval_windows(self.valid_ids, self.cfg.seq_len, count)
        total = 0.0
        for i in range(0, inputs.shape[0], self.cfg.eval_batch):
            logits = model(input_ids=inputs[i:i + self.cfg.eval_batch].to(device)).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(),
                                     targets[i:i + self.cfg.eval_batch].flatten().to(device),
                                     reduction="sum").item()
        nll = total / targets.numel()
        return [{"split": "valid", "nll": nll, "perplexity": math.exp(nll),
                 "tokens": targets.numel()}]


def _answer_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, V)`` at the position before each example's answer (its last token)."""
    return model(input_ids=ids[:, :-1], logits_to_keep=1).logits[:, -1].float()


def lookup_scores(model: nn.Module, held_out: LookupBatch, batch: int,
                  device: torch.device) -> dict[str, float]:
    """Exact match and the answer's mean cross-entropy over the held-out examples."""
    hits, total = 0, 0.0
    for i in range(0, held_out.ids.shape[0], batch):
        ids = held_out.ids[i:i + batch].to(device)
        logits = _answer_logits(model, ids)
        hits += int((logits.argmax(-1) == ids[:, -1]).sum())
        total += F.cross_entropy(logits, ids[:, -1], reduction="sum").item()
    count = held_out.ids.shape[0]
    return {"exact_match": hits / count, "nll": total / count, "examples": count}


RECORD = "peft.json"
"""A run's trainable and total parameter counts and training seconds per step."""


def default_out(cfg: PeftTaskConfig, seed: int) -> str:
    return str(Path("runs") / "peft" / f"{cfg.task}-{cfg.method}-s{seed}")


def train(cfg: PeftTaskConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) one fine-tune; returns the trainer's summary plus the model's and the
    trainable parameter counts (empty on ranks other than 0), also written to
    ``OUT/peft.json`` with the training seconds per step."""
    if not trainer.out:
        trainer = replace(trainer, out=default_out(cfg, trainer.seed))
    task = PeftTask(cfg, trainer.seed)
    result = train_task(task, trainer, lambda params: (
        f"peft {cfg.method} on {cfg.model} ({params:,} parameters, {task.trainable:,} "
        f"trainable), task {cfg.task}; out {trainer.out}"))
    if not result:
        return result
    record = {"trainable": task.trainable, "parameters": result["parameters"],
              "step": result["step"],
              "seconds_per_step": result["seconds"] / max(1, result["step"])}
    (Path(trainer.out) / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return {**result, "trainable": task.trainable}


def _layers(text: str) -> tuple[int, ...]:
    """``"3-29"`` or ``"0,2,4"`` -> layer indices."""
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers += range(int(first), int(last or first) + 1)
    return tuple(layers)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train peft ...``."""
    from .commands import train_subparsers

    p = train_subparsers(subparsers).add_parser(
        "peft", help="NTK-Attention, LoRA, prefix tuning or full fine-tuning of SmolLM2")
    defaults = PeftTaskConfig()
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    p.add_argument("--model", default=defaults.model, help="a model subq.integrations.models "
                   "loads offline (default smollm2: SmolLM2-135M-Instruct)")
    p.add_argument("--task", choices=TASKS, default=defaults.task)
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank (default: matched to NTK's trainable count)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--prefix-length", type=int, default=None,
                   help="prefix tuning's pairs per layer (default: matched to NTK's count)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layers to adapt, e.g. 3-29 or 0,2,4 (default: all)")
    p.add_argument("--pairs", type=int, default=defaults.pairs, help="lookup: records per "
                   "example")
    p.add_argument("--eval-examples", type=int, default=defaults.eval_examples)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="domain: tokens per "
                   "window")
    p.add_argument("--text", default=None, help="domain: your own corpus (a text file or a "
                   "folder; default: Python's documentation, Debian python3.11-doc)")
    p.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run, lr=None)


def _run(args: argparse.Namespace) -> int:
    cfg = PeftTaskConfig(method=args.method, model=args.model, task=args.task,
                         rank=args.rank, alpha=args.alpha, prefix_length=args.prefix_length,
                         layers=args.layers, pairs=args.pairs,
                         eval_examples=args.eval_examples, seq_len=args.seq_len,
                         text=args.text, eval_tokens=args.eval_tokens)
    if args.lr is None:
        args.lr = METHOD_LR[args.method]
    result = train(cfg, trainer_config(args))
    if result:
        evals = ", ".join(f"{k} {v:.4g}" for e in result["evals"] for k, v in e.items()
                          if k in ("exact_match", "perplexity", "nll"))
        print(f"step {result['step']}, loss {result['loss']:.4f}, {result['trainable']:,} "
              f"trainable, {result['seconds']:.0f} s training; {evals}")
    return 0
