"""Prompts in the mixed-task format (../shared/data/prompts/mixed_tasks.jsonl.gz) and the
deterministic choice of which of them to label or evaluate on.

Each line is a JSON object with at least `id`, `prompt_id`, `task` and `messages` (OpenAI
chat format); `response` (a reference answer by another writer) is optional.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "SHUFFLEINFER_DATA_DIR"
TASKS = ("chat", "coding", "math", "summarization", "creative_writing", "qa")
"""The six tasks of the mixed-task prompts."""


def default_data_dir() -> Path:
    """`$SHUFFLEINFER_DATA_DIR`, else `../shared/data` beside the repository root."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_prompts_file() -> Path:
    """The mixed-task prompts file in the default data folder."""
    return default_data_dir() / "prompts" / "mixed_tasks.jsonl.gz"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of the data file."""

    id: str
    prompt_id: str
    """Identity of the prompt text; several ids may share one (different references)."""
    task: str
    messages: tuple[dict[str, str], ...]
    response: str = ""
    """The reference answer, if the file has one (not the served model's answer)."""

    @property
    def last_user_text(self) -> str:
        """Content of the last user message (what the predictor reads as prompt text)."""
        return last_user_text(self.messages)


def last_user_text(messages: Iterable[dict[str, Any]]) -> str:
    """Content of the last message with role "user" ("" if there is none)."""
    text = ""
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
    return text


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" \
        else open(path, encoding="utf-8")


def iter_prompts(path: Path) -> Iterator[PromptRecord]:
    """The records of a JSONL (optionally gzipped) prompts file, in file order.

    Raises FileNotFoundError for a missing file and ValueError naming the line for a line
    that is not a JSON object with id, prompt_id, task and a non-empty messages list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                record = PromptRecord(
                    id=str(obj["id"]), prompt_id=str(obj["prompt_id"]), task=str(obj["task"]),
                    messages=tuple(obj["messages"]), response=str(obj.get("response") or ""))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a prompt record ({e})") from None
            if not record.messages:
                raise ValueError(f"{path}:{line_no}: prompt {record.id} has no messages")
            yield record


def read_prompts(path: Path) -> list[PromptRecord]:
    """All records of a prompts file (see `iter_prompts`)."""
    return list(iter_prompts(path))


def stable_hash(text: str, seed: int = 0) -> int:
    """A 64-bit hash of `text` that is the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def select_prompts(records: Sequence[PromptRecord], limit: int | None,
                   seed: int = 0) -> list[PromptRecord]:
    """Distinct prompts (one record per prompt_id, the first) spread over the tasks.

    With `limit`, each task gets an equal share (a task with too few prompts gives its
    surplus to the others), the prompts of a task being those ranked first by a seeded
    hash of their id. The result is in seeded-hash order, so tasks are interleaved.
    A smaller limit picks a subset of what a larger one picks with the same seed, so a
    labelling run can grow without redoing work.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    seen: set[str] = set()
    by_task: dict[str, list[PromptRecord]] = defaultdict(list)
    for record in records:
        if record.prompt_id not in seen:
            seen.add(record.prompt_id)
            by_task[record.task].append(record)
    for task_records in by_task.values():
        task_records.sort(key=lambda r: stable_hash(r.id, seed))
    if limit is None:
        chosen = [r for task_records in by_task.values() for r in task_records]
    else:
        quota = _equal_shares({task: len(rs) for task, rs in by_task.items()}, limit)
        chosen = [r for task, rs in by_task.items() for r in rs[:quota[task]]]
    chosen.sort(key=lambda r: stable_hash(r.id, seed))
    return chosen


def _equal_shares(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` equally over the keys, capped by what each has (water-filling)."""
    share = {key: 0 for key in available}
    left = min(total, sum(available.values()))
    while left > 0:
        open_keys = sorted(k for k in available if share[k] < available[k])
        each, extra = divmod(left, len(open_keys))
        for i, key in enumerate(open_keys):
            give = min(each + (1 if i < extra else 0), available[key] - share[key])
            share[key] += give
            left -= give
    return share
