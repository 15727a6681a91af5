"""Byte corpus: document split, user files, Python docs lookup, window sampling, bits per byte."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from subq.tasks import packages
from subq.tasks.text import (
    PYTHON_DOCS_PACKAGE,
    PYTHON_DOCS_SOURCES,
    SEPARATOR,
    ByteCorpus,
    WindowSampler,
    documents_from_path,
    eval_windows,
    load_corpus,
    python_docs_documents,
    split_documents,
    split_file,
)


def make_documents(n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` distinct documents of random lowercase prose (no 0x00), named ``doc00000.txt``..."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [bytes(rng.choices(range(97, 123), k=rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 40))]
        docs.append((f"doc{i:05d}.txt", f"doc {i}: ".encode() + b" ".join(words)))
    return docs


def bucket(name: str) -> int:
    """The documented hash bucket, computed independently of the code under test."""
    return zlib.crc32(name.encode("utf-8")) % 100


def sides(corpus: ByteCorpus) -> tuple[list[bytes], list[bytes]]:
    """The documents of each side, read back at the separator."""
    return ([bytes(corpus.train.tolist()).split(SEPARATOR),
             bytes(corpus.valid.tolist()).split(SEPARATOR)])


def test_split_is_disjoint_covers_all_and_follows_the_hash(fresh_seed):
    docs = make_documents(300, fresh_seed)
    corpus = ByteCorpus.from_documents(docs, "generated")
    train, valid = sides(corpus)
    assert corpus.train.dtype == corpus.valid.dtype == torch.uint8 and corpus.vocab_size == 256
    assert (corpus.train_documents, corpus.valid_documents) == (len(train), len(valid))
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(data for _, data in docs)
    held = {data for name, data in docs if bucket(name) < 5}
    assert set(valid) == held and 0 < len(held) < 40   # ~15 of 300 expected
    assert corpus.train.numel() + corpus.valid.numel() == (
        sum(len(d) for _, d in docs) + len(docs) - 2)  # one separator between documents


def test_split_is_deterministic_and_stable_as_the_corpus_grows(fresh_seed):
    docs = make_documents(200, fresh_seed)
    train, valid = split_documents(docs)
    shuffled = docs[:]
    random.Random(fresh_seed).shuffle(shuffled)
    train2, valid2 = split_documents(shuffled)
    assert set(train2) == set(train) and set(valid2) == set(valid)
    grown_train, grown_valid = split_documents(docs + make_documents(400, fresh_seed + 1)[200:])
    assert set(train) <= set(grown_train) and set(valid) <= set(grown_valid)
    half_train, half_valid = split_documents(docs, valid_percent=50)
    assert 60 < len(half_valid) < 140 and set(valid) <= set(half_valid)


def test_each_side_gets_a_document():
    # buckets: a.txt 66, b.txt 46 -> none held out by the hash; the lowest bucket moves over
    train, valid = split_documents([("a.txt", b"hi"), ("b.txt", b"yo!")])
    assert train == [("a.txt", b"hi")] and valid == [("b.txt", b"yo!")]
    low = [name for name in (f"n{i}" for i in range(1000)) if bucket(name) < 5][:3]
    train, valid = split_documents([(name, name.encode()) for name in low])
    assert len(train) == 1 and len(valid) == 2
    assert bucket(train[0][0]) == max(bucket(name) for name in low)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents([("only.txt", b"x")])


def test_documents_from_folder(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    files = {"b.txt": b"bee", "a.md": b"ay", "sub/c.rst": b"sea", "sub/deeper/d.txt": b"dee",
             "skip.py": b"print()", "empty.txt": b""}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    assert documents_from_path(tmp_path) == [
        ("a.md", b"ay"), ("b.txt", b"bee"), ("sub/c.rst", b"sea"), ("sub/deeper/d.txt", b"dee")]
    with pytest.raises(FileNotFoundError, match="no text file or folder"):
        documents_from_path(tmp_path / "missing")
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no non-empty"):
        documents_from_path(tmp_path / "none")


def test_single_file_is_cut_at_blank_lines(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    paragraphs = [bytes(rng.choices(b"abc \n", k=rng.randint(1, 3000))).replace(b"\n\n", b"\n")
                  .strip(b"\n") or b"x" for _ in range(300)]
    data = b"\n\n".join(paragraphs)
    (tmp_path / "book.txt").write_bytes(data)
    docs = documents_from_path(tmp_path / "book.txt")
    assert [name for name, _ in docs] == [f"book.txt#{i:05d}" for i in range(len(docs))]
    assert b"\n\n".join(chunk for _, chunk in docs) == data
    target = min(64 * 1024, len(data) // 20)
    assert all(target <= len(chunk) < target + 3000 + 2 * 300 for _, chunk in docs[:-1])
    assert len(docs) >= 10
    big = split_file("big", data * 4, chunk_bytes=4096)
    assert all(len(chunk) >= 4096 for _, chunk in big[:-1]) and len(big) > 100


def test_file_without_blank_lines_is_cut_at_lines():
    data = b"\n".join(b"line %d" % i for i in range(100))
    docs = split_file("lines.txt", data)
    assert b"\n".join(chunk for _, chunk in docs) == data and len(docs) >= 10
    assert all(len(chunk) >= len(data) // 20 for _, chunk in docs[:-1])


def test_load_corpus_from_user_text(tmp_path, fresh_seed):
    (tmp_path / "texts").mkdir()
    for name, data in make_documents(40, fresh_seed):
        (tmp_path / "texts" / name).write_bytes(data)
    corpus = load_corpus(tmp_path / "texts")
    assert corpus.name == str(tmp_path / "texts")
    assert corpus.train_documents + corpus.valid_documents == 40
    assert corpus.train_documents >= 1 and corpus.valid_documents >= 1
    (tmp_path / "one.txt").write_bytes(b"\n\n".join(d for _, d in make_documents(60, 1)))
    single = load_corpus(str(tmp_path / "one.txt"))
    assert single.valid.numel() > 0 and single.train.numel() > single.valid.numel()


@pytest.fixture
def no_python_docs(tmp_path, monkeypatch):
    """Neither installed nor cached: an empty system root and an empty cache."""
    (tmp_path / "system").mkdir()
    monkeypatch.setattr(packages, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("SUBQ_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_docs_name_the_package_or_fall_back(no_python_docs):
    with pytest.raises(FileNotFoundError) as err:
        load_corpus(fetch=False)
    assert f"apt-get install {PYTHON_DOCS_PACKAGE}" in str(err.value)
    assert "--text" in str(err.value)
    from pydoc_data.topics import topics

    with pytest.warns(UserWarning, match="pydoc_data"):
        corpus = load_corpus(fetch=False, fallback=True)
    assert corpus.name == "pydoc_data.topics"
    assert corpus.train_documents + corpus.valid_documents == len(topics)


def test_python_docs_from_the_cache(no_python_docs):
    sources = no_python_docs / "cache" / "debian" / PYTHON_DOCS_PACKAGE / PYTHON_DOCS_SOURCES
    files = {"library/os.rst.txt": b"os", "about.rst.txt": b"about", "c-api/x.rst.txt": b"x",
             "library/os.html": b"<html>", "glossary.rst.txt": b"terms"}
    for rel, data in files.items():
        (sources / rel).parent.mkdir(parents=True, exist_ok=True)
        (sources / rel).write_bytes(data)
    expected = [("about.rst.txt", b"about"), ("c-api/x.rst.txt", b"x"),
                ("glossary.rst.txt", b"terms"), ("library/os.rst.txt", b"os")]
    assert python_docs_documents(fetch=False) == expected
    assert python_docs_documents(no_python_docs / "cache" / "debian" / PYTHON_DOCS_PACKAGE,
                                 fetch=False) == expected
    corpus = load_corpus(fetch=False)
    assert corpus.name == PYTHON_DOCS_PACKAGE and corpus.train_documents == 3


def random_bytes(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8)


def test_sampler_windows_are_data_and_targets_are_shifted():
    data, seq_len = random_bytes(500), 17
    sampler = WindowSampler(data, seq_len, seed=3)
    inputs, targets = sampler.batch(7, 12)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (12, seq_len)
    for row, offset in enumerate(sampler.offsets(7, 12).tolist()):
        assert torch.equal(inputs[row], data[offset:offset + seq_len].long())
        assert torch.equal(targets[row], data[offset + 1:offset + seq_len + 1].long())


def test_sampler_is_stateless_per_seed_and_step():
    data = random_bytes(10_000)
    a, b = WindowSampler(data, 32, seed=5), WindowSampler(data, 32, seed=5)
    for step in range(4):
        a.batch(step, 8)
    assert torch.equal(a.batch(4, 8)[0], b.batch(4, 8)[0])
    assert not torch.equal(b.batch(4, 8)[0], b.batch(5, 8)[0])
    assert not torch.equal(b.batch(4, 8)[0], WindowSampler(data, 32, seed=6).batch(4, 8)[0])


@pytest.mark.parametrize(("start", "count"), [(0, 16), (0, 4), (4, 4), (12, 4), (5, 1), (3, None)])
def test_sampler_rows_are_rows_of_the_global_batch(start, count):
    sampler = WindowSampler(random_bytes(5000), 24, seed=11)
    full_in, full_out = sampler.batch(9, 16)
    part_in, part_out = sampler.batch(9, 16, start=start, count=count)
    stop = 16 if count is None else start + count
    assert torch.equal(part_in, full_in[start:stop]) and torch.equal(part_out, full_out[start:stop])


def test_sampler_reaches_every_offset():
    data, seq_len = random_bytes(23), 20
    seen = set(WindowSampler(data, seq_len, seed=0).offsets(0, 400).tolist())
    assert seen == {0, 1, 2}
    assert set(WindowSampler(data[:21], seq_len, seed=0).offsets(0, 10).tolist()) == {0}


def test_sampler_and_eval_reject_short_data_and_bad_rows():
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(random_bytes(20), 20, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(random_bytes(20), 20, 4)
    with pytest.raises(ValueError, match="bytes or token ids"):
        WindowSampler(torch.rand(100), 8, seed=0)
    ids = torch.randint(0, 50000, (100,), dtype=torch.int32)  # token ids sample like bytes
    inputs, targets = WindowSampler(ids, 8, seed=0).batch(0, 4)
    assert inputs.dtype == torch.int64 and torch.equal(inputs[:, 1:], targets[:, :-1])
    sampler = WindowSampler(random_bytes(100), 8, seed=0)
    for start, count in [(-1, 2), (3, 6), (0, 0)]:
        with pytest.raises(ValueError, match="start"):
            sampler.batch(0, 8, start=start, count=count)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(random_bytes(100), 8, 0)


@pytest.mark.parametrize(("n", "seq_len", "max_windows", "expected"),
                         [(200, 16, 5, 5), (200, 16, 100, 12), (33, 16, 9, 2), (20, 16, 3, 1)])
def test_eval_windows_spread_evenly_without_overlap(n, seq_len, max_windows, expected):
    data = torch.randperm(256)[:n].to(torch.uint8)  # distinct bytes: a window's offset is known
    inputs, targets = eval_windows(data, seq_len, max_windows)
    assert inputs.shape == targets.shape == (expected, seq_len)
    position = {int(v): i for i, v in enumerate(data.tolist())}
    offsets = [position[int(row[0])] for row in inputs]
    for row, offset in enumerate(offsets):
        assert torch.equal(inputs[row], data[offset:offset + seq_len].long())
        assert torch.equal(targets[row], data[offset + 1:offset + seq_len + 1].long())
    assert offsets[0] == 0
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert all(g >= seq_len for g in gaps) and (not gaps or max(gaps) - min(gaps) <= 1)
    if expected > 1:
        assert offsets[-1] + seq_len + 1 == n
    again = eval_windows(data, seq_len, max_windows)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)


def test_bits_per_byte():
    from subq.tasks.text import bits_per_byte

    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert bits_per_byte(0.0) == 0.0


def test_stdlib_corpus_by_name():
    corpus = load_corpus("pydoc_data")
    assert corpus.name == "pydoc_data.topics"
    assert corpus.train.numel() > 100_000 and corpus.valid.numel() > 1_000
    assert corpus.train_documents > corpus.valid_documents > 0
