"""HiP against dense SDPA on the CPU: causal prefill time and peak memory at T = 16K, 32K
(B=1, H=8, D=64, float32, topk=512, paper defaults otherwise), and one decode step at a 32K
context (HiP amortised over a refresh period vs SDPA over the full cache).

Each measurement runs in a fresh subprocess (``--repeats`` times; the medians are reported);
the time is that of a second full-size call (the first, also reported, pays one-time costs);
memory is the growth of the peak resident set during the first call (``ru_maxrss``), inputs
excluded.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a loaded
machine, with one thread, it leaves out the time other processes hold the core.

    python benchmarks/hip_speed.py --lengths 16384 32768 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import subq
from subq.ops.hip import HipCache

clock = time.perf_counter


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_prefill(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    with torch.inference_mode():
        if method == "sdpa":
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            subq.attention(q, k, v, method="hip", causal=True)


def _prefill(method: str, length: int) -> dict:
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    # A small warm-up call first: the registry's first use imports every mechanism (seconds
    # and tens of MiB that belong to neither method).
    _run_prefill(method, q[:, :, :64], k[:, :, :64], v[:, :, :64])
    before = _rss_mib()
    start = clock()
    _run_prefill(method, q, k, v)
    first = clock() - start
    peak = _rss_mib() - before
    # A second full-size call: the first also pays one-time costs (kernels set up for new
    # shapes, the allocator's first page faults).
    start = clock()
    _run_prefill(method, q, k, v)
    return {"seconds": clock() - start, "first_seconds": first, "peak_mib": peak}


def _decode(method: str, length: int, refresh: int = 8) -> dict:
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    with torch.inference_mode():
        if method == "sdpa":
            F.scaled_dot_product_attention(q[:, :, -1:], k, v)
            start = clock()
            for t in range(refresh):
                F.scaled_dot_product_attention(q[:, :, -1 - t:length - t], k, v)
            return {"seconds": (clock() - start) / refresh}
        # A cache holding the first length - 2 refresh tokens (its buffer already has room for
        # the rest) and the last block_q queries; one refresh period warms up, the next is
        # timed (its first step re-runs the search).
        first = length - 2 * refresh
        state = HipCache(k.clone(), v.clone(), first, q[:, :, first - 32:first])
        for t in range(first, length):
            if t == length - refresh:
                start = clock()
            subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, method="hip",
                      refresh=refresh)
        return {"seconds": (clock() - start) / refresh}


def _child(kind: str, method: str, length: int, threads: int, repeats: int, clock_name: str
           ) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", kind, method, str(length),
                              "--threads", str(threads), "--clock", clock_name],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "LENGTH"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child:
        kind, method, length = args.child
        fn = _prefill if kind == "prefill" else _decode
        print(json.dumps(fn(method, int(length))))
        return
    print(f"# causal, B=1 H=8 D=64 float32, hip defaults (topk=512), {args.threads} threads, "
          f"median of {args.repeats}, {args.clock} clock")
    for length in args.lengths:
        hip, sdpa = (_child("prefill", m, length, args.threads, args.repeats, args.clock)
                     for m in ("hip", "sdpa"))
        print(f"prefill T={length}: hip {hip['seconds']:.2f}s (first call "
              f"{hip['first_seconds']:.2f}s) {hip['peak_mib']:.0f}MiB | "
              f"sdpa {sdpa['seconds']:.2f}s (first {sdpa['first_seconds']:.2f}s) "
              f"{sdpa['peak_mib']:.0f}MiB | speed-up "
              f"{sdpa['seconds'] / hip['seconds']:.2f}x, memory "
              f"{sdpa['peak_mib'] / max(hip['peak_mib'], 1):.2f}x", flush=True)
    length = max(args.lengths)
    hip, sdpa = (_child("decode", m, length, args.threads, args.repeats, args.clock)
                 for m in ("hip", "sdpa"))
    print(f"decode step at {length}: hip {hip['seconds'] * 1e3:.2f}ms (amortised over refresh 8)"
          f" | sdpa {sdpa['seconds'] * 1e3:.2f}ms | speed-up "
          f"{sdpa['seconds'] / hip['seconds']:.2f}x")


if __name__ == "__main__":
    main()
