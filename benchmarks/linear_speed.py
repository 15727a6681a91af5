"""The performance bars of the linear family (issue 4) on the CPU, forward pass, B=1, H=8,
D=64, float32:

* time at one long length (default 16K) of ``linear`` (non-causal and causal chunked),
  ``kernelized_rpe`` (with a random RPE bias, m = 32), dense SDPA and performer-pytorch's
  FAVOR+ (``nb_features`` = the mechanism's feature count: 64 for ``linear``), each the median
  of a few runs; peak memory of each in a fresh child process;
* CAB's efficiency length (time): a quadratic fitted to dense SDPA and a line to the
  mechanism over short lengths; the larger root of their difference.

    python benchmarks/linear_speed.py                 # ~3 minutes on 2 busy cores
    python benchmarks/linear_speed.py --length 4096   # quicker
    python benchmarks/linear_speed.py --threads 1     # the ratios without 2-thread barriers

On an oversubscribed machine every 2-thread op waits at its barrier for a core (observed:
tens of ms per op under a load of 7 on 2 cores), which punishes the tiled paths' many small
ops; time SDPA and the mechanisms interleaved and compare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import subq
from subq.bench.cab import efficiency_length, measured_crossover
from subq.bench.memory import peak_bytes, run_in_child
from subq.ops.kernelized_rpe import DEFAULT_FEATURES

BATCH, HEADS, DIM = 1, 8, 64


def inputs(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(BATCH, HEADS, length, DIM, generator=generator) for _ in range(3))


def call(name: str, length: int) -> Callable[[], torch.Tensor]:
    """A no-argument forward call of ``name`` (``method/pattern``) at ``length``."""
    q, k, v = inputs(length)
    method, pattern = name.split("/")
    causal = pattern == "causal"
    if method == "performer":
        from performer_pytorch import FastAttention
        attn = FastAttention(DIM, nb_features=DIM, causal=causal)
        return lambda: attn(q, k, v)
    options = {}
    if method == "kernelized_rpe":
        generator = torch.Generator().manual_seed(1)
        options = {"bias": torch.randn(HEADS, 2 * length - 1, generator=generator),
                   "projection": torch.randn(DEFAULT_FEATURES, DIM, generator=generator)}
    return lambda: subq.attention(q, k, v, method=method, causal=causal, **options)


def median_seconds(name: str, length: int, repeats: int) -> float:
    fn = call(name, length)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first run warms up


def memory_job(name: str, length: int) -> int:
    fn = call(name, length)
    with torch.no_grad():
        return peak_bytes(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    names = ["dense/noncausal", "linear/noncausal", "performer/noncausal",
             "kernelized_rpe/noncausal", "dense/causal", "linear/causal", "performer/causal",
             "kernelized_rpe/causal"]
    print(f"B={BATCH} H={HEADS} D={DIM} float32 forward, L={args.length}, "
          f"{torch.get_num_threads()} threads")
    seconds = {}
    for name in names:
        seconds[name] = median_seconds(name, args.length, args.repeats)
        status, mem = run_in_child(memory_job, (name, args.length), timeout=600)
        mem_text = f"{mem / 2**20:9.1f} MiB" if status == "ok" else status
        print(f"{name:26s} {seconds[name] * 1e3:10.1f} ms  peak {mem_text}", flush=True)
    for pattern in ("noncausal", "causal"):
        dense = seconds[f"dense/{pattern}"]
        for method in ("linear", "kernelized_rpe", "performer"):
            print(f"{pattern:9s} speed-up over SDPA, {method:15s}"
                  f" {dense / seconds[f'{method}/{pattern}']:7.1f}x")

    print(f"efficiency lengths (time, non-causal) over L in {args.short}:")
    short = {name: [median_seconds(name, n, 5) for n in args.short]
             for name in ("dense/noncausal", "linear/noncausal", "kernelized_rpe/noncausal")}
    for method in ("linear", "kernelized_rpe"):
        fitted = efficiency_length(args.short, short["dense/noncausal"],
                                   short[f"{method}/noncausal"])
        crossover = measured_crossover(args.short, short["dense/noncausal"],
                                       short[f"{method}/noncausal"])
        fitted_text = "none (the fits do not cross)" if fitted is None else f"{fitted:.0f}"
        measured_text = (f"not within {args.short}" if crossover is None
                         else f"from L = {crossover}")
        print(f"  {method:15s} fitted {fitted_text}; measured faster than SDPA {measured_text}")


if __name__ == "__main__":
    main()
