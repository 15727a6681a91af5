"""One configuration's measurement: the memory probe in the timing process, the timed runs."""

import torch

from subq.bench import measure
from subq.bench.measure import Config, measure_config, repeats_for, timed_runs

MIB = 2.0 ** 20


def test_vanilla_forward_peak_holds_its_score_matrix():
    """vanilla materialises softmax(QK^T): B*H*L^2 float32 scores at least, live at once."""
    config = Config("vanilla", "noncausal self", 512, threads=1)
    scores_mib = config.heads * config.length ** 2 * 4 / MIB
    row = measure_config(config, None, timing=False, memory=True)
    assert scores_mib <= row["mem_fwd_mib"] <= 4 * scores_mib
    assert row["mem_fwd_bwd_mib"] >= row["mem_fwd_mib"]
    assert "fwd_ms" not in row


def test_memory_probed_after_timing_equals_a_fresh_probe():
    """Probing in the process that has just timed the call reads what a memory-only run
    reads: the timed calls' freed buffers are not mistaken for free memory."""
    config = Config("dense", "causal self", 1024, threads=1)
    timed = measure_config(config, None, memory=True, max_repeats=3)
    alone = measure_config(config, None, timing=False, memory=True)
    assert timed["fwd_ms"] > 0 and timed["repeats"] >= 3
    for key in ("mem_fwd_mib", "mem_fwd_bwd_mib"):
        assert timed[key] == alone[key] > 0


def test_timed_runs_are_as_many_as_the_first_run_asks(monkeypatch):
    calls = []

    def fake_run_times_ms(work, repeats, device):
        calls.append(repeats)
        return [40.0] * repeats

    monkeypatch.setattr(measure, "run_times_ms", fake_run_times_ms)
    times = timed_runs(lambda: None, torch.device("cpu"), 1000.0, 3, 20)
    assert len(times) == repeats_for(40.0, 1000.0, 3, 20) == 20
    assert calls == [1, 19]
