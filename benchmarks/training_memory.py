"""Forward+backward peak memory and time of the mechanisms a training run backpropagates
through (issue 22: HiP, HAX and kernelized RPE within 4x of SDPA's memory at 16K), beside dense
SDPA, each configuration in a fresh child process measured as make bench measures it
(subq.bench.measure.measure_config: medians after a warm-up; peak memory per MEMORY_PROBE).

    python benchmarks/training_memory.py --lengths 4096 16384 --methods dense hip hax kernelized_rpe
"""

from __future__ import annotations

import argparse
import platform

import torch

import subq
from subq import Pattern
from subq.bench.measure import Config, measure_config
from subq.bench.memory import run_in_child


def _measure(config: Config, with_time: bool) -> dict:
    torch.set_num_threads(config.threads)
    return measure_config(config, None, timing=with_time, memory=True, max_repeats=5)


def _measure_in_child(config: Config, with_time: bool) -> dict:
    status, row = run_in_child(_measure, (config, with_time), timeout=1800)
    return row if status == "ok" else {"error": row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--methods", nargs="+",
                        default=["dense", "hip", "hax", "kernelized_rpe"])
    parser.add_argument("--patterns", nargs="+", default=["causal_self", "noncausal_self"],
                        help="pattern names, spaces as underscores")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-time", action="store_true", help="memory only")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); B=1, H=8, D=64, float32; peak MiB above the baseline, "
          "times: medians (ms)")
    print("| L | pattern | method | fwd MiB | fwd+bwd MiB | / dense | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for pattern in args.patterns:
            dense = None
            for method in args.methods:
                if Pattern(pattern.replace("_", " ")) not in subq.get(method).patterns:
                    continue
                config = Config(method, pattern.replace("_", " "), length, threads=args.threads)
                row = _measure_in_child(config, not args.no_time)
                peak = row.get("mem_fwd_bwd_mib")
                if method == "dense":
                    dense = peak
                ratio = f"{peak / dense:.1f}x" if peak and dense else "—"
                times = [row.get(key) for key in ("fwd_ms", "fwd_bwd_ms")]
                print(f"| {length} | {pattern} | {method} | {row.get('mem_fwd_mib', 0):.0f} | "
                      f"{peak if peak is None else f'{peak:.0f}'} | {ratio} | "
                      + " | ".join("—" if ms is None else f"{ms:.0f}" for ms in times) + " |"
                      + (f" {row.get('error') or row.get('time_error')}" if 'error' in row
                         or 'time_error' in row else ""), flush=True)


if __name__ == "__main__":
    main()
