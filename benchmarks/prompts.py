"""Prompts of an exact token length, cut from real text, for replaying a trace.

A trace says how long each prompt is, not what it says. `PromptBuilder` turns a
`TraceRequest` into text that the served model's tokenizer counts as exactly
`prompt_tokens` tokens the way /v1/completions does (`tokenizer.encode(prompt)`, special
tokens included), cut from a pool of real prompts and answers:

- every request gets its own text: it starts with its own text from a seeded
  permutation of the pool texts whose first `CACHE_BLOCK_TOKENS` tokens are distinct,
  so a server's prefix cache gets no help the trace did not ask for;
- Mooncake prefix blocks are the exception: each block id stands for one fixed text of
  `block_tokens` tokens ending in a newline, and a prompt starts with the texts of its
  block ids in order, so requests that share hash ids share a real token prefix. The
  newline ends a pre-token, so a block's tokens do not depend on what follows it.

Decoding and re-encoding can change a count, so every piece is cut, re-encoded and
re-cut until it has the length asked for, and the whole prompt is checked at the end.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.records import TraceRequest

PROMPTS_FILE = Path("prompts") / "mixed_tasks.jsonl.gz"
"""The mixed-task prompt file, relative to the data folder."""

MIN_BLOCK_TOKENS = 8
"""Prefix blocks shorter than this cannot end in a newline and still hold real text."""

CACHE_BLOCK_TOKENS = 16
"""Prefix-cache block of vLLM (its default): no two prompts share their first one."""

_OPENING_CHARS = 96  # enough text for CACHE_BLOCK_TOKENS tokens of ordinary prose
_SEPARATOR = "\n\n"  # between pool texts inside one piece of prompt text
_MAX_FIT_STEPS = 12  # re-cuts before a piece gives up (in practice 1-3 are needed)
# Whitespace runs count differently at the end of a text than inside it ("\n\n" is one
# token at the end, two before a word), and a Chinese character can be three tokens, so
# some texts have no start of the length asked for: then the first text is started a
# word later and other texts follow it.
_MAX_SOURCE_TRIES = 8
_NEARBY_CUTS = 3  # cuts tried on either side of the last one before trying another source


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt ready to send."""

    text: str
    num_tokens: int
    """Tokens of `text` as the served model's tokenizer counts them for /v1/completions."""


class PromptFitError(RuntimeError):
    """No cut of the real text gave the exact token count asked for."""


def load_texts(data_dir: Path, max_records: int = 4000, seed: int = 0) -> list[str]:
    """User messages and reference answers of `max_records` records of the prompt file.

    The file is ordered by source dataset, so records are sampled (seeded) over the whole
    file rather than taken from its head; that keeps every task in the mix and still loads
    in well under a second.
    """
    path = Path(data_dir) / PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist; pass the folder that "
                                f"holds {PROMPTS_FILE} as the data folder.")
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}.")
    with gzip.open(path, "rb") as f:
        lines = f.read().splitlines()
    picked = random.Random(seed).sample(range(len(lines)), min(max_records, len(lines)))
    texts: list[str] = []
    for line_no in sorted(picked):
        record = json.loads(lines[line_no])
        texts.extend(m["content"] for m in record["messages"] if m["role"] == "user")
        if record.get("response"):
            texts.append(record["response"])
    return texts


class PromptBuilder:
    """Builds prompts of exact token lengths from a pool of real texts.

    `tokenizer` is the served model's Hugging Face tokenizer (a fast one: cuts use its
    character offsets); `texts` is the pool.
    The same builder (same pool, same seed) gives the same prompt for the same request
    and index, so a replay can be repeated exactly.
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], seed: int = 0) -> None:
        pool = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        if not pool:
            raise ValueError("PromptBuilder needs at least one non-empty text in its pool.")
        if not getattr(tokenizer, "is_fast", False):
            # Cuts are placed with the character offsets only fast tokenizers report.
            raise ValueError(f"PromptBuilder needs a fast (Rust) tokenizer; got "
                             f"{type(tokenizer).__name__}.")
        self._tokenizer = tokenizer
        self._texts = pool
        self._seed = seed
        self._openers = self._distinct_openers(pool)
        random.Random(seed).shuffle(self._openers)
        self._num_special = len(tokenizer.encode(""))
        # Mooncake traces repeat block ids a lot; fitting a block once saves most of the work.
        self._block_text = functools.lru_cache(maxsize=4096)(self._make_block_text)

    @classmethod
    def from_data(
        cls, tokenizer_path_or_name: str, data_dir: Path, seed: int = 0, max_records: int = 4000
    ) -> PromptBuilder:
        """A builder over the real prompts in `data_dir` with the named model's tokenizer.

        `tokenizer_path_or_name` is what `--model` takes: an embedded model's name (prepared
        if needed), a Hugging Face id or a local path.
        """
        from transformers import AutoTokenizer

        from shuffleinfer.model import resolve_model

        texts = load_texts(data_dir, max_records, seed)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_path_or_name))
        return cls(tokenizer, texts, seed)

    def count(self, text: str) -> int:
        """Tokens of `text` as /v1/completions counts them (special tokens included)."""
        return len(self._tokenizer.encode(text, verbose=False))

    def _count_text(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens (a piece of a prompt)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def build(self, req: TraceRequest, index: int) -> BuiltPrompt:
        """A prompt of exactly `req.prompt_tokens` tokens for request number `index`.

        Raises `ValueError` if the request cannot be built (too few tokens for the
        tokenizer's special tokens, prefix blocks shorter than `MIN_BLOCK_TOKENS`), and
        `PromptFitError` if no text of the pool could be cut to the length (never seen
        with the real data and the default tokenizer).
        """
        target = req.prompt_tokens
        if target < self._num_special + 1:
            raise ValueError(f"Request {index}: prompt_tokens={target} is too short; this "
                             f"tokenizer adds {self._num_special} special token(s) and the "
                             "prompt needs at least one token of text.")
        if req.prefix_block_ids and req.block_tokens < MIN_BLOCK_TOKENS:
            raise ValueError(f"Request {index}: block_tokens={req.block_tokens} is below "
                             f"{MIN_BLOCK_TOKENS}; prefix blocks that short are not supported.")
        ids = req.prefix_block_ids
        pieces, remaining = self._prefix(req, target - self._num_special)
        if remaining == 0:
            text = "".join(pieces)
            if self.count(text) == target:
                return BuiltPrompt(text, target)
            # A join changed the count after all: let the last block absorb the difference.
            remaining = self._count_text(pieces.pop())
        # What follows the full blocks: a cut block (the start of the next block's text, as
        # in Mooncake, where the last hash id covers a partial block), else the request's own.
        tail_key = 2 * ids[len(pieces)] + 1 if len(pieces) < len(ids) else 2 * index
        head = "".join(pieces)
        for _ in range(_MAX_FIT_STEPS):
            text = head + self._fit_key(tail_key, remaining)
            num_tokens = self.count(text)
            if num_tokens == target:
                return BuiltPrompt(text, num_tokens)
            remaining += target - num_tokens
            if remaining < 1:
                break
        raise PromptFitError(f"Request {index}: could not build a prompt of exactly {target} "
                             f"tokens (last try: {num_tokens}).")

    def _prefix(self, req: TraceRequest, num_tokens: int) -> tuple[list[str], int]:
        """Texts of the full prefix blocks that fit in `num_tokens`, and the tokens left."""
        pieces: list[str] = []
        for position, block_id in enumerate(req.prefix_block_ids):
            # The first block gives room to the special tokens, so block edges stay at
            # multiples of block_tokens in the token ids the server sees.
            block_len = req.block_tokens - (self._num_special if position == 0 else 0)
            if block_len > num_tokens:
                break
            pieces.append(self._block_text(block_id, block_len))
            num_tokens -= block_len
        return pieces, num_tokens

    def _make_block_text(self, block_id: int, num_tokens: int) -> str:
        """The fixed text of a prefix block: `num_tokens` tokens, the last one a newline."""
        return self._fit_key(2 * block_id + 1, num_tokens, newline=True)

    def _fit_key(self, key: int, num_tokens: int, newline: bool = False) -> str:
        """`_fit` on the source text of `key`; if no cut fits, on the key's other sources."""
        error: PromptFitError | None = None
        for attempt in range(_MAX_SOURCE_TRIES):
            try:
                return self._fit(self._source(key, num_tokens, attempt), num_tokens, newline)
            except PromptFitError as e:
                error = e
        raise PromptFitError(f"No start of the pool text gives exactly {num_tokens} tokens "
                             f"(tried {_MAX_SOURCE_TRIES}).") from error

    def _source(self, key: int, num_tokens: int, attempt: int = 0) -> str:
        """Real text for `key` (even: a request's tail, odd: a prefix block), long enough.

        The first text is the key's own place in the seeded permutation of openers, so
        keys below their number never start alike; later rounds skip a few words of it.
        Later attempts (when no cut of a source fits) skip more and draw other texts.
        """
        rng = random.Random(f"{self._seed}:{key}:{attempt}")
        opener = self._openers[key % len(self._openers)]
        parts = [_skip_words(opener, key // len(self._openers) + attempt)]
        num_chars = len(parts[0])
        # ~4 characters per token in English; code and numbers run denser, never sparser
        # by much, and `_fit` asks for more text if this guess falls short.
        while num_chars < 5 * num_tokens + 64:
            parts.append(self._texts[rng.randrange(len(self._texts))])
            num_chars += len(parts[-1]) + len(_SEPARATOR)
        return _SEPARATOR.join(parts)

    def _distinct_openers(self, pool: list[str]) -> list[str]:
        """One text per distinct first cache block, to start prompts with.

        Many texts open with the same template ("Write a one-sentence TL;DR summary of
        this paper abstract.", `#include <iostream>`); started from them, prompts would
        share a cached prefix. Only the first text of each opening is kept here.
        """
        heads = self._tokenizer([text[:_OPENING_CHARS] for text in pool],
                                add_special_tokens=False, verbose=False)["input_ids"]
        by_opening: dict[tuple[int, ...], str] = {}
        for text, ids in zip(pool, heads, strict=True):
            by_opening.setdefault(tuple(ids[:CACHE_BLOCK_TOKENS]), text)
        return list(by_opening.values())

    def _fit(self, source: str, num_tokens: int, newline: bool = False) -> str:
        """A start of `source` (plus a newline if asked) of exactly `num_tokens` tokens.

        Counted without special tokens. Cuts at token edges of `source`, re-encodes, and
        moves the cut by the difference until the count is exact.
        """
        if num_tokens <= 0:
            return ""
        suffix = "\n" if newline else ""
        ends = self._token_ends(source)
        while len(ends) < num_tokens + 1:  # the source guess fell short: add text
            source += _SEPARATOR + source
            ends = self._token_ends(source)
        take = num_tokens - (1 if newline else 0)
        tried: dict[int, int] = {}
        for _ in range(_MAX_FIT_STEPS):
            take = max(0, min(take, len(ends)))
            if take in tried:
                break
            text = self._cut(source, ends, take, newline) + suffix
            tried[take] = self._count_text(text)
            if tried[take] == num_tokens:
                return text
            take += num_tokens - tried[take]
        # Cutting moved the count by more than one token somewhere (a merge at the cut or a
        # whitespace run); look around for a cut that lands exactly.
        for delta in range(1, _NEARBY_CUTS + 1):
            for candidate in (take - delta, take + delta):
                if 0 <= candidate <= len(ends) and candidate not in tried:
                    text = self._cut(source, ends, candidate, newline) + suffix
                    if self._count_text(text) == num_tokens:
                        return text
        raise PromptFitError(f"No cut of the pool text gives exactly {num_tokens} tokens.")

    def _token_ends(self, source: str) -> list[int]:
        """Character offset where each token of `source` ends."""
        enc = self._tokenizer(source, add_special_tokens=False, return_offsets_mapping=True,
                              verbose=False)
        return [end for _, end in enc["offset_mapping"]]

    @staticmethod
    def _cut(source: str, ends: list[int], take: int, newline: bool) -> str:
        """`source` up to the end of its `take`-th token; before a newline, no trailing space."""
        text = source[: ends[take - 1]] if take > 0 else ""
        return text.rstrip() if newline else text


def _skip_words(text: str, num_words: int) -> str:
    """`text` without its first `num_words` words.

    Characters instead if it has too few spaces (Chinese text, where one character is
    often several tokens, or a one-word answer); all of it if it is shorter still.
    """
    if num_words <= 0:
        return text
    parts = text.split(" ", num_words)
    rest = parts[-1] if len(parts) > num_words else text[num_words:]
    return rest.lstrip() or text
