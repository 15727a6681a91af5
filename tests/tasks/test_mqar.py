"""MQAR generator (zoology semantics): determinism, key/value halves, queries and labels."""

from __future__ import annotations

import pytest
import torch

from subq.tasks import mqar
from subq.tasks.joint_recall import IGNORE


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_queries_recall_their_values(random_non_queries):
    vocab, length, pairs = 64, 48, 6
    seed = int(torch.randint(0, 10**6, ()))
    batch = mqar(30, vocab_size=vocab, input_seq_len=length, num_kv_pairs=pairs,
                 random_non_queries=random_non_queries, seed=seed)
    assert batch.inputs.shape == batch.labels.shape == (30, length)
    for s in range(30):
        row, labels = batch.inputs[s].tolist(), batch.labels[s]
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= x < vocab // 2 for x in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= x < vocab for x in values)
        lookup = dict(zip(keys, values, strict=True))
        labelled = torch.nonzero(labels != IGNORE).flatten().tolist()
        assert len(labelled) == pairs and min(labelled) >= 2 * pairs
        assert sorted(row[p] for p in labelled) == sorted(keys)  # each key queried once
        for p in labelled:
            assert int(labels[p]) == lookup[row[p]]
            assert p + 1 >= length or row[p + 1] == lookup[row[p]]
        if not random_non_queries:
            others = set(range(2 * pairs, length)) - set(labelled) - {p + 1 for p in labelled}
            assert all(row[p] == 0 for p in others)


def test_deterministic_and_power_law_prefers_short_gaps():
    a = mqar(200, vocab_size=128, input_seq_len=128, num_kv_pairs=4, seed=9)
    b = mqar(200, vocab_size=128, input_seq_len=128, num_kv_pairs=4, seed=9)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, mqar(200, vocab_size=128, input_seq_len=128,
                                          num_kv_pairs=4, seed=10).inputs)
    pos = torch.nonzero(a.labels != IGNORE)[:, 1]
    gap = (pos - 8) // 2
    assert (gap < 15).float().mean() > 2 * (gap >= 45).float().mean()


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_seq_len"):
        mqar(1, input_seq_len=10, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(1, vocab_size=6, num_kv_pairs=4)
