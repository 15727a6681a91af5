"""The fused CPU kernel of the scan's inference forward (``subq/ops/csrc/selective_scan.c``):
== the float64 reference loop for every layout of u/delta/z (channel-major, time-major, strided
views), of B/C (time-invariant, shared, grouped with groups inside and across SIMD lanes,
per channel), every optional part, partial channel blocks and token blocks, initial and final
states; threads change nothing; NaN and overflow propagate as in the loop; the dispatch, the
on-disk cache and the fallback when no compiler works."""

from __future__ import annotations

import shutil

import pytest
import torch

from subq.ops import scan_kernel
from subq.ops.scan import selective_scan, selective_scan_reference

from ..helpers import rel_rms

if not scan_kernel.available():
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        raise AssertionError(f"a C compiler is present but the scan kernel is unavailable: "
                             f"{scan_kernel.unavailable_reason()}")
    pytest.skip(f"scan kernel unavailable: {scan_kernel.unavailable_reason()}",
                allow_module_level=True)

TOL = 1e-5  # float32 kernel vs float64 loop; the kernel's exp2 and softplus are ~1 ulp


def _bc(layout: str, batch: int, channels: int, n: int, length: int):
    shape = {"time-invariant": (channels, n), "shared": (batch, n, length),
             "grouped": (batch, 2, n, length), "groups-of-4": (batch, channels // 4, n, length),
             "per-channel": (batch, channels, n, length)}[layout]
    return torch.randn(shape), torch.randn(shape)


def _inputs(batch: int, channels: int, n: int, length: int, layout: str = "shared"):
    u, delta, z = (torch.randn(batch, channels, length) for _ in range(3))
    A = -torch.exp(torch.randn(channels, n))
    B, C = _bc(layout, batch, channels, n, length)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(channels), z=z,
                delta_bias=torch.randn(channels), delta_softplus=True,
                initial_state=torch.randn(batch, channels, n))


def _reference(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop in float64 on the same (float32) values."""
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return selective_scan_reference(**wide, return_last_state=True)


def _kernel(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return selective_scan(**args, return_last_state=True)


def _with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values stored channel-major, as a time-major view, or as a strided view."""
    if layout == "time-major":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other step of a wider buffer
        wide = torch.empty(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("layout", ["time-invariant", "shared", "grouped", "groups-of-4",
                                    "per-channel"])
@pytest.mark.parametrize("channels", [8, 20])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
def test_kernel_equals_reference(layout, channels, length):
    """Channel counts that fill whole SIMD blocks and leave a partial one (20 = 8 + 8 + 4);
    groups of 4 channels split each block of 8 lanes; token counts around the 64-step block."""
    args = _inputs(batch=3, channels=channels, n=16, length=length, layout=layout)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


@pytest.mark.parametrize("storage", ["channel-major", "time-major", "strided"])
@pytest.mark.parametrize("options", ["none", "all", "softplus-only", "bias-only", "gate-only"])
def test_kernel_layouts_and_options(storage, options):
    """u, delta and z stored any way (the output is stored like u); each optional part alone."""
    full = _inputs(batch=2, channels=12, n=5, length=150, layout="grouped")
    args = {k: full[k] for k in ("u", "delta", "A", "B", "C")}
    args["delta"] = args["delta"].abs()  # positive steps without softplus: finite states
    args |= {"none": {}, "all": {k: full[k] for k in ("D", "z", "delta_bias", "delta_softplus",
                                                       "initial_state")},
             "softplus-only": dict(delta_softplus=True),
             "bias-only": dict(delta_bias=full["delta_bias"].abs()),
             "gate-only": dict(z=full["z"])}[options]
    for name in ("u", "delta", "z"):
        if name in args:
            args[name] = _with_layout(args[name], storage)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    if storage != "strided":
        assert out.stride() == args["u"].stride()
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_softplus_and_gate_over_their_range():
    """delta and z from -40 to 40 (softplus's linear and exponential tails, silu's limits)."""
    args = _inputs(batch=1, channels=16, n=4, length=400)
    span = torch.linspace(-40.0, 40.0, 400)
    args["delta"] = span.roll(7).expand(1, 16, -1).contiguous()
    args["z"] = span.expand(1, 16, -1).contiguous()
    args["delta_bias"] = torch.zeros(16)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_decays_accurate_to_a_few_ulp():
    """One step from a state of 1 with no drive and C = 1: y = exp(delta A) per channel, over
    exponents that cover every fraction the kernel's exp2 polynomial sees; within 3 ulp of the
    exact value (the float32 product delta A is itself rounded), which an error of 1e-5 in one
    polynomial coefficient already exceeds."""
    channels = 4096
    args = dict(u=torch.zeros(1, channels, 1), delta=torch.rand(1, channels, 1),
                A=-torch.rand(channels, 1), B=torch.ones(1, 1, 1), C=torch.ones(1, 1, 1),
                initial_state=torch.ones(1, channels, 1))
    ref, _ = _reference(args)
    out, _ = _kernel(args)
    assert ((out - ref) / ref).abs().max() <= 3 * 2.0 ** -23


def test_strong_decay_underflows_to_zero_like_the_loop():
    """Decays of hundreds of nats per step: exp underflows to 0, the state is just the drive."""
    args = _inputs(batch=2, channels=8, n=16, length=100)
    args["delta"] = args["delta"].abs() * 100.0
    args["delta_softplus"] = False
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert torch.isfinite(out).all()
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_nan_and_overflow_propagate_like_the_loop():
    """A NaN in delta poisons its channel from that step on, and only that channel; a growing
    state (positive A) overflows to inf in the same places as the float32 loop."""
    args = _inputs(batch=1, channels=16, n=4, length=50)
    args["delta"][0, 3, 20] = float("nan")
    out, _ = _kernel(args)
    ref, _ = selective_scan_reference(**args, return_last_state=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 3, 20:].isnan().all() and not out[0, 3, :20].isnan().any()
    grow = _inputs(batch=1, channels=8, n=4, length=60)
    grow |= dict(A=torch.full((8, 4), 3.0), delta=torch.full((1, 8, 60), 2.0),
                 delta_softplus=False, delta_bias=None, z=None, D=None)
    out, _ = _kernel(grow)
    ref, _ = selective_scan_reference(**grow, return_last_state=True)
    assert out.isinf().any() and torch.equal(out.isfinite(), ref.isfinite())


def test_threads_split_the_channel_blocks_without_changing_a_bit():
    args = _inputs(batch=3, channels=64, n=16, length=300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(args)
        torch.set_num_threads(2)
        two = _kernel(args)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_dispatch_only_for_float32_cpu_without_autograd(monkeypatch):
    calls = []
    forward = scan_kernel.selective_scan_forward
    monkeypatch.setattr(scan_kernel, "selective_scan_forward",
                        lambda *a: calls.append(1) or forward(*a))
    args = _inputs(batch=1, channels=8, n=4, length=10)
    _kernel(args)
    assert len(calls) == 1
    _kernel({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    selective_scan(**(args | dict(u=args["u"].requires_grad_(True))))
    with scan_kernel.disabled():
        assert not scan_kernel.available()
        fallback = _kernel(args)
    assert len(calls) == 1  # float64, autograd and disabled take the chunked form
    assert rel_rms(_reference(args)[0], fallback[0]) <= 1e-4


def test_builds_into_the_cache_once_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(scan_kernel, "_state", {})
    assert scan_kernel.available()
    built = list(tmp_path.glob("selective_scan_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(scan_kernel, "_state", {})
    assert scan_kernel.available() and list(tmp_path.glob("*")) == built  # reused, not rebuilt
    monkeypatch.setattr(scan_kernel, "_state", {})
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path / "other"))
    assert not scan_kernel.available()
    assert "building selective_scan.c failed" in scan_kernel.unavailable_reason()
    args = _inputs(batch=1, channels=8, n=4, length=10)
    assert rel_rms(_reference(args)[0], _kernel(args)[0]) <= 1e-4
