"""``subq sample dit --checkpoint RUN --out grid.png``: a grid of class-conditional samples of a
trained DiT (``subq train dit`` / ``subq train lit``), one row per class, with the sampler,
steps, guidance and seed given; optionally its FID-FMNIST (``--fid-classifier``, on
``--fid-samples`` samples against the test set, :mod:`subq.recipes.frechet`) and the time and
peak memory per sampling step, written beside the grid as JSON.

``--resolution R`` (a multiple of the training size) samples with Scale-DiT's pipeline
(:mod:`subq.recipes.scale_dit`): ``--attention hierarchical_local`` (or ``softmax``, the
dense baseline), ``--bridge`` a ``subq train scale-dit`` run, ``--no-guidance`` the DiT
directly at ``R``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..models.scale_dit import POSITIONS, SCALE_ATTENTIONS
from ..ops.token_order import ORDERS
from ..tasks.fashion_mnist import to_uint8
from .diffusion_sampling import SAMPLERS
from .dit import EVAL_SEED, generate
from .gaussian_diffusion import GaussianDiffusion
from .lit import load_dit_run


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """``(N, C, H, W)`` images in ``[-1, 1]`` tiled into one uint8 ``(rows H, cols W)`` image
    (``N = rows cols``; the first channel) with a 1-pixel background border."""
    count, _, height, width = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows")
    cols = count // rows
    pixels = torch.nn.functional.pad(to_uint8(images[:, 0].cpu()), (1, 1, 1, 1))
    pixels = pixels.reshape(rows, cols, height + 2, width + 2).permute(0, 2, 1, 3)
    return pixels.reshape(rows * (height + 2), cols * (width + 2))


def save_png(pixels: torch.Tensor, path: str | Path) -> None:
    """A uint8 ``(H, W)`` tensor as a greyscale PNG (parents created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)  # 2-D uint8: greyscale


def save_class_grid(images: torch.Tensor, classes: int, path: str | Path) -> None:
    """``images`` whose labels cycle ``0, 1, ..., classes - 1, 0, ...`` as a PNG grid with
    class ``c`` in row ``c``."""
    per_class = images.shape[0] // classes
    by_class = images.reshape(per_class, classes, *images.shape[1:]).transpose(0, 1)
    save_png(image_grid(by_class.reshape(images.shape), classes), path)


def sample_grid(checkpoint: str, out: str, *, per_class: int = 10, steps: int = 50,
                sampler: str = "ddim", cfg_scale: float = 1.0, seed: int = EVAL_SEED,
                fid_classifier: str | None = None, fid_samples: int = 1000,
                data: str | None = None) -> dict[str, Any]:
    """Write the grid (``per_class`` samples per class, class ``c`` in row ``c``) to ``out``
    and ``out`` with suffix ``.json`` (the settings, seconds and peak memory per step, and
    FID-FMNIST when ``fid_classifier`` is given); returns that record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, task = load_dit_run(checkpoint, device)
    cfg = model.cfg
    diffusion = GaussianDiffusion.linear(task["diffusion_steps"], learn_sigma=cfg.learn_sigma)
    count = per_class * cfg.num_classes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    images = generate(model, diffusion, count, steps=steps, sampler=sampler,
                      cfg_scale=cfg_scale, seed=seed)
    seconds = time.perf_counter() - tic
    save_class_grid(images, cfg.num_classes, out)
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint), "attention": cfg.attention, "samples": count,
        "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "seed": seed,
        "device": str(device), "seconds_per_step": seconds / steps,
        "peak_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                            if device.type == "cuda" else None)}
    if fid_classifier:
        from .frechet import fid_fmnist, load_feature_classifier, reference_statistics

        classifier = load_feature_classifier(fid_classifier, device)
        samples = generate(model, diffusion, fid_samples, steps=steps, sampler=sampler,
                           cfg_scale=cfg_scale, seed=seed)
        record["fid_fmnist"] = fid_fmnist(classifier, samples,
                                          lambda c: reference_statistics(c, data))
        record["fid_samples"] = fid_samples
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def sample_high_res_grid(checkpoint: str, out: str, *, resolution: int,
                         attention: str = "hierarchical_local", bridge: str | None = None,
                         guidance: bool = True, refine_steps: int | None = None,
                         order: str | None = None, positions: str | None = None,
                         per_class: int = 10, steps: int = 50, sampler: str = "ddim",
                         cfg_scale: float = 1.0, seed: int = EVAL_SEED,
                         fid_classifier: str | None = None, fid_samples: int = 1000,
                         data: str | None = None, batch: int = 100) -> dict[str, Any]:
    """Scale-DiT's sampling of a trained DiT at ``resolution``
    (:func:`subq.recipes.scale_dit.generate_high_res`) with the LoRA ``bridge`` of that
    resolution (a ``subq train scale-dit`` run; without one the bridge stays at its
    initialisation, which is off). Writes the high-resolution grid to ``out`` and the record
    beside it: the sampling's seconds and peak memory, and with ``fid_classifier`` the
    FID-FMNIST of the samples area-downsampled to the training size and of their
    low-resolution guides (one draw of ``max(grid, fid_samples)`` samples serves both)."""
    from ..bench.memory import peak_bytes
    from ..models.scale_dit import ScaleDiT, ScaleDiTConfig
    from .scale_dit import downsample, generate_high_res, high_res_steps, load_bridge

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, task = load_dit_run(checkpoint, device)
    cfg = base.cfg
    overrides = {"attention": attention, "resolution": resolution}
    overrides.update({k: v for k, v in (("order", order), ("positions", positions)) if v})
    if bridge:
        model = load_bridge(bridge, base, **overrides)
    else:
        model = ScaleDiT.from_dit(base, ScaleDiTConfig(**overrides)).eval()
    diffusion = GaussianDiffusion.linear(task["diffusion_steps"], learn_sigma=cfg.learn_sigma)
    shown = per_class * cfg.num_classes
    count = max(shown, fid_samples if fid_classifier else 0)
    drawn: dict[str, Any] = {}

    def work() -> None:
        tic = time.perf_counter()
        drawn["low"], drawn["high"] = generate_high_res(
            base, model, diffusion, count, steps=steps, refine_steps=refine_steps,
            guidance=guidance, sampler=sampler, cfg_scale=cfg_scale, seed=seed, batch=batch)
        drawn["seconds"] = time.perf_counter() - tic

    peak = peak_bytes(work, device)
    low, high = drawn["low"], drawn["high"]
    save_class_grid(high[:shown], cfg.num_classes, out)
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint), "bridge": bridge, "scale": asdict(model.cfg),
        "guidance": guidance, "samples": count, "sampler": sampler, "steps": steps,
        "high_res_steps": high_res_steps(steps, refine_steps, guidance),
        "cfg_scale": cfg_scale, "seed": seed, "batch": batch,
        "device": str(device), "seconds": drawn["seconds"], "peak_memory_mib": peak / 2**20}
    if fid_classifier:
        from .frechet import fid_fmnist, load_feature_classifier, reference_statistics

        classifier = load_feature_classifier(fid_classifier, device)
        reference = reference_statistics(classifier, data)
        small = downsample(high[:fid_samples], cfg.image_size)
        record["fid_fmnist"] = fid_fmnist(classifier, small, reference)
        if low is not None:
            record["fid_fmnist_low_res"] = fid_fmnist(classifier, low[:fid_samples], reference)
        record["fid_samples"] = fid_samples
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``subq sample dit ...``."""
    if "sample" not in subparsers.choices:
        parser = subparsers.add_parser("sample", help="sample trained generative models")
        parser.add_subparsers(dest="model", required=True)
    sample = subparsers.choices["sample"]
    kinds = next(a for a in sample._actions if isinstance(a, argparse._SubParsersAction))
    p = kinds.add_parser("dit", help="a grid of class-conditional DiT samples (PNG)")
    p.add_argument("--checkpoint", required=True, help="a `subq train dit` run or checkpoint")
    p.add_argument("--out", required=True, help="the PNG grid (a .json record beside it)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--fid-classifier", default=None,
                   help="a `subq train vision --backbone cnn` run: also FID-FMNIST")
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--data", default=None, help="the Fashion-MNIST idx folder (for FID)")
    scale = p.add_argument_group("Scale-DiT (sampling above the training resolution)")
    scale.add_argument("--resolution", type=int, default=None,
                       help="sample at this size (a multiple of the training size) with "
                            "Scale-DiT's pipeline")
    scale.add_argument("--attention", choices=SCALE_ATTENTIONS, default="hierarchical_local",
                       help="of the high-resolution pass (softmax: the dense baseline)")
    scale.add_argument("--bridge", default=None,
                       help="a `subq train scale-dit` run of that resolution (the LoRA bridge)")
    scale.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=True,
                       help="low-resolution guidance (--no-guidance: the DiT directly at the "
                            "high resolution from noise)")
    scale.add_argument("--refine-steps", type=int, default=None,
                       help="steps of the high-resolution pass (default 18/28 of --steps)")
    scale.add_argument("--order", choices=ORDERS, default=None,
                       help="token order (default: the bridge's, else window_first)")
    scale.add_argument("--positions", choices=POSITIONS, default=None,
                       help="anchors (Scale-DiT) or interpolate (default: the bridge's)")
    scale.add_argument("--batch", type=int, default=100, help="samples per sampling batch")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.resolution is not None:
        record = sample_high_res_grid(
            args.checkpoint, args.out, resolution=args.resolution, attention=args.attention,
            bridge=args.bridge, guidance=args.guidance, refine_steps=args.refine_steps,
            order=args.order, positions=args.positions, per_class=args.per_class,
            steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale, seed=args.seed,
            fid_classifier=args.fid_classifier, fid_samples=args.fid_samples, data=args.data,
            batch=args.batch)
        fid = f", FID-FMNIST {record['fid_fmnist']:.2f}" if "fid_fmnist" in record else ""
        print(f"wrote {args.out}: {record['samples']} samples at {args.resolution}, "
              f"{record['seconds']:.1f} s, peak {record['peak_memory_mib']:.0f} MiB{fid}")
        return 0
    record = sample_grid(args.checkpoint, args.out, per_class=args.per_class, steps=args.steps,
                         sampler=args.sampler, cfg_scale=args.cfg_scale, seed=args.seed,
                         fid_classifier=args.fid_classifier, fid_samples=args.fid_samples,
                         data=args.data)
    fid = f", FID-FMNIST {record['fid_fmnist']:.2f}" if "fid_fmnist" in record else ""
    print(f"wrote {args.out}: {record['samples']} samples, "
          f"{record['seconds_per_step']:.3f} s per step{fid}")
    return 0
