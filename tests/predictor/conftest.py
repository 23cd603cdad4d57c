"""Helpers for the predictor tests: requests, and a stream whose output length follows
from its words (so a learner can learn it and a constant cannot)."""

from __future__ import annotations

import random

from shuffleinfer.scheduler.prediction import PredictorInput

KINDS = {
    "write a long story about": 420,
    "answer in one word:": 3,
    "summarise this text in two sentences:": 60,
    "write a python function that": 180,
}
"""Instruction -> the output length a request with it has (up to small noise)."""
TOPICS = ["dragons", "the sea", "taxes", "a lost key", "trains", "the moon", "bread",
          "an old friend", "winter", "robots", "music", "gardens"]


def request(text: str = "What is the capital of France?", max_tokens: int = 512,
            num_prompt_tokens: int | None = None) -> PredictorInput:
    """A chat request with `text` as its last user message."""
    return PredictorInput(num_prompt_tokens=num_prompt_tokens or 20 + len(text) // 4,
                          prompt_text=text, max_tokens=max_tokens, is_chat=True)


def learnable_stream(n: int, seed: int = 0,
                     max_tokens: int = 512) -> list[tuple[PredictorInput, int]]:
    """n (request, length) pairs: the length is set by the instruction, +/-10 tokens."""
    rng = random.Random(seed)
    stream = []
    for _ in range(n):
        instruction, length = rng.choice(list(KINDS.items()))
        text = f"{instruction} {rng.choice(TOPICS)} and {rng.choice(TOPICS)}"
        noisy = max(length + rng.randint(-10, 10), 0)
        stream.append((request(text, max_tokens), min(noisy, max_tokens)))
    return stream
