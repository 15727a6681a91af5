"""Scale-DiT hierarchical local attention vs dense masked SDPA with the same mask.

Times the block-sparse fast path (``hierarchical_local_attention``) and
``F.scaled_dot_product_attention`` with the explicit boolean token mask on one Scale-DiT
geometry, interleaved in one process (medians; the mask built beforehand, the sparse path
after one warm-up call that builds its cached block plan), and the extra peak memory of one
call of each in a fresh process (resident set on CPU, reset just before the call; allocated
memory on CUDA), the mask or plan again built first. Usage::

    python benchmarks/scale_dit_speed.py --image 2048 --heads 8 --dim 64 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from subq.ops.hierarchical_local import Layout, hierarchical_local_attention


def _call(method: str, layout: Layout, heads: int, dim: int, device: str):
    """A no-argument call of ``method`` on fresh ``(1, heads, N, dim)`` inputs, its set-up
    (the dense mask, or the sparse path's cached block plan via a warm-up call) done."""
    q, k, v = (torch.randn(1, heads, layout.length, dim, device=device) for _ in range(3))
    if method == "sparse":
        def call():
            return hierarchical_local_attention(q, k, v, layout=layout)
        call()
        return call
    mask = layout.token_mask(device)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _resident() -> tuple[int, int]:
    """Current and peak resident set (bytes) of this process (Linux)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return tuple(int(fields[f].split()[0]) * 1024 for f in ("VmRSS", "VmHWM"))


def _memory(method: str, layout: Layout, heads: int, dim: int, device: str) -> int:
    """Extra peak memory (bytes) of one call after its set-up."""
    call = _call(method, layout, heads, dim, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _resident()[0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    out = call()
    peak = _resident()[1]
    del out
    return peak - base


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", choices=["sparse", "dense"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = Layout.from_image(args.image)
    if args.memory_child:
        print(_memory(args.memory_child, layout, args.heads, args.dim, args.device))
        return
    print(f"image {args.image}: N = {layout.length}, token density "
          f"{100 * layout.density():.2f} %, 128x64 block density "
          f"{100 * layout.block_map().float().mean().item():.2f} %, B 1, heads {args.heads}, "
          f"head dim {args.dim}, float32, {args.device}, {args.threads} threads")
    calls = {m: _call(m, layout, args.heads, args.dim, args.device) for m in ("sparse", "dense")}
    times = {"sparse": [], "dense": []}
    for _ in range(args.repeats):
        for method, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(args.device)
            times[method].append(time.perf_counter() - start)
    memory = {}
    for method in ("sparse", "dense"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", method, "--image",
                              str(args.image), "--heads", str(args.heads), "--dim",
                              str(args.dim), "--threads", str(args.threads), "--device",
                              args.device], capture_output=True, text=True, check=True)
        memory[method] = int(out.stdout.split()[-1])
    for method in ("sparse", "dense"):
        print(f"{method:>6}: {statistics.median(times[method]) * 1e3:9.1f} ms (runs "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[method])})  extra peak memory "
              f"{memory[method] / 2**20:8.0f} MiB")
    ts, td = (statistics.median(times[m]) for m in ("sparse", "dense"))
    print(f"speed-up {td / ts:.2f}x, memory ratio {memory['dense'] / memory['sparse']:.2f}x")


if __name__ == "__main__":
    main()
