"""What the reasoning and tool-call parsers share: streamed text is split the way the whole text
would be, holding back a tail that may still become a marker; and a parser named by a flag."""
from __future__ import annotations

from typing import Optional


def partial_tag_len(text: str, tag: str) -> int:
    """How many of `text`'s last characters could be the start of `tag` (held back while
    streaming, until the next text tells)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def check_name(name: Optional[str], parsers: tuple[str, ...], what: str) -> Optional[str]:
    if name is not None and name not in parsers:
        raise ValueError(f"{what} must be one of {', '.join(parsers)}, got {name!r}")
    return name
