"""NTK-Attention beside dense SDPA, forward and forward+backward, timed interleaved in one
process (medians after a warm-up): both merge the prefix terms with the fused kernel's output
through its log-sum-exp (the backward through the kernel's own backward), so each should cost
what SDPA costs plus O(L d dv).

    python benchmarks/ntk_speed.py --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import subq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads; B=1, H=8, D=64, float32; forward without autograd, "
          "forward+backward with gradients to q, k, v (and Z, k for ntk)")
    print("| L | pattern | pass | SDPA (ms) | ntk (ms) | ntk / SDPA |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for length in args.lengths:
        for causal in (False, True):
            q, k, v = (torch.randn(1, 8, length, 64, generator=g) for _ in range(3))
            prefix = {"z": 0.01 * torch.randn(1, 8, 64, 64, generator=g),
                      "kz": 0.01 * torch.randn(1, 8, 64, generator=g)}
            calls = {"sdpa": (F.scaled_dot_product_attention, {"is_causal": causal}),
                     "ntk": (subq.attention, {"method": "ntk", "causal": causal, **prefix})}
            for backward in (False, True):
                times = _time(calls, (q, k, v), backward, args.repeats)
                sdpa, ntk = (statistics.median(times[n]) for n in ("sdpa", "ntk"))
                print(f"| {length} | {'causal' if causal else 'noncausal'} self | "
                      f"{'forward+backward' if backward else 'forward'} | {sdpa * 1e3:.0f} | "
                      f"{ntk * 1e3:.0f} | {ntk / sdpa:.2f} |", flush=True)


def _time(calls: dict, inputs: tuple, backward: bool, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each entry, interleaved, after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + 1):
        for name, (fn, kwargs) in calls.items():
            leaves = [x.detach().requires_grad_(backward) for x in inputs]
            options = {k: (v.detach().requires_grad_(backward) if torch.is_tensor(v) else v)
                       for k, v in kwargs.items()}
            start = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = fn(*leaves, **options)
                if backward:
                    out.backward(torch.ones_like(out))
            if i:
                times[name].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
