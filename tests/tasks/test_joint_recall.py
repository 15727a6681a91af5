"""Joint recall generator: determinism per seed, layout, token ids, loss mask, accuracy."""

from __future__ import annotations

import pytest
import torch

from subq.tasks import joint_recall, per_sample_accuracy
from subq.tasks.joint_recall import BIAS, BOS, IGNORE, PAD, SEP, vocab_size


def _parse(row: list[int], n_value: int, max_n_key: int):
    """Read a sequence back into (first-half table, inquiries) by the documented layout."""
    key_base, ctx_base = BIAS + n_value, BIAS + n_value + max_n_key
    halves, current = [{}, {}], None
    half = 0
    for pos, tok in enumerate(row):
        if tok == SEP:
            half = 1
        elif tok >= ctx_base:
            current = tok - ctx_base
        elif key_base <= tok < ctx_base:
            halves[half][(current, tok - key_base)] = (pos, row[pos + 1] - BIAS)
    return halves


@pytest.mark.parametrize("ranges", [((2, 4), (2, 3)), ((5, 5), (6, 6))])
def test_layout_table_and_loss_mask(ranges):
    n_context, n_key = ranges
    seed = int(torch.randint(0, 10**6, ()))
    batch = joint_recall(20, n_context=n_context, n_key=n_key, n_value=7, seed=seed)
    length = 2 * n_context[1] * (2 * n_key[1] + 1) + 2 - 1
    assert batch.inputs.shape == batch.labels.shape == (20, length)
    assert int(batch.inputs.max()) < vocab_size(7, n_key[1], n_context[1])
    for s in range(20):
        last = int(batch.labels[s, -1])  # the token cut off by inputs = tokens[:-1]
        row = batch.inputs[s].tolist() + [PAD if last == IGNORE else last]
        real = [t for t in row if t != PAD]
        assert real[0] == BOS and real.count(SEP) == 1
        first, inquiry = _parse(row, 7, n_key[1])
        assert set(first) == set(inquiry)                       # every pair asked once
        n_c = len({a for a, _ in first})
        n_k = len({b for _, b in first})
        assert n_context[0] <= n_c <= n_context[1] and n_key[0] <= n_k <= n_key[1]
        assert len(real) == 2 * n_c * (2 * n_k + 1) + 2
        labelled = torch.nonzero(batch.labels[s] != IGNORE).flatten().tolist()
        assert labelled == sorted(pos for pos, _ in inquiry.values())
        for pair, (pos, value) in inquiry.items():
            assert value == first[pair][1]                       # the same table in both halves
            assert int(batch.labels[s, pos]) == BIAS + value == row[pos + 1]
        assert all(0 <= v < 7 for _, v in first.values())


def test_deterministic_per_seed():
    a = joint_recall(8, n_context=(2, 6), n_key=(2, 6), seed=3)
    b = joint_recall(8, n_context=(2, 6), n_key=(2, 6), seed=3)
    c = joint_recall(8, n_context=(2, 6), n_key=(2, 6), seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_paper_defaults_and_bad_ranges():
    batch = joint_recall(2, seed=0)
    assert batch.inputs.shape == (2, 1057)                       # pad_len 1058 minus one
    assert vocab_size() == 58
    with pytest.raises(ValueError, match="n_context"):
        joint_recall(2, n_context=(5, 17), max_n_context=16)
    with pytest.raises(ValueError, match="n_key"):
        joint_recall(2, n_key=(0, 3))


def test_per_sample_accuracy_averages_each_sample():
    labels = torch.tensor([[IGNORE, 2, 3, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 2] = logits[0, 2, 0] = logits[1, 0, 1] = 1.0   # 1 of 2 right; 1 of 1 right
    assert per_sample_accuracy(logits, labels).tolist() == [0.5, 1.0]
