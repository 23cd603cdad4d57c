"""Timing engine steps on vLLM's offline engine, for `shuffleinfer calibrate --profile`.

The engine's core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
`LLMEngine.step()` is exactly one engine step (schedule, run the model, update) and timing
the call times the step; not a busy loop in another process whose outputs `step()` only
collects. What the step did is read off the scheduler's own output (`SchedulerOutput`:
which requests, how many tokens each, how many each had computed before), turned into a
`StepShape` by `step_plan.step_shape`. Prompts are fresh random token ids and prefix
caching is off, so no run reuses another's KV.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from shuffleinfer.engine.step_plan import ProfilePlan, ScheduledRequest, StepShape, step_shape


class ProfileError(RuntimeError):
    """The engine did not run the steps the profile needs."""


class RunsSteps(Protocol):
    """What `measure` needs of an engine (`StepTimer`; a fake in tests)."""

    def run(self, prompt_lens: Sequence[int], max_tokens: int) -> list[tuple[StepShape, float]]:
        """Submit prompts of `prompt_lens` tokens together and step until all have made
        `max_tokens`; every step's shape and seconds."""
        ...


class StepTimer:
    """vLLM's offline engine in this process, timing each step and reading its shape off
    the scheduler."""

    def __init__(self, model_path: str, *, dtype: str, plan: ProfilePlan, seed: int,
                 engine_args: dict[str, Any]) -> None:
        import numpy as np

        # Before the engine exists: its core runs here, not as a busy loop in another
        # process whose outputs step() would only collect.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.v1.engine.core_client import InprocClient

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed,  # type: ignore[arg-type]
                       **engine_args, enable_prefix_caching=False, enable_chunked_prefill=True,
                       max_num_batched_tokens=plan.budget, max_model_len=plan.max_model_len)
        self.engine = self.llm.llm_engine
        client = self.engine.engine_core
        if not isinstance(client, InprocClient):
            raise ProfileError(f"the engine core runs elsewhere ({type(client).__name__}); "
                               "step() would not be one step")
        scheduler = client.engine_core.scheduler
        schedule = scheduler.schedule
        self._scheduled: list[Any] = []

        def recording_schedule(*args: Any, **kwargs: Any) -> Any:
            output = schedule(*args, **kwargs)
            self._scheduled.append(output)
            return output

        # The scheduler's own output is the only record of how a step was split.
        scheduler.schedule = recording_schedule  # type: ignore[method-assign]
        self._prompt_lens: dict[str, int] = {}
        self.vocab_size = int(self.engine.model_config.get_vocab_size())
        self.rng = np.random.default_rng(seed)
        self.num_requests = 0

    def run(self, prompt_lens: Sequence[int], max_tokens: int) -> list[tuple[StepShape, float]]:
        """Submit prompts of `prompt_lens` random token ids together and step until all
        have made `max_tokens`; every step's shape and seconds."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        for n in prompt_lens:
            self.num_requests += 1
            ids = self.rng.integers(0, self.vocab_size, size=n).tolist()
            self.engine.add_request(f"profile-{self.num_requests}",
                                    TokensPrompt(prompt_token_ids=ids), params)
        steps = []
        while self.engine.has_unfinished_requests():
            self._scheduled.clear()
            started_at = time.perf_counter()
            self.engine.step()
            seconds = time.perf_counter() - started_at
            scheduled = [r for output in self._scheduled for r in self._requests(output)]
            if scheduled:
                steps.append((step_shape(scheduled), seconds))
        return steps

    def _requests(self, output: Any) -> list[ScheduledRequest]:
        """The requests of one `SchedulerOutput`, with their prompt lengths."""
        computed = {}
        for new in output.scheduled_new_reqs:
            self._prompt_lens[new.req_id] = len(new.prompt_token_ids)
            computed[new.req_id] = new.num_computed_tokens
        cached = output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id in output.finished_req_ids:
            self._prompt_lens.pop(req_id, None)
        return [ScheduledRequest(self._prompt_lens[req_id], computed[req_id], n)
                for req_id, n in output.num_scheduled_tokens.items()]
