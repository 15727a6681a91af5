"""Train an image classifier on Fashion-MNIST with the one trainer:
``subq train vision --backbone NAME --preset {tiny,micro} --steps N [--data DIR]``.

Backbones (:mod:`subq.models.vit`): ``groupmamba`` (GroupMamba, Shaker et al. 2024, fitted to
28 x 28 single-channel images) and ``vit-<attention>`` (a ViT, Dosovitskiy et al. 2021, whose
self attention is ``dense``, ``linear``, ``combiner``, ``hierarchical_local`` or ``local``),
the ViT sized to GroupMamba's parameter count at the same preset, and ``cnn`` (a small plain
CNN classifier, :class:`subq.models.cnn.FeatureCNN`, NOT parameter-matched: the feature network
of FID-FMNIST, :mod:`subq.recipes.frechet`, trained with
``subq train vision --backbone cnn --preset micro``).

The loss is the mean cross-entropy of the 10-class logits. With ``--teacher RUN`` (a trained
vision run, e.g. the ``cnn``), GroupMamba trains with its paper's DeiT-style hard distillation
(spec ``groupmamba.md`` section 3.3): a second head ``dist_head`` learns the teacher's labels
on the same augmented images,

    loss = (1 - alpha) CE(head(x), y) + alpha CE(dist_head(x), argmax teacher(x)),  alpha = 0.5,

and the evaluation scores the mean of the two heads' logits (GroupMamba's inference).
Augmentation: each training image is padded by 2 pixels of background and
cropped back to 28 x 28 at a random offset, then flipped left-right with probability 1/2; the
offsets and flips of step ``s``'s global batch are drawn from a generator seeded by
``(seed, s)`` alone, so batches (and the trainer's exact resume) do not depend on anything
that ran before. The evaluation reports the accuracy and the mean cross-entropy on the test
split (its first ``eval_images`` images, all 10,000 by default).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vit import BACKBONES, PRESETS, build_backbone, check_distillable
from ..tasks.batches import batch_rows, seeded_generator
from ..tasks.fashion_mnist import ImageSampler, load_fashion_mnist
from .arguments import add_trainer_arguments, trainer_config
from .checkpoint import evaluated_weights, read_run
from .trainer import TrainerConfig, train_task

#: The trainer's settings for images: AdamW lr 1e-3 (betas 0.9, 0.999 and weight decay 0.05 as
#: GroupMamba's recipe), 100 warm-up steps, cosine to 10 %, batches of 64 images, gradient
#: clipping at 5 (GroupMamba's), a checkpoint every 100 steps and an evaluation every 500.
TRAINER_DEFAULTS = TrainerConfig(out="", steps=2000, batch=64, lr=1e-3, min_lr_ratio=0.1,
                                 warmup=100, weight_decay=0.05, beta2=0.999, grad_clip=5.0,
                                 eval_every=500, checkpoint_every=100, log_every=10)

PAD = 2
"""Pixels of background padding before the random crop."""
DISTILL_ALPHA = 0.5
"""GroupMamba's (DeiT's) weight of the distillation head's loss."""


@dataclass
class VisionTaskConfig:
    """The backbone and the data of one run.

    ``data``: a folder of the four Fashion-MNIST idx files (default: the Debian package);
    ``eval_images``: test images scored per evaluation (0: the whole test split);
    ``augment``: random crop (2-pixel padding) and horizontal flip of training images;
    ``teacher``: a ``subq train vision`` run whose hard labels GroupMamba's second head learns,
    with weight ``distill_alpha``.
    """

    backbone: str = "groupmamba"
    preset: str = "tiny"
    data: str | None = None
    teacher: str | None = None
    distill_alpha: float = DISTILL_ALPHA
    eval_images: int = 0
    eval_batch: int = 256
    augment: bool = True


def augment(images: torch.Tensor, seed: int, step: int, background: float = -1.0
            ) -> torch.Tensor:
    """Step ``step``'s augmentation of its global batch ``images (B, C, H, W)``: a crop of the
    image padded by :data:`PAD` pixels of ``background`` at offsets drawn uniformly from
    ``0..2 PAD`` per image and axis, then a left-right flip of each image with probability 1/2;
    all drawn from a generator seeded by ``(seed, step)``."""
    batch, _, height, width = images.shape
    g = seeded_generator(seed, "augment", step)
    dy, dx = torch.randint(0, 2 * PAD + 1, (2, batch), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    padded = F.pad(images, (PAD, PAD, PAD, PAD), value=background)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None].to(images.device)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :].to(images.device)
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = padded[index, channel, rows, cols]
    return torch.where(flip.to(images.device)[:, None, None, None], out.flip(-1), out)


class VisionTask:
    """Fashion-MNIST classification by a :data:`~subq.models.vit.BACKBONES` backbone."""

    def __init__(self, cfg: VisionTaskConfig, seed: int) -> None:
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got "
                             f"{cfg.backbone!r}")
        if cfg.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {cfg.preset!r}")
        if not 0.0 <= cfg.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {cfg.distill_alpha}")
        if cfg.eval_images < 0 or cfg.eval_batch < 1:
            raise ValueError(f"need eval_images >= 0 and eval_batch >= 1, got "
                             f"{cfg.eval_images} and {cfg.eval_batch}")
        self.cfg, self.seed = cfg, seed
        self.dataset = load_fashion_mnist(cfg.data)
        images, labels = self.dataset.as_tensors("train")
        self.sampler = ImageSampler(images, labels, seed)
        test_images, test_labels = self.dataset.as_tensors("test")
        count = cfg.eval_images or test_images.shape[0]
        self.test = test_images[:count], test_labels[:count]
        self.teacher = None
        if cfg.teacher is not None:
            check_distillable(cfg.backbone)
            self.teacher = load_vision_model(cfg.teacher).requires_grad_(False)

    def config(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "dataset": self.dataset.source,
                "train_images": self.sampler.images.shape[0]}

    def build_model(self) -> nn.Module:
        return build_backbone(self.cfg.backbone, self.cfg.preset,
                              distillation=self.teacher is not None)

    def batch(self, step: int, size: int, start: int, count: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.sampler.batch(step, size)
        if self.cfg.augment:
            images = augment(images, self.seed, step)
        rows = batch_rows(size, start, count)
        return images[rows].to(device), labels[rows].to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, int]:
        images, labels = batch
        if self.teacher is None:
            return F.cross_entropy(model(images).float(), labels), images.shape[0]
        teacher = self.teacher.to(images.device)
        with torch.no_grad():
            teacher_labels = teacher(images).argmax(dim=-1)
        logits, dist_logits = model(images)
        return hard_distillation_loss(logits, dist_logits, labels, teacher_labels,
                                      self.cfg.distill_alpha), images.shape[0]

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        device = next(model.parameters()).device
        images, labels = self.test
        total, correct = 0.0, 0
        for i in range(0, images.shape[0], self.cfg.eval_batch):
            x = images[i:i + self.cfg.eval_batch].to(device)
            y = labels[i:i + self.cfg.eval_batch].to(device)
            logits = model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == y).sum())
        count = max(1, images.shape[0])
        return [{"split": "test", "images": images.shape[0], "accuracy": correct / count,
                 "loss": total / count}]


def hard_distillation_loss(logits: torch.Tensor, dist_logits: torch.Tensor,
                           labels: torch.Tensor, teacher_labels: torch.Tensor,
                           alpha: float = DISTILL_ALPHA) -> torch.Tensor:
    """DeiT's hard distillation, GroupMamba's objective: ``(1 - alpha) CE(logits, labels) +
    alpha CE(dist_logits, teacher_labels)`` (means over the batch)."""
    return ((1 - alpha) * F.cross_entropy(logits.float(), labels)
            + alpha * F.cross_entropy(dist_logits.float(), teacher_labels))


def load_vision_model(checkpoint: str | Path, device: torch.device | str | None = None, *,
                      backbone: str | None = None, hint: str = "") -> nn.Module:
    """The trained backbone of a ``subq train vision`` run (``OUT`` or ``OUT/checkpoint.pt``),
    in eval mode on ``device`` (default: the CPU). ``backbone``: the name it must have.
    ``FileNotFoundError`` / ``ValueError`` (ending with ``hint``, e.g. how to train one) when
    there is no such file, it is not a vision checkpoint or holds another backbone."""
    hint = hint or "train one with `subq train vision --backbone NAME --out DIR`"
    path, saved = read_run(checkpoint, hint)
    hint = "; " + hint
    task = saved.get("config", {}).get("task", {}) if isinstance(saved, dict) else {}
    if "backbone" not in task or "preset" not in task or "model" not in saved:
        raise ValueError(f"{path} is not a `subq train vision` checkpoint (no model state or "
                         f"no task backbone/preset){hint}")
    if backbone is not None and task["backbone"] != backbone:
        raise ValueError(f"{path} holds the backbone {task['backbone']!r}, but {backbone!r} is "
                         f"needed{hint}")
    model = build_backbone(task["backbone"], task["preset"],
                           distillation=task.get("teacher") is not None)
    model.load_state_dict(evaluated_weights(saved))
    return model.to(device or "cpu").eval()


def default_out(cfg: VisionTaskConfig, seed: int) -> str:
    return str(Path("runs") / "vision" / f"{cfg.backbone}-{cfg.preset}-s{seed}")


def train(cfg: VisionTaskConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) one run; returns the trainer's summary plus the parameter count
    (empty on ranks other than 0)."""
    if not trainer.out:
        trainer = replace(trainer, out=default_out(cfg, trainer.seed))
    task = VisionTask(cfg, trainer.seed)
    return train_task(task, trainer, lambda params: (
        f"vision {cfg.backbone} ({cfg.preset}): {params:,} parameters; "
        f"{task.dataset.source}: {task.sampler.images.shape[0]:,} train images, "
        f"{task.test[0].shape[0]:,} test images evaluated; out {trainer.out}"))


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train vision ...``."""
    from .commands import train_subparsers

    p = train_subparsers(subparsers).add_parser(
        "vision", help="Fashion-MNIST classification: GroupMamba or a ViT with any attention")
    defaults = VisionTaskConfig()
    p.add_argument("--backbone", choices=BACKBONES, default=defaults.backbone,
                   help="groupmamba, a ViT (vit-<attention>, parameter-matched to groupmamba) "
                        "or cnn (FID-FMNIST's feature network, not parameter-matched)")
    p.add_argument("--preset", choices=PRESETS, default=defaults.preset)
    p.add_argument("--data", default=None,
                   help="a folder of the four Fashion-MNIST idx files (default: the Debian "
                        "package dataset-fashion-mnist)")
    p.add_argument("--teacher", default=None,
                   help="a trained `subq train vision` run (e.g. the cnn): GroupMamba's hard "
                        "distillation on a second head")
    p.add_argument("--distill-alpha", type=float, default=defaults.distill_alpha)
    p.add_argument("--eval-images", type=int, default=defaults.eval_images,
                   help="test images per evaluation (0 = all)")
    p.add_argument("--eval-batch", type=int, default=defaults.eval_batch)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   default=defaults.augment,
                   help="random 2-pixel-padded crop and horizontal flip")
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = VisionTaskConfig(backbone=args.backbone, preset=args.preset, data=args.data,
                           teacher=args.teacher, distill_alpha=args.distill_alpha,
                           eval_images=args.eval_images, eval_batch=args.eval_batch,
                           augment=args.augment)
    result = train(cfg, trainer_config(args))
    if result:
        evals = ", ".join(f"{e['split']} accuracy {e['accuracy']:.4f} loss {e['loss']:.4f}"
                          for e in result["evals"])
        print(f"step {result['step']}, loss {result['loss']:.4f}, "
              f"{result['seconds']:.0f} s training; {evals}")
    return 0

