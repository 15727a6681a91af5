"""Long English text: for perplexity under a tokenizer, and as bytes for training a small
language model measured in bits per byte.

The text for perplexity (:func:`load_text`) is CPython's own reference prose:
``pydoc_data.topics`` holds the text of the Python Language Reference sections that ``help()``
shows (about 465,000 characters, some 110,000 SmolLM2 tokens, English technical prose with code
excerpts). It is part of the standard library, so it is present offline on every machine; its
licence is the Python Software Foundation License (free to use and redistribute; not public
domain). Topics are joined in sorted order, so the text is the same for a given Python version.

The byte corpus for training (:func:`load_corpus`) is larger: the reStructuredText sources of
Python's documentation, from the Debian package ``python3.11-doc`` (497 files, about 11 MB
under ``usr/share/doc/python3.11/html/_sources``, same licence), read where it is installed or
fetched once with ``apt-get download`` (:mod:`subq.tasks.packages`); or the user's own files.
Documents are split into train and valid by a hash of their name, bytes are the tokens
(vocabulary 256) and documents are joined by one ``0x00`` byte, which UTF-8 text never holds.
:class:`WindowSampler` draws training windows, :func:`eval_windows` cuts held-out ones.

Worked example: documents ``a.txt`` = ``b"hi"`` and ``b.txt`` = ``b"yo!"``, with ``b.txt``
held out, give ``train = [104, 105]`` and ``valid = [121, 111, 33]``; with ``seq_len=2`` the
one valid window is ``inputs = [121, 111]``, ``targets = [111, 33]``.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .batches import batch_rows, seeded_generator
from .packages import debian_package_root

PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
#: ``text=`` value naming the small corpus every Python ships (``pydoc_data.topics``)
STDLIB_CORPUS = "pydoc_data"
SEPARATOR = b"\x00"
TEXT_SUFFIXES = (".txt", ".rst", ".md")
CHUNK_BYTES = 64 * 1024
MIN_CHUNKS = 20

Document = tuple[str, bytes]


def python_reference_text() -> str:
    """The ``pydoc_data`` topics of this Python, sorted by topic name, blank-line separated."""
    return "\n\n".join(data.decode() for _, data in python_reference_documents())


def load_text(path: str | os.PathLike | None = None) -> str:
    """The UTF-8 text of ``path``, or :func:`python_reference_text` when ``path`` is None."""
    if path is None:
        return python_reference_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    return path.read_text(encoding="utf-8")


def python_reference_documents() -> list[Document]:
    """The ``pydoc_data`` topics as documents ``(topic name, UTF-8 text)``, sorted by name."""
    from pydoc_data.topics import topics

    return [(name, topics[name].strip().encode()) for name in sorted(topics)]


def python_docs_documents(root: Path | None = None, fetch: bool = True) -> list[Document]:
    """The ``*.rst.txt`` sources of Python's documentation (Debian ``python3.11-doc``) as
    ``(path relative to _sources, bytes)``, sorted by that path.

    ``root`` is the folder holding ``usr/share/doc/...``; by default the package's root from
    :func:`~subq.tasks.packages.debian_package_root` (installed, cached, or fetched when
    ``fetch``). Raises ``FileNotFoundError`` naming the package when it is unavailable.
    """
    if root is None:
        root = debian_package_root(PYTHON_DOCS_PACKAGE, PYTHON_DOCS_SOURCES, fetch=fetch,
                                   hint="pass your own text with --text PATH (or --text "
                                        f"{STDLIB_CORPUS} for the small standard-library "
                                        "corpus)")
    sources = Path(root) / PYTHON_DOCS_SOURCES
    files = sorted((f.relative_to(sources).as_posix(), f) for f in sources.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"no *.rst.txt files under {sources}")
    return [(name, f.read_bytes()) for name, f in files]


def split_file(name: str, data: bytes, chunk_bytes: int = CHUNK_BYTES,
               min_chunks: int = MIN_CHUNKS) -> list[Document]:
    """One file's bytes cut at blank lines (at line ends when it has none) into documents of
    at least ``min(chunk_bytes, len(data) // min_chunks)`` bytes, named ``name#00000``, ...

    So a large file gives ~64 KB documents and a small one about ``min_chunks`` (20) of them,
    enough for a held-out split. The cut's blank line (or newline) is dropped.
    """
    joiner = b"\n\n" if b"\n\n" in data else b"\n"
    target = max(1, min(chunk_bytes, len(data) // min_chunks))
    chunks, current, size = [], [], 0
    for piece in data.split(joiner):
        current.append(piece)
        size += len(piece)
        if size >= target:
            chunks.append(joiner.join(current))
            current, size = [], 0
    if current:
        chunks.append(joiner.join(current))
    return [(f"{name}#{i:05d}", chunk) for i, chunk in enumerate(chunks)]


def documents_from_path(path: str | os.PathLike) -> list[Document]:
    """The user's text as documents.

    A folder: every ``*.txt``, ``*.rst`` and ``*.md`` file below it, one document each, named
    by its path relative to the folder and sorted by it. A single file: cut by
    :func:`split_file` into chunks. Empty files are skipped. Raises ``FileNotFoundError`` when
    nothing is there.
    """
    path = Path(path)
    if path.is_file():
        return split_file(path.name, path.read_bytes())
    if not path.is_dir():
        raise FileNotFoundError(f"no text file or folder at {path}")
    files = sorted((f.relative_to(path).as_posix(), f) for f in path.rglob("*")
                   if f.is_file() and f.suffix in TEXT_SUFFIXES)
    documents = [(name, f.read_bytes()) for name, f in files]
    documents = [(name, data) for name, data in documents if data]
    if not documents:
        raise FileNotFoundError(f"no non-empty *.txt, *.rst or *.md file under {path}")
    return documents


def name_bucket(name: str) -> int:
    """The document's stable bucket in ``[0, 100)``: ``crc32(UTF-8 name) mod 100``."""
    return zlib.crc32(name.encode()) % 100


def split_documents(documents: list[Document], valid_percent: int = 5
                    ) -> tuple[list[Document], list[Document]]:
    """``(train, valid)``: a document is held out when ``name_bucket(name) < valid_percent``,
    so a document keeps its side as the corpus grows. Each side gets at least one document:
    when one is empty, the document nearest the boundary (lowest bucket, then crc32, then name,
    for valid; highest for train) moves over. Order within each side is kept.
    """
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents for a held-out split, got {len(documents)}")
    if not 0 < valid_percent < 100:
        raise ValueError(f"valid_percent must be in (0, 100), got {valid_percent}")
    held = [name_bucket(name) < valid_percent for name, _ in documents]
    if all(held) or not any(held):
        order = sorted(range(len(documents)), key=lambda i: (
            name_bucket(documents[i][0]), zlib.crc32(documents[i][0].encode()), documents[i][0]))
        held[order[-1] if all(held) else order[0]] = not all(held)
    train = [doc for doc, h in zip(documents, held, strict=True) if not h]
    valid = [doc for doc, h in zip(documents, held, strict=True) if h]
    return train, valid


def join_documents(documents: list[Document]) -> torch.Tensor:
    """The documents' bytes joined by :data:`SEPARATOR`, as a uint8 tensor ``(N,)``."""
    blob = bytearray(SEPARATOR.join(data for _, data in documents))
    if not blob:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(blob, dtype=torch.uint8)


@dataclass(frozen=True)
class ByteCorpus:
    """A byte-level corpus split by document: ``train`` and ``valid`` are uint8 ``(N,)``, the
    documents of each side joined by one ``0x00`` byte (:data:`SEPARATOR`)."""

    train: torch.Tensor
    valid: torch.Tensor
    name: str
    train_documents: int
    valid_documents: int
    vocab_size: ClassVar[int] = 256

    @classmethod
    def from_documents(cls, documents: list[Document], name: str,
                       valid_percent: int = 5) -> ByteCorpus:
        """The corpus of ``documents`` split by :func:`split_documents`."""
        train, valid = split_documents(documents, valid_percent)
        return cls(join_documents(train), join_documents(valid), name, len(train), len(valid))


def _stdlib_corpus(valid_percent: int) -> ByteCorpus:
    return ByteCorpus.from_documents(python_reference_documents(), "pydoc_data.topics",
                                     valid_percent)


def load_corpus(text: str | os.PathLike | None = None, *, fetch: bool = True,
                fallback: bool = False, valid_percent: int = 5) -> ByteCorpus:
    """The byte corpus: the user's ``text`` (file or folder, :func:`documents_from_path`) when
    given (``"pydoc_data"``: the standard library's topics, about 0.5 MB), else Python's
    documentation (:func:`python_docs_documents`, fetched once when ``fetch``). When that is
    unavailable: with ``fallback`` the ``pydoc_data`` topics (:func:`python_reference_documents`)
    and a warning; without it the ``FileNotFoundError`` that names the package to install.
    """
    if text == STDLIB_CORPUS:
        return _stdlib_corpus(valid_percent)
    if text is not None:
        return ByteCorpus.from_documents(documents_from_path(text), str(text), valid_percent)
    try:
        documents = python_docs_documents(fetch=fetch)
    except FileNotFoundError as err:
        if not fallback:
            raise
        warnings.warn(f"{err} Using the smaller pydoc_data topics instead.", stacklevel=2)
        return _stdlib_corpus(valid_percent)
    return ByteCorpus.from_documents(documents, PYTHON_DOCS_PACKAGE, valid_percent)


def _check_bytes(data: torch.Tensor, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``data`` is a 1-D integer tensor (bytes, or token ids) of
    at least seq_len + 1 entries."""
    if data.dim() != 1 or data.dtype.is_floating_point or data.dtype.is_complex \
            or data.dtype == torch.bool:
        raise ValueError(f"data must be a 1-D tensor of bytes or token ids, got {data.dtype} "
                         f"{tuple(data.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if data.numel() < seq_len + 1:
        raise ValueError(f"data has {data.numel()} entries, fewer than seq_len + 1 = "
                         f"{seq_len + 1}")


def _windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` int64 ``(B, seq_len)``: ``data[o:o+seq_len]`` and one byte on."""
    index = offsets.to(data.device)[:, None] + torch.arange(seq_len + 1, device=data.device)
    window = data[index].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class WindowSampler:
    """Random training windows of ``seq_len`` bytes, stateless per step.

    The global batch of step ``s`` draws its window offsets uniformly from a generator seeded
    by ``(seed, s)`` alone, so a resumed run sees the same batches, and each data-parallel rank
    or gradient-accumulation micro-batch takes its rows ``[start, start + count)`` of it.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, seed: int) -> None:
        _check_bytes(data, seq_len)
        self.data, self.seq_len, self.seed = data, seq_len, seed

    def offsets(self, step: int, batch: int) -> torch.Tensor:
        """The ``batch`` window offsets ``(batch,)`` of step ``step``."""
        gen = seeded_generator(self.seed, step)
        return torch.randint(0, self.data.numel() - self.seq_len, (batch,), generator=gen)

    def batch(self, step: int, batch: int, *, start: int = 0, count: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, start + count)`` (default: to the end) of step ``step``'s global
        batch of ``batch`` windows: ``(inputs, targets)`` int64 ``(count, seq_len)``, targets
        the inputs shifted by one byte."""
        rows = batch_rows(batch, start, count)
        return _windows(self.data, self.offsets(step, batch)[rows], self.seq_len)


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_windows`` non-overlapping windows evenly spread over ``data`` (the first at
    0, the last ending at the last byte when several fit): ``(inputs, targets)`` int64
    ``(W, seq_len)``. Deterministic."""
    _check_bytes(data, seq_len)
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    count = min(max_windows, (data.numel() - 1) // seq_len)
    span = data.numel() - 1 - seq_len
    offsets = torch.arange(count) * span // max(count - 1, 1)
    return _windows(data, offsets, seq_len)


def bits_per_byte(mean_nll_nats: float) -> float:
    """Bits per byte from the mean negative log-likelihood per byte in nats: ``nats / ln 2``."""
    return mean_nll_nats / math.log(2)


def tokenize_split(data: torch.Tensor, tokenizer) -> torch.Tensor:
    """A split of a :class:`ByteCorpus` (documents joined by :data:`SEPARATOR`) as the token
    ids ``(N,)`` int32 of a Hugging Face ``tokenizer``, one document after another with the
    tokenizer's end-of-sequence id between them (bytes that are not UTF-8 are replaced)."""
    documents = [d.decode("utf-8", "replace")
                 for d in bytes(data.numpy()).split(SEPARATOR) if d]
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, document in enumerate(encoded):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(document)
    return torch.tensor(ids, dtype=torch.int32)
