"""Measuring one configuration (method x pattern x length): inputs, forward and
forward+backward median times, the error against dense attention, and the peak memory of one
forward and of one forward+backward call, probed in the same process (:data:`MEMORY_PROBE`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..registry import Pattern
from .memory import tensor_peak_bytes
from .methods import Attend, all_methods

_MIB = 2.0 ** 20
#: Timed runs per measurement: as many as fit ``TIME_TARGET_MS`` after the warm-up, within
#: ``REPEATS`` (a 10 ms call is timed 20 times, a call of 0.33 s or more 3 times); a call of
#: ``LONG_CALL_MS`` or more is timed ``LONG_CALL_REPEATS`` times (the median of 2 is their
#: mean): the long lengths dominate a run's time.
TIME_TARGET_MS = 1000.0
REPEATS = (3, 20)
LONG_CALL_MS = 2000.0
LONG_CALL_REPEATS = 2
#: What a row's memory is, as the report states it (:func:`measure_config`).
MEMORY_PROBE = ("peak of the tensors allocated during one call above those held before it "
                "(PyTorch's allocation records: torch.profiler's on the CPU, the caching "
                "allocator's on CUDA), in the timing process: the forward after its warm-up, "
                "the forward+backward on its warm-up (its gradients count, as in a first "
                "call)")


@dataclass(frozen=True)
class Config:
    """One configuration; ``threads`` is the fixed intra-op thread count."""

    method: str
    pattern: str
    length: int
    batch: int = 1
    heads: int = 8
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(config: Config, requires_grad: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal q, k, v ``(B, H, L, D)``: the same for every method at one (pattern, L)."""
    pattern_index = list(Pattern).index(Pattern(config.pattern))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + config.length * 4
                                              + pattern_index)
    shape = (config.batch, config.heads, config.length, config.dim)
    dtype = getattr(torch, config.dtype)
    return tuple(torch.randn(shape, generator=generator).to(config.device, dtype)
                 .requires_grad_(requires_grad) for _ in range(3))


def build(config: Config, q, k, v) -> Attend:
    method = all_methods()[config.method]
    return method.build(q, k, v, Pattern(config.pattern), config.seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_times_ms(work: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall times in ms of ``repeats`` synchronised runs of ``work``."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def forward_backward(call: Attend, q, k, v, cotangent: torch.Tensor) -> None:
    for x in (q, k, v):
        x.grad = None
    call(q, k, v).backward(cotangent)


def repeats_for(first_ms: float, target_ms: float, minimum: int, maximum: int) -> int:
    """At least ``minimum`` timed runs, more (up to ``maximum``) while they fit ``target_ms``;
    ``LONG_CALL_REPEATS`` (when fewer) for a call of ``LONG_CALL_MS`` or more."""
    if first_ms <= 0:
        return maximum
    if first_ms >= LONG_CALL_MS:
        return min(minimum, LONG_CALL_REPEATS)
    return int(max(minimum, min(maximum, target_ms // first_ms)))


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300))


def timed_runs(work: Callable[[], object], device: torch.device, target_ms: float,
               minimum: int, maximum: int) -> list[float]:
    """Wall times in ms of one run of ``work`` (warmed up) and of as many more as
    :func:`repeats_for` asks for that first one."""
    times = run_times_ms(work, 1, device)
    return times + run_times_ms(work, repeats_for(times[0], target_ms, minimum, maximum) - 1,
                             device)


def measure_config(config: Config, dense_out: torch.Tensor | None, timing: bool = True,
                   memory: bool = False, target_ms: float = TIME_TARGET_MS,
                   min_repeats: int = REPEATS[0], max_repeats: int = REPEATS[1]) -> dict:
    """One configuration on fresh inputs, in this order (each call's first run is its warm-up):

    - a forward (no grad): the warm-up; its output gives the relative RMS error against
      ``dense_out`` (when given);
    - with ``memory``: ``mem_fwd_mib``, the peak of one more forward (:data:`MEMORY_PROBE`);
    - with ``timing``: ``fwd_ms``, the median of the timed forwards (:func:`timed_runs`);
    - a forward+backward: the warm-up, probed for ``mem_fwd_bwd_mib`` with ``memory``;
    - with ``timing``: ``fwd_bwd_ms``, the median of the timed forward+backward runs.

    A method without a backward keeps its forward numbers and records ``fwd_bwd_error``."""
    device = torch.device(config.device)
    q, k, v = make_inputs(config, requires_grad=True)
    call = build(config, q, k, v)
    cotangent = torch.randn_like(q)
    result: dict = {}

    def forward():
        with torch.no_grad():
            return call(q, k, v)

    def probed(work: Callable[[], object]) -> float:
        return tensor_peak_bytes(work, device) / _MIB

    out = forward()
    if dense_out is not None:
        result["rel_rms_vs_dense"] = rel_rms(dense_out, out)
    del out
    if memory:
        result["mem_fwd_mib"] = probed(forward)
    if timing:
        fwd = timed_runs(forward, device, target_ms, min_repeats, max_repeats)
        result.update(fwd_ms=statistics.median(fwd), fwd_times_ms=fwd, repeats=len(fwd))
    def fwd_bwd():
        forward_backward(call, q, k, v, cotangent)

    try:
        if memory:
            result["mem_fwd_bwd_mib"] = probed(fwd_bwd)
        else:
            fwd_bwd()
        if timing:
            fb = timed_runs(fwd_bwd, device, target_ms, min_repeats, max_repeats)
            result.update(fwd_bwd_ms=statistics.median(fb), fwd_bwd_times_ms=fb,
                          fwd_bwd_repeats=len(fb))
    except Exception as exc:  # recorded: a forward-only method still has forward numbers
        key = "fwd_bwd_error" if timing else "mem_fwd_bwd_error"
        result[key] = f"{type(exc).__name__}: {exc}"
    return result

