"""The fused CPU kernel of the selective scan, forward and backward, built on first use.

``csrc/selective_scan.c`` runs the Mamba-1 recurrence of :mod:`subq.ops.scan` sequentially in
time, eight channels per SIMD register, with every elementwise step (discretisation of delta,
decay ``2^(delta A log2 e)``, drive, ``C . h``, skip, gate) fused into one pass: no
``(L, N, D)`` tensor exists, the states stay in the L1 cache, and a state entry costs one exp2
and three multiply-adds. For training (:class:`FusedSelectiveScan`) the forward also keeps the
state every ``_TOKENS`` steps and the backward recomputes each block from it and runs the
adjoint recurrence, forming every gradient in the same pass. Eager PyTorch cannot fuse these
steps, so the chunked form of :func:`subq.ops.scan.selective_scan` (float64, other devices,
no compiler) makes ~7 passes over the states instead.

The C file is compiled with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native``)
into a cache directory (``$SUBQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/subq`` or
``~/.cache/subq``), keyed by a hash of the source, the flags, the compiler and the CPU, written
to a temporary file and renamed, so concurrent first uses are safe. It is called through
``ctypes``, which releases the GIL: the ``(batch row, channel block)`` jobs are split over
``torch.get_num_threads()`` Python threads. Without a compiler (or with
``SUBQ_SCAN_KERNEL=0``) :func:`available` is false and :mod:`subq.ops.scan` keeps its eager
chunked form; :func:`unavailable_reason` says why.

Scope: float32 CPU tensors, any strides (mamba-ssm's channel-major ``(B, D, L)`` and the Mamba
mixer's time-major views alike), B and C time-invariant, shared, grouped or per channel.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.c"
_FLAGS = ["-O3", "-std=gnu11", "-fno-math-errno", "-shared", "-fPIC"]
_NATIVE = ["-march=native"]
_LANES = 8  # channels per job (LANES in the C source)
_TOKENS = 64  # steps per block (TOKENS in the C source): a checkpoint per block
_SERIAL_WORK = 1 << 16  # below this many state-entry updates, one thread (no pool overhead)


def _fields() -> list[tuple[str, type]]:
    """``scan_args`` of the C source, field for field: sizes, then each tensor's pointer and
    strides (in elements), B and C with their channels per group."""
    fields = [(name, ctypes.c_int64) for name in ("batch", "channels", "length", "nstate")]
    for name, strides in (("u", "bdt"), ("delta", "bdt"), ("z", "bdt"), ("A", ""),
                          ("B", "bgnt"), ("C", "bgnt"), ("D", ""), ("h0", "bdn"),
                          ("out", "bdt")):
        fields.append((name, ctypes.c_void_p))
        fields += [(f"{name}_{axis}", ctypes.c_int64) for axis in strides]
        if name in ("B", "C"):
            fields.append((f"{name}_per_group", ctypes.c_int64))
        if name == "delta":
            fields += [("delta_bias", ctypes.c_void_p), ("softplus", ctypes.c_int64)]
    return [*fields, ("last", ctypes.c_void_p), ("checkpoints", ctypes.c_void_p)]


class _Args(ctypes.Structure):
    _fields_ = _fields()


class _Grads(ctypes.Structure):
    """``scan_grads`` of the C source, field for field."""

    _fields_ = [("dout", ctypes.c_void_p), *[(f"dout_{a}", ctypes.c_int64) for a in "bdt"],
                *[(name, ctypes.c_void_p) for name in ("dlast", "du", "ddelta", "dz", "dh0",
                                                       "dA", "dD", "dbias")],
                ("dB", ctypes.c_void_p), *[(f"dB_{a}", ctypes.c_int64) for a in
                                           ("b", "g", "n", "t", "thread")],
                ("dC", ctypes.c_void_p), *[(f"dC_{a}", ctypes.c_int64) for a in
                                           ("b", "g", "n", "t", "thread")],
                ("dA_thread", ctypes.c_int64), ("dvec_thread", ctypes.c_int64)]


_state: dict[str, object] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pool threads (a pool copied with the process
    would accept work and never run it) and may hold a copy of a taken lock: start afresh."""
    global _lock
    _lock = threading.Lock()
    _state.pop("pools", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_enabled = os.environ.get("SUBQ_SCAN_KERNEL", "1") != "0"


def _cache_dir() -> Path:
    """``$SUBQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/subq`` or ``~/.cache/subq``; a directory
    under the system's temporary one when that cannot be written."""
    if os.environ.get("SUBQ_CACHE_DIR"):
        return Path(os.environ["SUBQ_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "subq"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"subq-cache-{user}"


def _cpu_id() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on the same)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags",
                                                                     "Features")]
    return "\n".join(dict.fromkeys(keep))


def _compile(compiler: list[str], source: bytes) -> Path:
    """The shared library for ``source``, compiled once per cache key; raises on failure."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    errors = []
    for flags in (_FLAGS + _NATIVE, _FLAGS):
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_id().encode(), platform.machine().encode()]))
        target = _cache_dir() / f"selective_scan_{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            built = subprocess.run([*compiler, *flags, "-o", str(partial), str(_SOURCE)],
                                   capture_output=True, text=True)
            if built.returncode == 0:
                os.replace(partial, target)  # atomic: a concurrent build writes the same file
                return target
            errors.append(built.stderr.strip())
    raise RuntimeError("\n".join(errors))


def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason in ``_state["reason"]``); built on first call."""
    with _lock:
        if "library" not in _state:
            _state["library"], _state["reason"] = _load()
        return _state["library"]


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    library, reason = None, None
    if os.environ.get("CC"):
        compiler = shlex.split(os.environ["CC"])
    else:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        compiler = [found] if found else []
    if not compiler:
        reason = "no C compiler found (set $CC)"
    else:
        try:
            library = ctypes.CDLL(str(_compile(compiler, _SOURCE.read_bytes())))
            library.subq_selective_scan_f32.argtypes = [ctypes.POINTER(_Args), ctypes.c_int64,
                                                        ctypes.c_int64]
            library.subq_selective_scan_f32.restype = ctypes.c_int
            library.subq_selective_scan_backward_f32.argtypes = [
                ctypes.POINTER(_Args), ctypes.POINTER(_Grads), ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int64]
            library.subq_selective_scan_backward_f32.restype = ctypes.c_int
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            library, reason = None, f"building {_SOURCE.name} failed: {error}"
    return library, reason


def available() -> bool:
    """Whether the fused kernel is built (or can be) and enabled."""
    return _enabled and _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is false, or None."""
    if not _enabled:
        return "disabled (SUBQ_SCAN_KERNEL=0 or scan_kernel.disabled())"
    return None if _library() is not None else str(_state["reason"])


@contextlib.contextmanager
def disabled():
    """Within the block the scan uses its eager chunked form (for tests and comparisons)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel can run on these scan inputs: float32 on the CPU, and available."""
    present = [x for x in tensors if x is not None]
    return all(x.device.type == "cpu" and x.dtype == torch.float32 for x in present) \
        and available()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers, kept for later calls (one per distinct size)."""
    with _lock:
        pools = _state.setdefault("pools", {})
        if threads not in pools:
            pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="subq-scan")
        return pools[threads]


def _time_major(x: torch.Tensor, channels: int) -> bool:
    """Whether the kernel gets B or C time-major: when it varies in time and every block of
    ``_LANES`` channels reads one group (shared, or groups of a multiple of ``_LANES``
    channels), so that a block of steps is one contiguous ``[t][n]`` array read in place. Per
    lane groups are gathered per block by the kernel from any strides instead."""
    return x.dim() == 3 or (x.dim() == 4 and (channels // x.shape[1]) % _LANES == 0)


def _projection(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """B or C for the kernel: the tensor (made time-major where :func:`_time_major`: a copy
    of ``B G N L`` floats), its strides ``(batch, group, n, t)`` and channels per group."""
    if x.dim() == 2:  # (D, N): time-invariant, one group per channel
        return x, (0, x.stride(0), x.stride(1), 0), 1
    if x.dim() == 3:  # (B, N, L): shared by all channels
        x = x.transpose(1, 2).contiguous()
        return x, (x.stride(0), 0, x.stride(2), x.stride(1)), channels
    per_group = channels // x.shape[1]  # (B, G, N, L)
    if _time_major(x, channels):
        x = x.transpose(2, 3).contiguous()
        return x, (x.stride(0), x.stride(1), x.stride(3), x.stride(2)), per_group
    return x, tuple(x.stride()), per_group


def _projection_grad(x: torch.Tensor, channels: int, slots: int) -> torch.Tensor:
    """Zeroed per-thread accumulators ``(slots, ...)`` for the gradient of B or C, time-major
    where :func:`_projection` makes ``x`` so."""
    shape = (*x.shape[:-2], x.shape[-1], x.shape[-2]) if _time_major(x, channels) else x.shape
    return x.new_zeros(slots, *shape)


def _grad_strides(grad: torch.Tensor, time_major: bool) -> tuple[int, ...]:
    """``(batch, group, n, t, thread)`` strides of a :func:`_projection_grad` buffer."""
    strides = grad.stride()
    if grad.dim() == 3:  # (slots, D, N)
        return 0, strides[1], strides[2], 0, strides[0]
    if grad.dim() == 4:  # (slots, B, L, N)
        return strides[1], 0, strides[3], strides[2], strides[0]
    if time_major:  # (slots, B, G, L, N)
        return strides[1], strides[2], strides[4], strides[3], strides[0]
    return strides[1], strides[2], strides[3], strides[4], strides[0]  # (slots, B, G, N, L)


def _projection_grad_sum(grad: torch.Tensor, time_major: bool) -> torch.Tensor:
    """The per-thread accumulators summed, in the layout of the original B or C."""
    total = grad.sum(0)
    return total.transpose(-1, -2) if time_major else total


def _unwritten(x: torch.Tensor, *shape: int, like: bool = False) -> torch.Tensor:
    """An uninitialised buffer that the kernel writes in full: ``x``'s layout (``like``) or a
    contiguous ``shape``. (Tests replace this by a NaN-filled one, so an element the kernel
    leaves unwritten cannot pass.)"""
    return torch.empty_like(x) if like else x.new_empty(shape)


def _pointer(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _strided(x: torch.Tensor | None, dims: int) -> tuple:
    """A tensor's pointer and strides, or NULL and zeros."""
    return (None, *[0] * dims) if x is None else (x.data_ptr(), *x.stride())


def _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out, last,
               checkpoints) -> tuple[_Args, list[torch.Tensor]]:
    """The C argument block, and the tensors it points into (kept alive by the caller)."""
    batch, channels, length = u.shape
    A = A.contiguous()
    D = None if D is None else D.contiguous()
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    B, b_strides, b_group = _projection(B, channels)
    C, c_strides, c_group = _projection(C, channels)
    args = _Args(batch, channels, length, A.shape[1],
                 *_strided(u, 3), *_strided(delta, 3), _pointer(delta_bias),
                 int(delta_softplus), *_strided(z, 3), A.data_ptr(),
                 B.data_ptr(), *b_strides, b_group, C.data_ptr(), *c_strides, c_group,
                 _pointer(D), *_strided(initial_state, 3), *_strided(out, 3), _pointer(last),
                 _pointer(checkpoints))
    return args, [A, B, C, D, delta_bias]


def _job_ranges(batch: int, channels: int, length: int, n_state: int) -> list[tuple[int, int]]:
    """The ``(batch row, channel block)`` jobs cut into one contiguous range per thread (one
    range for small work, where a pool round trip would cost more than it saves)."""
    jobs = batch * -(-channels // _LANES)
    threads = max(1, min(torch.get_num_threads(), jobs))
    if threads == 1 or jobs * length * n_state * _LANES < _SERIAL_WORK:
        return [(0, jobs)]
    bounds = [jobs * i // threads for i in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _run(call, ranges: list[tuple[int, int]]) -> None:
    """``call(first, stop, slot)`` for every range, on the pool when there are several."""
    jobs = [(*r, slot) for slot, r in enumerate(ranges)]
    codes = [call(*jobs[0])] if len(jobs) == 1 else \
        list(_pool(len(jobs)).map(lambda job: call(*job), jobs))
    if any(codes):
        raise MemoryError("the scan kernel could not allocate its scratch buffers")


def _checked_library() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(f"the scan kernel is unavailable: {unavailable_reason()}")
    return library


def selective_scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
                           z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                           delta_softplus: bool, initial_state: torch.Tensor | None,
                           checkpoints: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, D, L)`` (stored like ``u``) and the last state ``(B, D, N)``.

    Arguments as :func:`subq.ops.scan.selective_scan` takes them, already checked, float32 on
    the CPU; ``checkpoints``, if given (:func:`_checkpoint_buffer`), receives the states the
    backward restarts from.
    """
    library = _checked_library()
    batch, channels, length = u.shape
    out = _unwritten(u, like=True)
    last = _unwritten(u, batch, channels, A.shape[1])
    args, keep = _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            initial_state, out, last, checkpoints)
    pointer = ctypes.byref(args)
    _run(lambda first, stop, slot: library.subq_selective_scan_f32(pointer, first, stop),
         _job_ranges(batch, channels, length, A.shape[1]))
    del keep
    return out, last


def _checkpoint_buffer(u: torch.Tensor, n_state: int) -> torch.Tensor:
    """The state before every block of ``_TOKENS`` steps, per job: ``(jobs, blocks, N,
    LANES)``."""
    batch, channels, length = u.shape
    return _unwritten(u, batch * -(-channels // _LANES), -(-length // _TOKENS), n_state,
                      _LANES)


class FusedSelectiveScan(torch.autograd.Function):
    """The scan with the fused kernel both ways: forward saving a state every ``_TOKENS``
    steps (memory ``B D N L / _TOKENS``), backward recomputing each block from it and running
    the adjoint recurrence (see the C source). Arguments as :func:`selective_scan_forward`;
    returns ``out`` and the last state, both differentiable."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        checkpoints = _checkpoint_buffer(u, A.shape[1])
        out, last = selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                           initial_state, checkpoints)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
        ctx.delta_softplus = delta_softplus
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
        library = _checked_library()
        batch, channels, length = u.shape
        ranges = _job_ranges(batch, channels, length, A.shape[1])
        slots = len(ranges)
        args, keep = _scan_args(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                initial_state, None, None, checkpoints)
        du, ddelta = (_unwritten(u, *u.shape) for _ in range(2))
        dz = None if z is None else _unwritten(u, *u.shape)
        dh0 = _unwritten(u, batch, channels, A.shape[1])
        dA = A.new_zeros(slots, *A.shape)
        dD, dbias = (u.new_zeros(slots, channels) for _ in range(2))
        major = _time_major(B, channels), _time_major(C, channels)
        dB, dC = _projection_grad(B, channels, slots), _projection_grad(C, channels, slots)
        dlast = None if dlast is None else dlast.contiguous()
        grads = _Grads(*_strided(dout, 3), _pointer(dlast), du.data_ptr(), ddelta.data_ptr(),
                       _pointer(dz), dh0.data_ptr(), dA.data_ptr(), dD.data_ptr(),
                       dbias.data_ptr(), dB.data_ptr(), *_grad_strides(dB, major[0]),
                       dC.data_ptr(), *_grad_strides(dC, major[1]), dA.stride(0),
                       dD.stride(0))
        pointers = ctypes.byref(args), ctypes.byref(grads)
        _run(lambda first, stop, slot: library.subq_selective_scan_backward_f32(
            *pointers, first, stop, slot), ranges)
        del keep
        return (du, ddelta, dA.sum(0), _projection_grad_sum(dB, major[0]),
                _projection_grad_sum(dC, major[1]),
                None if D is None else dD.sum(0), dz,
                None if delta_bias is None else dbias.sum(0),
                None if initial_state is None else dh0, None)
