"""Features of a request for the output-length model: hashed n-grams of its text plus a few
numbers, as a sparse vector (sorted unique indices, values) in a space of 2**bits.

Why these: what a request asks for ("write a story", "answer in one word", "summarise",
code fences) is in the words of its last user message, above all the first and last
few; how long the prompt is and whether generation is greedy or has stop strings are
the numbers. Hashing keeps the vocabulary open (learned online, no dictionary to ship)
and the cost per request at ~0.1-0.3 ms: long texts are read only at their head and tail,
which is where instructions sit.

The hash is crc32, not Python's `hash` (salted per process), so a saved model means the
same thing in every process.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np

from shuffleinfer.scheduler.prediction import PredictorInput

_WORD = re.compile(r"\w+|[^\w\s]")
HEAD_WORDS = 192
"""Words read from the start of a long prompt text."""
TAIL_WORDS = 64
"""Words read from its end."""
_HEAD_CHARS = 8 * HEAD_WORDS
_TAIL_CHARS = 8 * TAIL_WORDS
"""Characters searched for the head and tail words (so a long text costs no more than a
short one)."""
EDGE_WORDS = 4
"""Words at each end that also get position-specific features ("starts with 'write'")."""
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)


@dataclass(frozen=True)
class Features:
    """A sparse feature vector: `values[i]` at index `indices[i]` (unique, sorted)."""

    indices: np.ndarray
    """int64 indices into a space of 2**bits."""
    values: np.ndarray
    """float32 values, one per index."""


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _words(text: str) -> list[str]:
    if len(text) > _HEAD_CHARS + _TAIL_CHARS:
        head = _WORD.findall(text[:_HEAD_CHARS].lower())[:HEAD_WORDS]
        return head + _WORD.findall(text[-_TAIL_CHARS:].lower())[-TAIL_WORDS:]
    words = _WORD.findall(text.lower())
    if len(words) > HEAD_WORDS + TAIL_WORDS:
        words = words[:HEAD_WORDS] + words[-TAIL_WORDS:]
    return words


def _log_bin(value: float) -> int:
    return int(math.log2(value + 1.0))


def featurize(request: PredictorInput, bits: int) -> Features:
    """The sparse features of `request` in a space of 2**bits (bits in [8, 24])."""
    if not 8 <= bits <= 24:
        raise ValueError(f"bits must be in [8, 24], got {bits}")
    words = _words(request.prompt_text)
    hashes = np.fromiter((_crc(w) for w in words), dtype=np.uint64, count=len(words))
    grams = [hashes, hashes[:-1] * _MIX ^ hashes[1:],
             (hashes[:-2] * _MIX ^ hashes[1:-1]) * _MIX2 ^ hashes[2:]]
    edges = [_crc(f"^{i}:{w}") for i, w in enumerate(words[:EDGE_WORDS])]
    edges += [_crc(f"${i}:{w}") for i, w in enumerate(reversed(words[-EDGE_WORDS:]))]
    text_keys = np.concatenate(grams + [np.asarray(edges, dtype=np.uint64)])
    text_weight = 1.0 / math.sqrt(max(len(text_keys), 1))

    n = request.num_prompt_tokens
    named = {
        "bias": 1.0,
        "log_prompt_tokens": math.log1p(n) / 8.0,
        "log_text_chars": math.log1p(len(request.prompt_text)) / 10.0,
        "log_max_tokens": math.log1p(request.max_tokens) / 8.0,
        "temperature": min(request.temperature, 2.0),
        f"prompt_tokens_bin:{_log_bin(n)}": 1.0,
        f"text_words_bin:{_log_bin(len(words))}": 1.0,
        f"max_tokens_bin:{_log_bin(request.max_tokens)}": 1.0,
        f"chat:{request.is_chat}": 1.0,
        f"stop:{request.has_stop}": 1.0,
        f"greedy:{request.temperature == 0.0}": 1.0,
        f"empty_text:{not words}": 1.0,
    }
    named_keys = np.fromiter((_crc(k) for k in named), dtype=np.uint64, count=len(named))
    named_values = np.fromiter(named.values(), dtype=np.float32, count=len(named))
    # Named features live in their own hash stream so a word cannot collide with "bias" by
    # construction (only by the modulo, like any two features).
    keys = np.concatenate([text_keys, named_keys * _MIX2])
    values = np.concatenate([np.full(len(text_keys), text_weight, dtype=np.float32),
                             named_values])
    raw = (keys % np.uint64(1 << bits)).astype(np.int64)
    indices, inverse = np.unique(raw, return_inverse=True)
    summed = np.bincount(inverse, weights=values, minlength=len(indices)).astype(np.float32)
    return Features(indices=indices, values=summed)
