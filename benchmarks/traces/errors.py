"""The one error every trace reader raises on input it cannot use."""

from __future__ import annotations

from pathlib import Path


class TraceError(ValueError):
    """A trace file is unreadable or malformed.

    The message names the file, the line (1-based, the header is line 1) where there is
    one, and the reason, e.g. ``traces/a.csv:3: ContextTokens is not a whole number: 'x'``.
    """

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")
