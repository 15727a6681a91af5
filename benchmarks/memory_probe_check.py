"""The efficiency benchmark's memory probe against the resident-size probe it replaced.

``make bench`` reads a configuration's peak memory from PyTorch's allocation records in the
process that times it (:func:`subq.bench.measure.measure_config`). Before 2026-12-07 it read
the peak resident set size (``VmHWM``) of a fresh child process after one warm-up forward,
large buffers mapped one by one. This script measures both for every method (subq's, the
baselines, the installed peers) at the given pattern and length, and prints a markdown table
with their ratio.

    python benchmarks/memory_probe_check.py --lengths 2048 4096
"""

from __future__ import annotations

import argparse
import platform

import torch

from subq.bench.measure import Config, build, forward_backward, make_inputs, measure_config
from subq.bench.memory import peak_bytes, run_in_child
from subq.bench.methods import all_methods

MIB = 2.0 ** 20


def resident_probe(config: Config) -> tuple[float, float]:
    """The old probe: a fresh child's resident-size peaks of one forward (after a warm-up
    forward) and of its first forward+backward, in MiB."""
    torch.set_num_threads(config.threads)
    q, k, v = make_inputs(config, requires_grad=True)
    call = build(config, q, k, v)
    cotangent = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            call(q, k, v)

    forward()
    return (peak_bytes(forward) / MIB,
            peak_bytes(lambda: forward_backward(call, q, k, v, cotangent)) / MIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", nargs="+", default=["noncausal_self", "causal_self"],
                        help="pattern names, spaces as underscores")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); B=1, "
          "H=8, D=64, float32; peak MiB")
    print("| pattern | L | method | fwd: resident (child) | fwd: allocations | ratio | "
          "fwd+bwd: resident (child) | fwd+bwd: allocations | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pattern in (p.replace("_", " ") for p in args.patterns):
        for length, (name, method) in ((n, m) for n in args.lengths
                                       for m in all_methods().items()):
            if pattern not in [p.value for p in method.patterns]:
                continue
            config = Config(name, pattern, length, threads=args.threads)
            new = measure_config(config, None, timing=False, memory=True)
            status, old = run_in_child(resident_probe, (config,), timeout=1800)
            if status != "ok":
                print(f"| {pattern} | {length} | `{name}` | {status}: {old} |")
                continue
            cells = []
            now_mib = (new["mem_fwd_mib"], new.get("mem_fwd_bwd_mib"))
            for before, now in zip(old, now_mib, strict=True):
                cells += ([f"{before:.1f}", f"{now:.1f}", f"{now / before:.2f}"] if now
                          else [f"{before:.1f}", "—", "—"])
            print(f"| {pattern} | {length} | `{name}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
