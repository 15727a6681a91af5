"""Scale-DiT hierarchical local attention vs dense masked SDPA with the same mask.

Times the block-sparse fast path (``hierarchical_local_attention``) and
``F.scaled_dot_product_attention`` with the explicit boolean token mask on one Scale-DiT
geometry, and the peak resident memory of each in a fresh process (CPU) or the peak allocated
CUDA memory. Usage::

    python benchmarks/scale_dit_speed.py --image 2048 --heads 1 --dim 64 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from subq.ops.hierarchical_local import Layout, hierarchical_local_attention


def _run(method: str, image: int, heads: int, dim: int, repeats: int, device: str) -> None:
    layout = Layout.from_image(image)
    q, k, v = (torch.randn(1, heads, layout.length, dim, device=device) for _ in range(3))
    if method == "sparse":
        def call():
            return hierarchical_local_attention(q, k, v, layout=layout)
    else:
        mask = layout.token_mask(device)

        def call():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    call()  # warm-up (and the cached block plan for the sparse path)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"{min(times):.4f} {peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=["sparse", "dense"])
    args = parser.parse_args()
    if args.child:
        _run(args.child, args.image, args.heads, args.dim, args.repeats, args.device)
        return
    layout = Layout.from_image(args.image)
    print(f"image {args.image}: N = {layout.length}, token density "
          f"{100 * layout.density():.2f} %, 128x64 block density "
          f"{100 * layout.block_map().float().mean().item():.2f} %, heads {args.heads}, "
          f"head dim {args.dim}, {args.device}")
    results = {}
    for method in ("sparse", "dense"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--image",
                              str(args.image), "--heads", str(args.heads), "--dim",
                              str(args.dim), "--repeats", str(args.repeats), "--device",
                              args.device], capture_output=True, text=True, check=True)
        seconds, peak = out.stdout.split()
        results[method] = (float(seconds), int(peak))
        print(f"{method:>6}: {float(seconds) * 1e3:9.1f} ms  "
              f"peak memory {int(peak) / 2**20:8.0f} MiB")
    (ts, ms), (td, md) = results["sparse"], results["dense"]
    print(f"speed-up {td / ts:.2f}x, memory ratio {md / ms:.2f}x")


if __name__ == "__main__":
    main()
