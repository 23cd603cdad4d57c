"""Timing prefill steps on vLLM's offline engine, for `shuffleinfer calibrate`.

One measurement: a prompt of B random token ids with `max_tokens=1`, submitted alone to an
engine whose `max_num_batched_tokens` is at least B, runs as exactly one engine step
that prefills B tokens and samples the one token. A single request cannot be split across
steps by arriving late, which several prompts summing to B could be. Fresh random ids
every run (and prefix caching off) keep any run from reusing another's KV.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from tqdm import tqdm


class PrefillTimer:
    """vLLM's offline engine over one model, timing single prefill steps."""

    def __init__(self, model_path: str, *, dtype: str, max_num_batched_tokens: int,
                 seed: int, engine_args: dict[str, Any]) -> None:
        import numpy as np
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed,  # type: ignore[arg-type]
                       **engine_args, enable_prefix_caching=False, enable_chunked_prefill=True,
                       max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_num_batched_tokens + 1)  # + the one output token
        self.engine = self.llm.llm_engine
        self.vocab_size = int(self.engine.model_config.get_vocab_size())
        self.rng = np.random.default_rng(seed)
        self.num_requests = 0

    def time_prefill(self, num_tokens: int) -> float:
        """Seconds from submitting a prompt of `num_tokens` random ids to its first (and
        only) token: one engine step prefilling exactly `num_tokens` tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=self.rng.integers(
            0, self.vocab_size, size=num_tokens).tolist())
        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
        self.num_requests += 1
        started_at = time.perf_counter()
        self.engine.add_request(f"calibrate-{self.num_requests}", prompt, params)
        while not any(output.finished for output in self.engine.step()):
            pass
        return time.perf_counter() - started_at


def measure(timer: PrefillTimer, sizes: tuple[int, ...], repeats: int) -> list[float]:
    """Median seconds per size, each after one untimed warm-up run of that size."""
    medians = []
    with tqdm(total=len(sizes) * (repeats + 1), desc="calibrating", unit="step") as bar:
        for size in sizes:
            bar.set_postfix(tokens=size)
            timer.time_prefill(size)
            bar.update(1)
            runs = []
            for _ in range(repeats):
                runs.append(timer.time_prefill(size))
                bar.update(1)
            medians.append(statistics.median(runs))
    return medians
