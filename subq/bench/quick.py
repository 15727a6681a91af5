"""A short forward timing of every mechanism against dense SDPA (median of timed runs after
warm-up). The CAB-style efficiency benchmark supersedes it."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import subq
from subq.registry import Pattern, mechanisms


def median_seconds(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(lengths: list[int]) -> int:
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"subq {subq.__version__}, {torch.get_num_threads()} threads, B=1 H=8 D=64 float32, "
          "causal self, forward, median of 5 after 2 warm-ups")
    print(f"{'method':<12}" + "".join(f"{'L=' + str(n):>16}" for n in lengths))
    dense_times = {}
    for mech in mechanisms():
        if Pattern.CAUSAL_SELF not in mech.patterns:
            continue
        cells = []
        for n in lengths:
            q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
            options = mech.sample_options(q, k, v, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                t = median_seconds(lambda: subq.attention(q, k, v, method=mech.name,  # noqa: B023
                                                          causal=True, **options))  # noqa: B023
            dense_times.setdefault(n, t)
            cells.append(f"{t * 1e3:8.1f}ms {dense_times[n] / t:4.1f}x")
        print(f"{mech.name:<12}" + "".join(f"{c:>16}" for c in cells))
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="time mechanisms against dense attention")
    bench.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    bench.set_defaults(run=lambda args: main(args.lengths))
