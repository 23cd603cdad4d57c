"""The labels file: one CSV row per labelled prompt, lengths and ids only (no texts).

Columns: id, prompt_id, task, prompt_tokens, greedy_output_tokens, greedy_finish_reason,
sampled_output_tokens, sampled_finish_reason. A prompt that was not run (e.g. too long)
has empty output columns and its reason in both finish-reason columns, so that a resumed
run skips it too. Rows are appended in batches and flushed to disk; a row cut short by a
killed run is dropped when the file is next appended to or read.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Literal

Target = Literal["greedy", "sampled"]
"""Which output length of a label is the target: greedy (temperature 0) or sampled (0.7)."""


@dataclass(frozen=True)
class LabelRow:
    """The served model's output lengths for one prompt."""

    id: str
    prompt_id: str
    task: str
    prompt_tokens: int
    greedy_output_tokens: int | None
    greedy_finish_reason: str
    sampled_output_tokens: int | None
    sampled_finish_reason: str

    def output_tokens(self, target: Target) -> int | None:
        """The length of the `target` sampling, or None if the prompt was skipped."""
        return self.greedy_output_tokens if target == "greedy" else self.sampled_output_tokens

    def finish_reason(self, target: Target) -> str:
        """Why the `target` sampling stopped ("stop", "length", or why it was skipped)."""
        return self.greedy_finish_reason if target == "greedy" else self.sampled_finish_reason


COLUMNS = tuple(f.name for f in fields(LabelRow))


def _optional_int(text: str, column: str, where: str) -> int | None:
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{where}: {column} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{where}: {column} must be >= 0, got {value}")
    return value


def _complete_text(path: Path) -> str:
    """The file's text up to its last newline (a torn last row is left out)."""
    text = path.read_text(encoding="utf-8")
    return text[: text.rfind("\n") + 1]


def read_labels(path: Path) -> list[LabelRow]:
    """The rows of a labels file in file order.

    Raises FileNotFoundError if it is missing and ValueError naming the line for a wrong
    header or a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    reader = csv.reader(io.StringIO(_complete_text(path)))
    header = next(reader, None)
    if header is None:
        return []
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path}: header must be {','.join(COLUMNS)}, got {','.join(header)}")
    rows = []
    for line_no, values in enumerate(reader, start=2):
        where = f"{path}:{line_no}"
        if len(values) != len(COLUMNS):
            raise ValueError(f"{where}: expected {len(COLUMNS)} columns, got {len(values)}")
        prompt_tokens = _optional_int(values[3], "prompt_tokens", where)
        if prompt_tokens is None:
            raise ValueError(f"{where}: prompt_tokens is empty")
        rows.append(LabelRow(
            id=values[0], prompt_id=values[1], task=values[2], prompt_tokens=prompt_tokens,
            greedy_output_tokens=_optional_int(values[4], "greedy_output_tokens", where),
            greedy_finish_reason=values[5],
            sampled_output_tokens=_optional_int(values[6], "sampled_output_tokens", where),
            sampled_finish_reason=values[7]))
    return rows


def labelled_ids(path: Path) -> set[str]:
    """Ids already in the labels file (empty if it does not exist yet)."""
    return {row.id for row in read_labels(path)} if Path(path).is_file() else set()


def append_labels(path: Path, rows: Sequence[LabelRow]) -> None:
    """Append rows (writing the header first if the file is new or empty) and flush them
    to disk. A torn last row left by a killed run is cut off first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    complete = existing[: existing.rfind("\n") + 1]
    if complete != existing:
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(complete.encode("utf-8")))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not complete:
        writer.writerow(COLUMNS)
    writer.writerows(_csv_values(row) for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _csv_values(row: LabelRow) -> Iterable[object]:
    return ["" if value is None else value for value in astuple(row)]


def describe(rows: Sequence[LabelRow], target: Target) -> str:
    """One line on the `target` lengths: count, median, p90, share cut at max_tokens."""
    lengths = sorted(n for r in rows if (n := r.output_tokens(target)) is not None)
    if not lengths:
        return f"{target}: no labels"
    cut = sum(r.finish_reason(target) == "length" for r in rows)
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    return (f"{target}: {len(lengths)} labels, median {statistics.median(lengths):.0f}, "
            f"p90 {p90}, {100 * cut / len(lengths):.0f}% cut at max_tokens")
