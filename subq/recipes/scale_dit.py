"""Scale-DiT on a trained DiT (Zhang & Tai, arXiv 2510.16325; spec ``scale_dit.md``): the LoRA
bridge fine-tune and sampling at 2x or 4x the training resolution.

    subq train scale-dit --base TEACHER --resolution 56 --steps N --out BRIDGE
    subq sample dit --checkpoint TEACHER --resolution 56 --bridge BRIDGE --out grid.png

**The bridge** (``subq train scale-dit``, on the one trainer): a
:class:`~subq.models.scale_dit.ScaleDiT` carrying the frozen weights of a ``subq train dit
--attention softmax`` run learns only its LoRA tensors, with the base run's diffusion loss on
high-resolution images given their clean low-resolution version as the guide (Scale-DiT trains
on 1024-pixel photographs with their 256-pixel resize as the guide). Fashion-MNIST has no
high-resolution images: the high-resolution targets are the 28-pixel images upsampled
(bicubic, clamped to ``[-1, 1]``), so here the guide determines the target, and the bridge can
learn to follow it closely. Scale-DiT's optimiser is Prodigy (lr 1) with clipping 0.1 and
weight decay 0.01; the recipe keeps the clipping and the decay with AdamW at a fixed rate.

**Sampling** (:func:`generate_high_res`, Scale-DiT's pipeline, spec section 2.1):

1. the low-resolution pass: the base DiT at its own resolution, dense attention, no LoRA
   (exactly what ``subq sample dit`` draws at that seed);
2. its samples upsampled (bicubic) to the target size and noised to the first of the last
   ``refine_steps`` steps (SDEdit; Scale-DiT runs 18 of 28, :data:`REFINE_FRACTION`);
3. the high-resolution pass over those steps with the clean low-resolution samples as the
   guide tokens (timestep 0, LoRA on), hierarchical local attention (or dense: the baseline).

``guidance=False`` is the naive alternative: the base DiT run directly at the high resolution
from pure noise, no guide, every step.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dit import DiT
from ..models.scale_dit import POSITIONS, SCALE_ATTENTIONS, ScaleDiT, ScaleDiTConfig
from ..ops.token_order import ORDERS
from ..tasks.batches import seeded_generator
from .arguments import add_trainer_arguments, trainer_config
from .checkpoint import evaluated_weights, read_run
from .diffusion_sampling import guided, sample
from .dit import EVAL_SEED, DiffusionTask, generate
from .gaussian_diffusion import GaussianDiffusion
from .lit import load_dit_run
from .trainer import TrainerConfig, train_task

REFINE_FRACTION = 18 / 28
"""Scale-DiT's high-resolution pass runs the last 18 of 28 steps (``hr_inference_steps``)."""

TRAINER_DEFAULTS = TrainerConfig(out="", steps=300, batch=32, lr=1e-3, min_lr_ratio=1.0,
                                 warmup=30, weight_decay=0.01, beta2=0.999, grad_clip=0.1,
                                 eval_every=100, checkpoint_every=50, log_every=10)


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of ``(B, C, h, w)`` images in ``[-1, 1]`` to ``size x size``, clamped
    back to ``[-1, 1]``."""
    return F.interpolate(images, size=(size, size), mode="bicubic",
                         align_corners=False).clamp(-1, 1)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area (box-filter) resize to ``size x size``: how high-resolution samples are scored at
    the training resolution."""
    return F.interpolate(images, size=(size, size), mode="area")


@dataclass
class BridgeTaskConfig:
    """The bridge of one resolution: ``base`` (a ``subq train dit --attention softmax``
    run) and the Scale-DiT geometry it trains with (``scale``)."""

    base: str = ""
    scale: ScaleDiTConfig = field(default_factory=ScaleDiTConfig)
    data: str | None = None
    eval_images: int = 500
    eval_batch: int = 100


class BridgeTask(DiffusionTask):
    """The LoRA bridge of :class:`~subq.models.scale_dit.ScaleDiT` on upsampled
    Fashion-MNIST (module docstring); the diffusion task's batches, loss and held-out loss
    with :meth:`prepare` making the high-resolution target and the guide."""

    def __init__(self, cfg: BridgeTaskConfig, seed: int) -> None:
        if not cfg.base:
            raise ValueError("base is required: a `subq train dit --attention softmax` run")
        if cfg.eval_batch < 1 or cfg.eval_images < 0:
            raise ValueError("eval_batch must be >= 1 and eval_images >= 0")
        self.cfg, self.seed = cfg, seed
        self.base_model, base_task = load_dit_run(cfg.base)
        self.model_config = self.base_model.cfg
        self.scale = cfg.scale
        self.scale.check(self.model_config)
        self.load_data(cfg.data, base_task["diffusion_steps"])
        self.teacher = None

    @property
    def resolution(self) -> int:
        return self.scale.resolution

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return upsample(images, self.scale.resolution), {"lo": images}

    def config(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "model": asdict(self.model_config),
                "dataset": self.dataset.source}

    def build_model(self) -> nn.Module:
        return ScaleDiT.from_dit(self.base_model, self.scale)

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        count = min(self.cfg.eval_images or self.test_images.shape[0],
                    self.test_images.shape[0])
        return [{"split": "test", "images": count, "resolution": self.resolution,
                 **self.held_out_loss(model)}]


def train_bridge(cfg: BridgeTaskConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) one bridge; the trainer's summary (empty on other ranks)."""
    size = cfg.scale.resolution
    if not trainer.out:
        trainer = replace(trainer, out=f"runs/scale-dit/bridge-{size}")
    task = BridgeTask(cfg, trainer.seed)

    def describe(params: int) -> str:
        model = ScaleDiT(task.model_config, task.scale)
        lora = sum(p.numel() for p in model.lora_parameters())
        return (f"scale-dit bridge at {size}x{size} on {cfg.base}: {lora:,} LoRA parameters "
                f"trained of {params:,}; {cfg.scale.attention} attention; "
                f"{task.dataset.source}; out {trainer.out}")

    return train_task(task, trainer, describe)


def load_bridge(checkpoint: str | os.PathLike, base: DiT, **overrides: Any) -> ScaleDiT:
    """The :class:`ScaleDiT` of a ``subq train scale-dit`` run on ``base`` (the DiT it was
    trained on), its geometry fields replaced by ``overrides`` (e.g. ``attention``)."""
    path, saved = read_run(checkpoint, "train one with `subq train scale-dit --base RUN`")
    scale = saved.get("config", {}).get("task", {}).get("scale")
    if not isinstance(scale, dict):
        raise ValueError(f"{path} is not a `subq train scale-dit` checkpoint (no task.scale)")
    model = ScaleDiT.from_dit(base, replace(ScaleDiTConfig(**scale), **overrides))
    model.load_state_dict(evaluated_weights(saved))
    return model.eval()


def high_res_steps(steps: int, refine_steps: int | None, guidance: bool = True) -> int:
    """How many steps the high-resolution pass runs: ``refine_steps`` (default
    ``round(REFINE_FRACTION * steps)``) with the guide, every step without it."""
    if not guidance:
        return steps
    refine = round(REFINE_FRACTION * steps) if refine_steps is None else refine_steps
    if not 1 <= refine <= steps:
        raise ValueError(f"refine_steps must be in [1, steps = {steps}], got {refine}")
    return refine


@torch.no_grad()
def generate_high_res(base: DiT, model: ScaleDiT, diffusion: GaussianDiffusion, count: int, *,
                      steps: int, refine_steps: int | None = None, guidance: bool = True,
                      sampler: str = "ddim", cfg_scale: float = 1.0, seed: int = EVAL_SEED,
                      batch: int = 100) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(low, high)``: ``count`` samples (labels ``i % classes``) at the base resolution
    (``None`` without ``guidance``) and at the model's, by the module docstring's pipeline;
    ``refine_steps`` defaults to ``round(REFINE_FRACTION * steps)``."""
    cfg = model.base
    refine = high_res_steps(steps, refine_steps, guidance)
    device = next(model.parameters()).device
    process = diffusion.respaced(steps)
    labels = torch.arange(count) % cfg.num_classes
    low = (generate(base, diffusion, count, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                    seed=seed) if guidance else None)
    size = model.cfg.resolution
    parts = []
    for j, i in enumerate(range(0, count, batch)):
        y = labels[i:i + batch].to(device)
        shape = (y.shape[0], cfg.in_channels, size, size)
        draw = seeded_generator(seed, "high-res", j).initial_seed()
        if guidance:
            guide = low[i:i + batch].to(device)
            parts.append(sample(process, guided(model, y, cfg_scale, lo=guide), shape,
                                seed=draw, device=device, sampler=sampler,
                                init=upsample(guide, size), steps=refine))
        else:
            parts.append(sample(process, guided(model, y, cfg_scale), shape, seed=draw,
                                device=device, sampler=sampler))
    return low, torch.cat(parts).clamp(-1, 1)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train scale-dit ...``."""
    from .commands import train_subparsers

    defaults = BridgeTaskConfig()
    p = train_subparsers(subparsers).add_parser(
        "scale-dit", help="Scale-DiT's LoRA bridge: a trained DiT sampling at 2x / 4x")
    p.add_argument("--base", required=True, help="a `subq train dit --attention softmax` run")
    choices = {"attention": SCALE_ATTENTIONS, "order": ORDERS, "positions": POSITIONS}
    for f in fields(ScaleDiTConfig):  # the geometry: --resolution, --window, --radius, ...
        default = getattr(defaults.scale, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(default),
                       choices=choices.get(f.name), default=default)
    p.add_argument("--data", default=None, help="the Fashion-MNIST idx folder")
    p.add_argument("--eval-images", type=int, default=defaults.eval_images)
    p.add_argument("--eval-batch", type=int, default=defaults.eval_batch)
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    scale = ScaleDiTConfig(**{f.name: getattr(args, f.name) for f in fields(ScaleDiTConfig)})
    cfg = BridgeTaskConfig(base=args.base, scale=scale, data=args.data,
                           eval_images=args.eval_images, eval_batch=args.eval_batch)
    result = train_bridge(cfg, trainer_config(args))
    if result:
        evals = ", ".join(f"{k} {v:.4f}" for e in result["evals"] for k, v in e.items()
                          if isinstance(v, float))
        print(f"step {result['step']}, loss {result['loss']:.4f}, "
              f"{result['seconds']:.0f} s training; test {evals}")
    return 0


__all__ = ["REFINE_FRACTION", "BridgeTask", "BridgeTaskConfig", "downsample",
           "generate_high_res", "high_res_steps", "load_bridge", "train_bridge", "upsample"]
