"""Forward+backward time of two versions of a mechanism's op in one process, alternated call
by call (A, B, A, B, ...) so that load on a shared machine falls on both alike (issue 22: the
training backward of HiP, HAX and kernelized RPE against the autograd of the version before).

    PYTHONPATH=/path/to/old/checkout-with-package-renamed python benchmarks/training_time_ab.py \\
        --old-package subq_old --length 4096 --repeats 5

``--old-package`` names an importable copy of the earlier ``subq`` package (e.g. ``cp -r
old/subq /tmp/pkg/subq_old`` and ``PYTHONPATH=/tmp/pkg``). Prints medians (ms) per method.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time

import torch

import subq

METHODS = ("hip", "hax", "kernelized_rpe")


def _fwd_bwd(fn, q, k, v, options, grad):
    for x in (q, k, v):
        x.grad = None
    start = time.perf_counter()
    out = fn(q, k, v, causal=True, **options)
    out.backward(grad)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-package", required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"L={args.length}, B=1, H=8, D=64, float32, causal; fwd+bwd medians of "
          f"{args.repeats} after one warm-up each, old and new alternated")
    print("| method | old ms | new ms | new / old |")
    print("|---|---|---|---|")
    for method in args.methods:
        new = subq.get(method).fn
        old = getattr(importlib.import_module(f"{args.old_package}.ops.{method}"),
                      f"{method}_attention")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, args.length, 64, generator=g).requires_grad_()
                   for _ in range(3))
        options = subq.get(method).sample_options(q, k, v, generator=g)
        grad = torch.randn(1, 8, args.length, 64, generator=g)
        times = {"old": [], "new": []}
        for n in range(args.repeats + 1):
            for name, fn in (("old", old), ("new", new)):
                ms = _fwd_bwd(fn, q, k, v, options, grad)
                if n:
                    times[name].append(ms)
        old_ms, new_ms = (statistics.median(times[x]) for x in ("old", "new"))
        print(f"| {method} | {old_ms:.0f} | {new_ms:.0f} | {new_ms / old_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
