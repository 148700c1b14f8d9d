"""Headings of a Markdown file and the anchors GitHub gives them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

_HEADING_RE: Final = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_NOT_ANCHOR_RE: Final = re.compile(r"[^\w\- ]", re.UNICODE)


def github_anchor(heading: str) -> str:
    """The anchor GitHub derives from a heading text (before de-duplication).

    Lower case; punctuation other than hyphens and underscores removed;
    each space becomes a hyphen. Inline code ticks and emphasis vanish
    with the punctuation.
    """
    return _NOT_ANCHOR_RE.sub("", heading.strip().lower()).replace(" ", "-")


def _scan(markdown: str) -> Iterator[tuple[str, re.Match[str] | None]]:
    """Each line with its heading match; lines in fenced code blocks never match."""
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            yield line, None
        else:
            yield line, None if fenced else _HEADING_RE.match(line)


def headings(markdown: str) -> list[str]:
    """The text of every ATX heading outside fenced code blocks."""
    return [match.group(2) for _, match in _scan(markdown) if match]


def anchors(markdown: str) -> set[str]:
    """Every anchor of the document, with GitHub's ``-1``, ``-2`` suffixes for repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for heading in headings(markdown):
        base = github_anchor(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level: int | None = None
    body: list[str] = []
    for line, match in _scan(markdown):
        if level is None:
            if match and match.group(2) == heading:
                level = len(match.group(1))
        elif match and len(match.group(1)) <= level:
            break
        else:
            body.append(line)
    if level is None:
        raise KeyError(f"no heading {heading!r}")
    return "\n".join(body)
