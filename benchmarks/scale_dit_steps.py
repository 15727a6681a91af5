"""The cost of one high-resolution denoising step of Scale-DiT (benchmarks/diffusion_scale.sh):
the :class:`~subq.models.scale_dit.ScaleDiT` of a trained DiT at several sizes, with the
low-resolution guide, hierarchical local attention against dense attention over the same
tokens. Per size and attention: the median of ``--repeats`` forward passes after
``--warmup`` (the attentions interleaved), the peak memory of one pass above the memory
before it, the mask's density, on one thread.

    python benchmarks/scale_dit_steps.py results/diffusion/teacher-softmax --out steps.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from subq.bench.memory import peak_bytes
from subq.bench.run import host_info
from subq.models.scale_dit import SCALE_ATTENTIONS, ScaleDiT, ScaleDiTConfig
from subq.recipes.lit import load_dit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", help="a `subq train dit --attention softmax` run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_dit(args.teacher)
    rows = []
    for size in args.sizes:
        models = {a: ScaleDiT.from_dit(base, ScaleDiTConfig(resolution=size, attention=a))
                  .eval() for a in SCALE_ATTENTIONS}
        g = torch.Generator().manual_seed(size)
        x = torch.randn(args.batch, 1, size, size, generator=g)
        lo = torch.rand(args.batch, 1, base.cfg.image_size, base.cfg.image_size,
                        generator=g) * 2 - 1
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        y = torch.arange(args.batch) % base.cfg.num_classes
        times: dict[str, list[float]] = {a: [] for a in models}
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                for name, model in models.items():
                    tic = time.perf_counter()
                    model(x, t, y, lo=lo)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - tic)
            for name, model in models.items():
                layout = model.layout(True)
                peak = peak_bytes(functools.partial(model, x, t, y, lo=lo))
                density = layout.density() if name == "hierarchical_local" else 1.0
                rows.append({"resolution": size, "attention": name, "batch": args.batch,
                             "tokens": layout.length, "mask_density": density,
                             "seconds": statistics.median(times[name]),
                             "peak_memory_mib": peak / 2**20})
                print(json.dumps(rows[-1]), flush=True)
    record = {**host_info(), "threads": args.threads, "repeats": args.repeats,
              "warmup": args.warmup, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
