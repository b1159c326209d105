"""The library's error and the helpers that keep every message one line naming the problem and the fix."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model; the message is one line."""


def preview_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys and how many more, for a one-line message."""
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` for embedding an exception in a one-line error, cut between words."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit - 3].rsplit(" ", 1)[0] if " " in line[:limit - 3] else line[:limit - 3]
    return cut.rstrip(" ,;:(") + "..."
