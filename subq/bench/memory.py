"""Peak memory of a piece of work, above a baseline taken just before it.

On the CPU the probe reads the kernel's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``) after resetting it to the current resident size (writing ``5`` to
``/proc/self/clear_refs``); where that reset is not allowed it falls back to
``getrusage``'s lifetime maximum, which is only right when the work is the process's largest
so far. On CUDA it reads the caching allocator's peak. The resident size depends on what the C
allocator kept of earlier work, so a job that needs it runs in a fresh child process
(:func:`run_in_child`), its large buffers mapped one by one (``MALLOC_ENV``).
:func:`tensor_peak_bytes` reads PyTorch's own allocation records instead, so it can probe in a
process that has just run other work (the efficiency benchmark probes right after timing).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
#: Large allocations go straight to mmap and back to the kernel when freed, so one call's
#: freed buffers are not silently reused by the next (glibc's adaptive threshold would).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> int:
    """Reset the high-water mark if the kernel allows it; return the baseline in bytes."""
    try:
        _CLEAR_REFS.write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_bytes(work: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes by which ``work()``'s peak memory on ``device`` exceeds the memory in use
    just before it (CPU: resident set size; CUDA: allocated tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    base = _reset_cpu_peak()
    work()
    return max(0, _cpu_peak() - base)


def tensor_peak_bytes(work: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes by which the tensors PyTorch allocates on ``device`` during ``work()`` peak above
    those it held before.

    CUDA: the caching allocator's counters. CPU: ``torch.profiler``'s allocation records
    (``profile_memory``), summed in order; a tensor allocated before ``work`` and freed in it
    (e.g. an earlier call's gradients) is not recorded, so its memory is never counted as
    freed: the reading is that of a first call. Unlike :func:`peak_bytes` it does not depend
    on what the C allocator kept of earlier work, so a configuration can be probed in the
    process that has just timed it; memory allocated outside PyTorch is not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return peak_bytes(work, device)
    _note_earlier_frees()
    prof = _allocation_recorder()
    with _quiet_stderr():  # the profiler logs its start and stop
        prof.start()
    try:
        work()
    finally:
        with _quiet_stderr():
            prof.stop()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def _allocation_recorder() -> torch.profiler.profile:
    """A CPU profiler that records allocations (:func:`_note_earlier_frees` first)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


@functools.cache
def _note_earlier_frees() -> None:
    """A silent probe that frees a tensor from before it: PyTorch warns once per process that
    such frees are not recorded, which :func:`tensor_peak_bytes` expects."""
    earlier = [torch.ones(1)]
    with _quiet_stderr(), _allocation_recorder():
        earlier.clear()


@contextmanager
def _quiet_stderr():
    """File descriptor 2 pointed at /dev/null (C++ logging writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_CONTEXT = None


def _context() -> multiprocessing.context.BaseContext:
    """A fork server that imports torch once and never runs an op, so each child starts in
    milliseconds, fresh, with no thread pool inherited."""
    global _CONTEXT
    if _CONTEXT is None:
        os.environ.update(MALLOC_ENV)
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "subq", "subq.bench.child"])
    return _CONTEXT


def _child_main(conn, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except Exception as exc:  # reported to the parent, which records it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_in_child(fn: Callable[..., Any], args: tuple = (), timeout: float | None = None
                 ) -> tuple[str, Any]:
    """Run ``fn(*args)`` in a fresh child process.

    Returns ``("ok", result)``, ``("error", message)`` when it raised or died (e.g. killed
    for memory), or ``("timeout", message)`` when it ran past ``timeout`` seconds and was
    killed. ``fn`` must be importable by name (a module-level function).
    """
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(timeout):
            status, payload = receive.recv()
            child.join(timeout=10)
            return status, payload
        if child.is_alive():
            return "timeout", f"ran past {timeout:.0f} s and was stopped"
        child.join()
        return "error", f"child process died (exit code {child.exitcode}; out of memory?)"
    except EOFError:
        child.join()
        return "error", f"child process died (exit code {child.exitcode}; out of memory?)"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        receive.close()
