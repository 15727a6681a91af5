"""Train a class-conditional DiT on Fashion-MNIST with the one trainer (IDDPM's diffusion):

    subq train dit --attention softmax --preset mini --steps N --out TEACHER
    subq train lit --teacher TEACHER --init {scratch,inherit} --distill {none,hybrid} ...

``dit`` trains any attention of :data:`subq.models.dit.ATTENTIONS` (``softmax``: the teacher);
``lit`` is the same recipe with LiT's defaults (``linear`` attention with 2 heads, weight
inheritance and hybrid distillation from ``--teacher``; :mod:`subq.recipes.lit`).

One step draws, for its global batch, the images and labels (:class:`ImageSampler`, epochs of
the training split), then from a generator seeded by ``(seed, step)`` the timesteps ``t ~
U{0..T-1}``, the noise and which labels drop to the null class (probability
``class_dropout_prob``, for classifier-free guidance), so a batch is a function of the seed and
the step alone (exact resume, any world size). The loss is IDDPM's ``L_simple + lambda T L_t``
(:class:`~subq.recipes.gaussian_diffusion.GaussianDiffusion`), plus LiT's distillation terms.

Each evaluation scores the first ``eval_images`` test images at timesteps and noise drawn from
a generator of fixed seed (the same for every run, so runs compare on the same draws): the
mean ``mse``, ``vb`` (bits/dim) and ``loss``; with ``fid_samples > 0`` and a ``fid_classifier``
(a ``cnn`` vision checkpoint), also FID-FMNIST (:mod:`subq.recipes.frechet`) of
``fid_samples`` images (labels cycling through the classes) drawn with ``sample_steps`` steps
of ``sampler`` at guidance ``cfg_scale``, against all the test images.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.dit import ATTENTIONS, DIT_PRESETS, DiT, DiTConfig, dit_config
from ..tasks.batches import batch_rows, seeded_generator
from ..tasks.fashion_mnist import ImageSampler, load_fashion_mnist
from .arguments import add_trainer_arguments, trainer_config
from .diffusion_sampling import SAMPLERS, guided, sample
from .gaussian_diffusion import GaussianDiffusion
from .lit import (
    DISTILL_NOISE,
    DISTILL_VARIANCE,
    VARIANCE_TARGETS,
    Inheritance,
    hybrid_distillation,
    inherit_weights,
    load_dit,
)
from .trainer import TrainerConfig, train_task, unwrap

#: DiT's optimiser (AdamW, betas 0.9 / 0.999, no weight decay) at a learning rate for these
#: small models and short runs (DiT's 1e-4 is tuned for 400K steps), 100 warm-up steps and a
#: constant rate after (DiT's), batches of 64 images, no clipping, evaluations every 500 steps.
TRAINER_DEFAULTS = TrainerConfig(out="", steps=2000, batch=64, lr=1e-3, min_lr_ratio=1.0,
                                 warmup=100, weight_decay=0.0, beta2=0.999, grad_clip=0.0,
                                 eval_every=500, checkpoint_every=100, log_every=10)

INITS = ("scratch", "inherit")
DISTILLS = ("none", "hybrid")
EVAL_SEED = 1234
"""The seed of the held-out draws (timesteps, noise, samples): fixed, so runs compare."""


@dataclass
class DiffusionTaskConfig:
    """The model, the diffusion and the data of one run.

    ``attention_heads``: heads of the attention layer (None: the preset's); ``teacher``: a
    ``subq train dit`` run (folder or checkpoint) that ``init="inherit"`` copies its
    non-attention weights from and ``distill="hybrid"`` distils from, with the weights
    ``distill_noise``, ``distill_variance`` on the raw or log variance (``variance_target``).
    """

    attention: str = "softmax"
    preset: str = "tiny"
    attention_heads: int | None = None
    data: str | None = None
    diffusion_steps: int = 1000
    teacher: str | None = None
    init: str = "scratch"
    distill: str = "none"
    distill_noise: float = DISTILL_NOISE
    distill_variance: float = DISTILL_VARIANCE
    variance_target: str = "raw"
    eval_images: int = 1000
    eval_batch: int = 250
    fid_classifier: str | None = None
    fid_samples: int = 0
    sample_steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 1.0

    def check(self) -> None:
        for name, value, allowed in (("attention", self.attention, ATTENTIONS),
                                     ("preset", self.preset, tuple(DIT_PRESETS)),
                                     ("init", self.init, INITS),
                                     ("distill", self.distill, DISTILLS),
                                     ("variance_target", self.variance_target, VARIANCE_TARGETS),
                                     ("sampler", self.sampler, SAMPLERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if (self.init == "inherit" or self.distill == "hybrid") and not self.teacher:
            raise ValueError(f"init={self.init!r} / distill={self.distill!r} need a teacher "
                             "(--teacher, a `subq train dit --attention softmax` run)")
        for name in ("diffusion_steps", "eval_batch", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_images < 0 or self.fid_samples < 0:
            raise ValueError("eval_images and fid_samples must be >= 0")
        if self.fid_samples and not self.fid_classifier:
            raise ValueError("fid_samples > 0 needs fid_classifier (a `subq train vision "
                             "--backbone cnn` run)")
        if self.fid_samples == 1:
            raise ValueError("fid_samples must be 0 or >= 2 (a covariance needs two samples)")


class DiffusionTask:
    """Class-conditional diffusion on Fashion-MNIST by a :class:`~subq.models.dit.DiT`."""

    def __init__(self, cfg: DiffusionTaskConfig, seed: int) -> None:
        cfg.check()
        self.cfg, self.seed = cfg, seed
        self.model_config = dit_config(cfg.preset, attention=cfg.attention,
                                       attention_heads=cfg.attention_heads)
        self.load_data(cfg.data, cfg.diffusion_steps)
        self.teacher = None if cfg.teacher is None else load_dit(cfg.teacher)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.inheritance: Inheritance | None = None
        self._fid: tuple[Any, Any] | None = None

    def load_data(self, data: str | None, diffusion_steps: int) -> None:
        """Fashion-MNIST's splits, the epoch sampler and the diffusion process."""
        self.dataset = load_fashion_mnist(data)
        images, labels = self.dataset.as_tensors("train")
        self.sampler = ImageSampler(images, labels, self.seed)
        self.test_images, self.test_labels = self.dataset.as_tensors("test")
        self.diffusion = GaussianDiffusion.linear(diffusion_steps,
                                                  learn_sigma=self.model_config.learn_sigma)

    @property
    def resolution(self) -> int:
        """The side of the images the model denoises."""
        return self.model_config.image_size

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The diffusion's ``x_0`` for a batch of dataset images and the model's extra inputs
        (here the images themselves and none; Scale-DiT's bridge upsamples and adds a guide)."""
        return images, {}

    def config(self) -> dict[str, Any]:
        inherited = {} if self.inheritance is None else self.inheritance._asdict()
        return {**asdict(self.cfg), "model": asdict(self.model_config),
                "dataset": self.dataset.source, "inheritance": inherited}

    def build_model(self) -> nn.Module:
        model = DiT(self.model_config)
        if self.cfg.init == "inherit":
            self.inheritance = inherit_weights(model, self.teacher)
        return model

    def batch(self, step: int, size: int, start: int, count: int, device: torch.device
              ) -> tuple[torch.Tensor, ...]:
        images, labels = self.sampler.batch(step, size)
        g = seeded_generator(self.seed, "diffusion", step)
        t = torch.randint(0, self.diffusion.num_timesteps, (size,), generator=g)
        noise = torch.randn((size, images.shape[1], self.resolution, self.resolution),
                            generator=g)
        drop = torch.rand(size, generator=g) < self.model_config.class_dropout_prob
        rows = batch_rows(size, start, count)
        return tuple(x[rows].to(device) for x in (images, labels, t, noise, drop))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, int]:
        images, y, t, noise, drop = batch
        x0, inputs = self.prepare(images)
        terms = self.diffusion.training_losses(
            lambda x, s: model(x, s, y, force_drop=drop, **inputs), x0, t, noise)
        loss = terms["loss"]
        if self.teacher is not None and self.cfg.distill == "hybrid":
            teacher = self.teacher.to(x0.device)
            with torch.no_grad():
                target = teacher(terms["x_t"], t, y, force_drop=drop)
            loss = loss + hybrid_distillation(
                self.diffusion, terms["output"], target, terms["x_t"], t,
                noise_weight=self.cfg.distill_noise, variance_weight=self.cfg.distill_variance,
                variance_target=self.cfg.variance_target)
        return loss.mean(), x0.shape[0]

    def held_out_loss(self, model: nn.Module) -> dict[str, float]:
        """Mean ``mse``, ``vb`` and ``loss`` over the first ``eval_images`` test images at
        the fixed held-out draws."""
        device = next(model.parameters()).device
        count = self.cfg.eval_images or self.test_images.shape[0]
        images, y = self.test_images[:count], self.test_labels[:count]
        g = seeded_generator(EVAL_SEED, "held-out")
        t = torch.randint(0, self.diffusion.num_timesteps, (images.shape[0],), generator=g)
        noise = torch.randn((images.shape[0], images.shape[1], self.resolution,
                             self.resolution), generator=g)
        sums = {"mse": 0.0, "vb": 0.0, "loss": 0.0}
        for i in range(0, images.shape[0], self.cfg.eval_batch):
            part = slice(i, i + self.cfg.eval_batch)
            labels = y[part].to(device)
            keep = torch.zeros_like(labels, dtype=torch.bool)
            x0, inputs = self.prepare(images[part].to(device))

            def predict(x, s, labels=labels, keep=keep, inputs=inputs):
                return model(x, s, labels, force_drop=keep, **inputs)

            terms = self.diffusion.training_losses(predict, x0, t[part].to(device),
                                                   noise[part].to(device))
            for key in sums:
                sums[key] += float(terms[key].sum())
        return {key: value / max(1, images.shape[0]) for key, value in sums.items()}

    def generate(self, model: nn.Module, count: int, seed: int = EVAL_SEED) -> torch.Tensor:
        """``count`` samples ``(count, 1, 28, 28)`` of labels ``0, 1, ..., 9, 0, ...`` with the
        configured sampler, steps and guidance."""
        return generate(model, self.diffusion, count, steps=self.cfg.sample_steps,
                        sampler=self.cfg.sampler, cfg_scale=self.cfg.cfg_scale, seed=seed)

    def fid(self, model: nn.Module) -> float:
        from .frechet import feature_statistics, fid_fmnist, load_feature_classifier

        if self._fid is None:
            classifier = load_feature_classifier(self.cfg.fid_classifier)
            self._fid = (classifier, feature_statistics(classifier, self.test_images))
        classifier, reference = self._fid
        classifier.to(next(model.parameters()).device)
        return fid_fmnist(classifier, self.generate(model, self.cfg.fid_samples), reference)

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        count = min(self.cfg.eval_images or self.test_images.shape[0],
                    self.test_images.shape[0])
        entry = {"split": "test", "images": count, **self.held_out_loss(model)}
        if self.cfg.fid_samples:
            entry["fid_fmnist"] = self.fid(model)
            entry["fid_samples"] = self.cfg.fid_samples
        return [entry]


def generate(model: nn.Module, diffusion: GaussianDiffusion, count: int, *, steps: int,
             sampler: str = "ddim", cfg_scale: float = 1.0, seed: int = EVAL_SEED,
             batch: int = 500) -> torch.Tensor:
    """``count`` samples of a class-conditional DiT, labels ``i % num_classes``, from
    ``diffusion`` respaced to ``steps`` steps, in batches of ``batch`` (batch ``j`` seeded by
    ``(seed, j)``)."""
    model = unwrap(model)
    cfg: DiTConfig = model.cfg
    device = next(model.parameters()).device
    process = diffusion.respaced(steps)
    labels = torch.arange(count) % cfg.num_classes
    parts = []
    for j, i in enumerate(range(0, count, batch)):
        y = labels[i:i + batch].to(device)
        shape = (y.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
        draw = seeded_generator(seed, "samples", j).initial_seed()
        parts.append(sample(process, guided(model, y, cfg_scale), shape, seed=draw,
                            device=device, sampler=sampler))
    return torch.cat(parts).clamp(-1, 1)


def default_out(cfg: DiffusionTaskConfig, seed: int) -> str:
    name = f"{cfg.attention}-{cfg.preset}-{cfg.init}-{cfg.distill}-s{seed}"
    return str(Path("runs") / "dit" / name)


def train(cfg: DiffusionTaskConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) one run; returns the trainer's summary plus the parameter count
    (empty on ranks other than 0)."""
    if not trainer.out:
        trainer = replace(trainer, out=default_out(cfg, trainer.seed))
    task = DiffusionTask(cfg, trainer.seed)

    def describe(params: int) -> str:
        text = (f"dit {cfg.attention} ({cfg.preset}): {params:,} parameters; "
                f"{task.dataset.source}: {task.sampler.images.shape[0]:,} train images; "
                f"{cfg.diffusion_steps} diffusion steps; out {trainer.out}")
        if task.inheritance is not None:
            loaded, fresh = task.inheritance
            text += (f"\ninherited from {cfg.teacher}: {len(loaded)} tensors; fresh "
                     f"(attention): {', '.join(fresh)}")
        return text

    return train_task(task, trainer, describe)


def _add_arguments(p: argparse.ArgumentParser, defaults: DiffusionTaskConfig) -> None:
    p.add_argument("--attention", choices=ATTENTIONS, default=defaults.attention)
    p.add_argument("--preset", choices=tuple(DIT_PRESETS), default=defaults.preset)
    p.add_argument("--attention-heads", type=int, default=defaults.attention_heads,
                   help="heads of the attention layer (default: the preset's)")
    p.add_argument("--data", default=None,
                   help="a folder of the four Fashion-MNIST idx files (default: the Debian "
                        "package dataset-fashion-mnist)")
    p.add_argument("--diffusion-steps", type=int, default=defaults.diffusion_steps)
    p.add_argument("--teacher", default=defaults.teacher,
                   help="a `subq train dit` run (folder or checkpoint.pt) to inherit from or "
                        "distil from")
    p.add_argument("--init", choices=INITS, default=defaults.init,
                   help="inherit: load every teacher weight outside attention")
    p.add_argument("--distill", choices=DISTILLS, default=defaults.distill,
                   help="hybrid: LiT's distillation on the teacher's noise and variance")
    p.add_argument("--distill-noise", type=float, default=defaults.distill_noise)
    p.add_argument("--distill-variance", type=float, default=defaults.distill_variance)
    p.add_argument("--variance-target", choices=VARIANCE_TARGETS,
                   default=defaults.variance_target)
    p.add_argument("--eval-images", type=int, default=defaults.eval_images,
                   help="test images of the held-out loss (0 = all)")
    p.add_argument("--eval-batch", type=int, default=defaults.eval_batch)
    p.add_argument("--fid-classifier", default=None,
                   help="a `subq train vision --backbone cnn` run: FID-FMNIST at evaluations")
    p.add_argument("--fid-samples", type=int, default=defaults.fid_samples)
    p.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    p.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler)
    p.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    add_trainer_arguments(p, TRAINER_DEFAULTS)
    p.set_defaults(run=_run)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq train dit ...`` and ``subq train lit ...`` (LiT's defaults)."""
    from .commands import train_subparsers

    train = train_subparsers(subparsers)
    _add_arguments(train.add_parser(
        "dit", help="class-conditional diffusion on Fashion-MNIST: a DiT, attention by name"),
        DiffusionTaskConfig())
    _add_arguments(train.add_parser(
        "lit", help="LiT: a linear DiT inheriting from and distilled from a softmax teacher"),
        DiffusionTaskConfig(attention="linear", attention_heads=2, init="inherit",
                            distill="hybrid"))


def _run(args: argparse.Namespace) -> int:
    cfg = DiffusionTaskConfig(**{f.name: getattr(args, f.name)
                                 for f in fields(DiffusionTaskConfig)})
    result = train(cfg, trainer_config(args))
    if result:
        evals = ", ".join(", ".join(f"{k} {v:.4f}" for k, v in e.items()
                                    if isinstance(v, float)) for e in result["evals"])
        print(f"step {result['step']}, loss {result['loss']:.4f}, "
              f"{result['seconds']:.0f} s training; test {evals}")
    return 0
