"""The key-value lookup task: its format, that the answer is the queried key's value, fixed
length, determinism per step, rows of a batch, and held-out examples apart from training."""

import pytest
import torch

from subq.tasks.lookup import KEYS, VALUES, KeyValueLookup

from ..helpers import WordTokenizer


def _parse(tokenizer: WordTokenizer, ids: torch.Tensor) -> tuple[dict[str, str], str, str]:
    text = tokenizer.decode(ids.tolist())
    records, query = text.split("\nLookup")
    pairs = dict(item.split("=") for item in records.removeprefix("Records:").split(";"))
    key, answer = query.split(":")
    return {k.strip(): v.strip() for k, v in pairs.items()}, key.strip(), answer.strip()


def test_the_answer_is_the_value_of_the_queried_key():
    tokenizer = WordTokenizer()
    task = KeyValueLookup(tokenizer, pairs=6, seed=3)
    batch = task.batch(0, 32)
    assert batch.ids.shape == (32, task.length)
    assert torch.equal(batch.answers, batch.ids[:, -1])
    asked = set()
    for row in batch.ids:
        records, key, answer = _parse(tokenizer, row)
        assert len(records) == 6 and set(records) <= set(KEYS)
        assert set(records.values()) <= set(VALUES)
        assert records[key] == answer
        asked.add(list(records).index(key))
    assert len(asked) > 3  # the query falls on different records


def test_batches_are_a_function_of_the_step_and_rows_slice_them():
    task = KeyValueLookup(WordTokenizer(), seed=1)
    full = task.batch(5, 8).ids
    assert torch.equal(task.batch(5, 8).ids, full)
    assert torch.equal(task.batch(5, 8, start=2, count=3).ids, full[2:5])
    assert not torch.equal(task.batch(6, 8).ids, full)
    held = task.held_out(64).ids
    assert torch.equal(task.held_out(64).ids, held)
    train = {tuple(r) for step in range(20) for r in task.batch(step, 8).ids.tolist()}
    assert len(train & {tuple(r) for r in held.tolist()}) == 0


def test_words_the_tokenizer_splits_are_left_out_and_too_few_is_an_error():
    tokenizer = WordTokenizer(split=KEYS[:3])
    task = KeyValueLookup(tokenizer, pairs=4)
    assert len(task.keys) == len(KEYS) - 3
    for row in task.batch(0, 16).ids:
        records, _, _ = _parse(tokenizer, row)
        assert not set(records) & set(KEYS[:3])
    with pytest.raises(ValueError, match="pairs"):
        KeyValueLookup(WordTokenizer(split=KEYS[:-2]), pairs=4)
    with pytest.raises(ValueError, match="pairs"):
        KeyValueLookup(WordTokenizer(), pairs=1)
