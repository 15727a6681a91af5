import torch

from subq.bench.memory import peak_bytes, run_in_child

MIB = 2 ** 20


def allocate_and_measure(mib: int) -> int:
    """Peak memory of filling a fresh ``mib`` MiB tensor (run in a child process)."""
    return peak_bytes(lambda: torch.empty(mib * MIB // 4).fill_(1.0))


def sleep_forever() -> None:
    import time
    time.sleep(60)


def test_probe_reads_a_256_mib_allocation_within_10_percent():
    assert abs(peak_bytes(lambda: torch.empty(64 * MIB).fill_(1.0)) / MIB - 256) < 25.6


def test_child_probe_reads_a_256_mib_allocation_within_10_percent():
    status, peak = run_in_child(allocate_and_measure, (256,), timeout=120)
    assert status == "ok"
    assert abs(peak / MIB - 256) < 25.6


def test_child_that_runs_too_long_is_stopped():
    status, message = run_in_child(sleep_forever, timeout=1)
    assert status == "timeout" and "1 s" in message
