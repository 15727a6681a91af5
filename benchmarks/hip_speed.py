"""HiP against dense SDPA on the CPU: causal prefill time and peak memory at T = 16K, 32K
(B=1, H=8, D=64, float32, topk=512, paper defaults otherwise), and one decode step at a 32K
context (HiP amortised over a refresh period vs SDPA over the full cache).

Each measurement runs in a fresh subprocess (``--repeats`` times). Prefill: the medians are
reported; the time is that of a second full-size call (the first, also reported, pays one-time
costs); memory is the growth of the peak resident set during the first call (``ru_maxrss``),
inputs excluded. Decode: HiP and SDPA are timed interleaved in one process (each refresh period
of HiP steps followed by as many dense steps; medians over the periods after the first), and
every process's ratio is printed.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a loaded
machine, with one thread, it leaves out the time other processes hold the core.

    python benchmarks/hip_speed.py --lengths 16384 32768 --threads 2 --repeats 3
    python benchmarks/hip_speed.py --lengths 32768 --decode-only --repeats 5
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


def _decode(length: int, refresh: int = 8, periods: int = 6) -> dict:
    """HiP and SDPA decode steps at context ``length``, interleaved in one process: per
    refresh period, ``refresh`` HiP steps (the first re-runs the search), then ``refresh``
    dense steps (one query over the full cache). Medians over the periods after the first."""
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    # A cache holding all but (periods + 1) refresh periods of tokens (its buffer already has
    # room for the rest) and the last block_q queries.
    first = length - (periods + 1) * refresh
    state = HipCache(k.clone(), v.clone(), first, q[:, :, first - 32:first])
    hip, sdpa = [], []
    with torch.inference_mode():
        F.scaled_dot_product_attention(q[:, :, -1:], k, v)
        for t0 in range(first, length, refresh):
            start = clock()
            for t in range(t0, t0 + refresh):
                subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                          method="hip", refresh=refresh)
            hip.append((clock() - start) / refresh)
            start = clock()
            for t in range(refresh):
                F.scaled_dot_product_attention(q[:, :, -1 - t:length - t], k, v)
            sdpa.append((clock() - start) / refresh)
    hip_s, sdpa_s = statistics.median(hip[1:]), statistics.median(sdpa[1:])
    return {"hip": hip_s, "sdpa": sdpa_s, "ratio": sdpa_s / hip_s}


def _child_runs(kind: str, method: str, length: int, threads: int, repeats: int,
                clock_name: str) -> list[dict]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", kind, method, str(length),
                              "--threads", str(threads), "--clock", clock_name],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def _child(kind: str, method: str, length: int, threads: int, repeats: int, clock_name: str
           ) -> dict:
    runs = _child_runs(kind, method, length, threads, repeats, clock_name)
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill timings")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "LENGTH"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child:
        kind, method, length = args.child
        out = _prefill(method, int(length)) if kind == "prefill" else _decode(int(length))
        print(json.dumps(out))
        return
    print(f"# causal, B=1 H=8 D=64 float32, hip defaults (topk=512), {args.threads} threads, "
          f"median of {args.repeats}, {args.clock} clock")
    for length in [] if args.decode_only else args.lengths:
        hip, sdpa = (_child("prefill", m, length, args.threads, args.repeats, args.clock)
                     for m in ("hip", "sdpa"))
        print(f"prefill T={length}: hip {hip['seconds']:.2f}s (first call "
              f"{hip['first_seconds']:.2f}s) {hip['peak_mib']:.0f}MiB | "
              f"sdpa {sdpa['seconds']:.2f}s (first {sdpa['first_seconds']:.2f}s) "
              f"{sdpa['peak_mib']:.0f}MiB | speed-up "
              f"{sdpa['seconds'] / hip['seconds']:.2f}x, memory "
              f"{sdpa['peak_mib'] / max(hip['peak_mib'], 1):.2f}x", flush=True)
    length = max(args.lengths)
    for run in _child_runs("decode", "both", length, args.threads, args.repeats, args.clock):
        print(f"decode step at {length}: hip {run['hip'] * 1e3:.2f}ms (amortised over refresh 8)"
              f" | sdpa {run['sdpa'] * 1e3:.2f}ms | speed-up {run['ratio']:.2f}x "
              "(one process, interleaved)", flush=True)


if __name__ == "__main__":
    main()
