"""Forward time and peak memory of Combiner against dense attention (causal, float32).

    python benchmarks/combiner_speed.py --lengths 4096 16384 --repeats 2

Each measurement runs in a fresh child process that reports its own wall time (after one
warm-up call) and its peak resident memory above the process's baseline after the inputs
exist (``ru_maxrss``). "sdpa" is torch's fused scaled_dot_product_attention (the time
baseline), "reference" the dense attention that materialises the L x L matrix (the memory
baseline; above ``--max-reference`` its memory is B*H*L^2*4 bytes, reported as an estimate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
import subq
method, variant, length, heads, dim, repeats = sys.argv[1:7]
length, heads, dim, repeats = int(length), int(heads), int(dim), int(repeats)
torch.manual_seed(0)
q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
def call():
    with torch.no_grad():
        if method == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if method == "reference":
            return subq.reference(q, k, v, method="dense", causal=True)
        return subq.attention(q, k, v, method="combiner", causal=True, variant=variant)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
call()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": min(times), "peak_mib": (peak - base) / 1024}))
"""


def measure(method: str, variant: str, length: int, heads: int, dim: int,
            repeats: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, method, variant, str(length), str(heads), str(dim),
         str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", nargs="+", default=["fixed", "axial", "mixture",
                                                          "logsparse"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-reference", type=int, default=4096,
                        help="longest L at which the dense reference is run, not estimated")
    args = parser.parse_args()
    print("| L | method | forward s | peak MiB | time vs SDPA | memory vs dense reference |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        sdpa = measure("sdpa", "", length, args.heads, args.dim, args.repeats)
        if length <= args.max_reference:
            ref = measure("reference", "", length, args.heads, args.dim, 1)
            ref_mib, ref_note = ref["peak_mib"], ""
        else:
            ref_mib, ref_note = args.heads * length * length * 4 / 2**20, " (estimate)"
        print(f"| {length} | sdpa | {sdpa['seconds']:.3f} | {sdpa['peak_mib']:.0f} | 1.0x | |")
        print(f"| {length} | dense reference | | {ref_mib:.0f}{ref_note} | | 1.0x |")
        for variant in args.variants:
            row = measure("combiner", variant, length, args.heads, args.dim, args.repeats)
            print(f"| {length} | combiner {variant} | {row['seconds']:.3f} | "
                  f"{row['peak_mib']:.0f} | {sdpa['seconds'] / row['seconds']:.1f}x faster | "
                  f"{ref_mib / max(row['peak_mib'], 1e-9):.1f}x less |", flush=True)


if __name__ == "__main__":
    main()
