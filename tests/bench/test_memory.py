import torch

from subq.bench.memory import peak_bytes, run_in_child, tensor_peak_bytes

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


def test_tensor_probe_reads_the_peak_of_live_tensors_exactly():
    def work():
        first = torch.empty(32 * MIB).fill_(1.0)  # 128 MiB
        second = torch.empty(16 * MIB).fill_(1.0)  # 64 MiB: the peak, 192 MiB, is here
        del first
        torch.empty(8 * MIB).fill_(1.0)  # 32 MiB more: 96 MiB live, below the peak
        return second

    assert tensor_peak_bytes(work) == 192 * MIB


def test_tensor_probe_is_not_fooled_by_memory_freed_before_it():
    """The probe runs in the process that has just timed the same call: buffers freed there
    and kept by the C allocator must still count when the probed work reuses them."""
    torch.empty(64 * MIB).fill_(1.0)
    assert tensor_peak_bytes(lambda: torch.empty(64 * MIB).fill_(1.0)) == 256 * MIB
