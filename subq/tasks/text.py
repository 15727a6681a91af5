"""Long English text for perplexity, from files every Python installation ships.

The default text is CPython's own reference prose: ``pydoc_data.topics`` holds the text of
the Python Language Reference sections that ``help()`` shows (about 465,000 characters, some
110,000 SmolLM2 tokens, English technical prose with code excerpts). It is part of the
standard library, so it is present offline on every machine; its licence is the Python
Software Foundation License (free to use and redistribute; not public domain). Topics are
joined in sorted order, so the text is the same for a given Python version.
"""

from __future__ import annotations

import os
from pathlib import Path


def python_reference_text() -> str:
    """The ``pydoc_data`` topics of this Python, sorted by topic name, blank-line separated."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def load_text(path: str | os.PathLike | None = None) -> str:
    """The UTF-8 text of ``path``, or :func:`python_reference_text` when ``path`` is None."""
    if path is None:
        return python_reference_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    return path.read_text(encoding="utf-8")
