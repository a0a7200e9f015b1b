"""Renaming keys through (theirs, ours) template tables: {i} = layer index, {p} = weight|bias."""

import functools
import re


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{pattern}$")


def rename(key: str, table, reverse: bool = False) -> str | None:
    """Map one key through a (theirs, ours) table; None when no rule matches."""
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        m = _compile(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None
