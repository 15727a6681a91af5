"""Generated sections of hand-written docs pages: the prose stays, the text between a pair of
HTML-comment markers is replaced by each new report."""

from __future__ import annotations

from pathlib import Path


def write_section(page: Path, markers: tuple[str, str], text: str) -> Path:
    """Replace what lies between ``markers`` in ``page`` by ``text`` (the markers are appended
    first when the page, or the page itself, does not have them yet); returns ``page``."""
    content = page.read_text() if page.exists() else ""
    if markers[0] not in content:
        content += ("\n" if content else "") + "\n".join(markers) + "\n"
    start, end = content.index(markers[0]), content.index(markers[1])
    page.write_text(content[:start + len(markers[0])] + "\n" + text + content[end:])
    return page
