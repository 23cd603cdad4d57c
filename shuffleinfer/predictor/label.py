"""Labelling: run the served model over prompts and record its output lengths.

The life of one `label_prompts` run:
1. ids already in the labels file are dropped (a run resumes where the last one stopped);
2. each remaining prompt is tokenised with the chat template; one longer than
   `max_prompt_tokens` gets a row saying why (written at once), and no generation;
3. the others stream through the engine, which keeps `max_in_flight` prompts running
   (continuous batching: a finished prompt's place is taken at once, so long outputs do
   not leave the batch half empty); both samplings of a prompt (greedy, and temperature
   0.7) are submitted together so the prefix cache computes the prompt once. The sampled
   column draws from the engine's seeded generator, not from a per-request seed: vLLM
   0.32's CPU runner crashes ("CPU Generator does not use offset") when a request with
   its own seed has its prompt prefilled in more than one chunk;
4. rows are appended in the order prompts finish, `flush_every` at a time, each append
   flushed to disk: a killed run loses at most the unflushed and running prompts.

The engine is injected (a factory of `LabelEngine`, called only if something is left to
label): `VllmLabelEngine` drives vLLM's offline engine; tests pass a fake.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shuffleinfer.predictor.data import PromptRecord
from shuffleinfer.predictor.labels import LabelRow, append_labels, labelled_ids

SAMPLED_TEMPERATURE = 0.7
"""Temperature of the second, sampled column."""
SKIPPED_TOO_LONG = "skipped_prompt_too_long"
"""Finish reason recorded for a prompt longer than max_prompt_tokens."""


@dataclass(frozen=True)
class Completion:
    """One generation's result."""

    num_output_tokens: int
    finish_reason: str
    """"stop" (end of sequence) or "length" (hit max_tokens), as vLLM reports it."""


@dataclass(frozen=True)
class LabelJob:
    """One prompt to run twice (greedy and sampled)."""

    key: int
    token_ids: list[int]


class LabelEngine(ABC):
    """Tokenises prompts and generates from them."""

    @abstractmethod
    def tokenize(self, record: PromptRecord) -> list[int]:
        """The prompt's token ids, chat template applied (generation prompt added)."""

    @abstractmethod
    def stream(self, jobs: Iterable[LabelJob]) -> Iterator[tuple[int, Completion, Completion]]:
        """Run every job; yield (key, greedy, sampled) as each job's two generations have
        finished, in the order they finish."""


@dataclass(frozen=True)
class LabelSummary:
    """What a labelling run did."""

    num_selected: int
    num_already_labelled: int
    num_labelled: int
    num_skipped: int
    labelling_s: float = 0.0
    """Time spent tokenising and generating (engine start excluded)."""

    @property
    def prompts_per_s(self) -> float:
        """Labelling throughput of this run (skipped prompts count)."""
        done = self.num_labelled + self.num_skipped
        return done / self.labelling_s if self.labelling_s > 0 else 0.0


def _row(record: PromptRecord, num_prompt_tokens: int, greedy: Completion | None,
         sampled: Completion | None) -> LabelRow:
    return LabelRow(
        id=record.id, prompt_id=record.prompt_id, task=record.task,
        prompt_tokens=num_prompt_tokens,
        greedy_output_tokens=greedy.num_output_tokens if greedy else None,
        greedy_finish_reason=greedy.finish_reason if greedy else SKIPPED_TOO_LONG,
        sampled_output_tokens=sampled.num_output_tokens if sampled else None,
        sampled_finish_reason=sampled.finish_reason if sampled else SKIPPED_TOO_LONG)


def label_prompts(records: Sequence[PromptRecord], out: Path,
                  make_engine: Callable[[], LabelEngine], *, max_prompt_tokens: int,
                  flush_every: int = 16, progress: bool = True) -> LabelSummary:
    """Label the records not yet in `out`, appending rows as they finish (see module).

    `make_engine` is called once, and only if some record is left to label.
    Raises ValueError for a flush_every or max_prompt_tokens below 1.
    """
    if flush_every < 1:
        raise ValueError(f"flush_every must be >= 1, got {flush_every}")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    done = labelled_ids(out)
    todo = [r for r in records if r.id not in done]
    if not todo:
        return LabelSummary(len(records), len(records), 0, 0)
    engine = make_engine()
    started_at = time.monotonic()
    token_ids = [engine.tokenize(r) for r in todo]
    skipped = [_row(r, len(ids), None, None)
               for r, ids in zip(todo, token_ids, strict=True) if len(ids) > max_prompt_tokens]
    append_labels(out, skipped)
    jobs = [LabelJob(key, ids) for key, ids in enumerate(token_ids)
            if len(ids) <= max_prompt_tokens]
    pending: list[LabelRow] = []
    with tqdm(total=len(todo), initial=len(skipped), desc="labelling", unit="prompt",
              disable=not progress) as bar:
        for key, greedy, sampled in engine.stream(jobs):
            pending.append(_row(todo[key], len(token_ids[key]), greedy, sampled))
            bar.update(1)
            if len(pending) >= flush_every:
                append_labels(out, pending)
                pending.clear()
        append_labels(out, pending)
    return LabelSummary(len(records), len(records) - len(todo), len(jobs), len(skipped),
                        time.monotonic() - started_at)


def set_cpu_engine_env(num_threads_bind: str = "0-1", kv_cache_gib: int = 4) -> None:
    """Default vLLM's CPU-backend settings when unset (KV cache size, cores to bind)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", num_threads_bind)


def resolve_dtype(dtype: str) -> str:
    """`auto` as `serve` resolves it: float32 on CPU (vLLM's CPU backend runs bfloat16
    slower than float32 on CPUs without AVX512-BF16/AMX), the model's own on GPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


LABEL_OWNS = ("dtype", "enable_prefix_caching", "max_model_len", "model", "seed")
"""Engine arguments the labeller sets itself (from its own flags)."""


class VllmLabelEngine(LabelEngine):
    """vLLM's offline engine (`LLM`) over a model, prefix caching on, fed continuously."""

    def __init__(self, model: str, *, max_tokens: int, max_prompt_tokens: int,
                 max_in_flight: int = 64, dtype: str = "auto", seed: int = 0,
                 engine_args: dict[str, Any] | None = None) -> None:
        from vllm import LLM

        dtype = resolve_dtype(dtype)
        self.max_tokens = max_tokens
        self.max_in_flight = max_in_flight
        self.llm = LLM(model=model, dtype=dtype, seed=seed,  # type: ignore[arg-type]
                       enable_prefix_caching=True, max_model_len=max_prompt_tokens + max_tokens,
                       **(engine_args or {}))
        self.tokenizer = self.llm.get_tokenizer()

    def tokenize(self, record: PromptRecord) -> list[int]:
        """Chat template with the generation prompt, then tokenised without extra
        special tokens (the template already has them)."""
        text = self.tokenizer.apply_chat_template(list(record.messages), tokenize=False,
                                                  add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"chat template returned {type(text)}, expected text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stream(self, jobs: Iterable[LabelJob]) -> Iterator[tuple[int, Completion, Completion]]:
        """Keep up to `max_in_flight` jobs in the engine; step it; yield finished jobs."""
        from vllm import RequestOutput, SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        greedy = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        sampled = SamplingParams(temperature=SAMPLED_TEMPERATURE, max_tokens=self.max_tokens)
        waiting = iter(jobs)
        finished: dict[int, dict[str, Completion]] = {}
        in_flight = 0
        while True:
            while in_flight < self.max_in_flight and (job := next(waiting, None)) is not None:
                for kind, params in (("greedy", greedy), ("sampled", sampled)):
                    engine.add_request(f"{job.key}:{kind}",
                                       TokensPrompt(prompt_token_ids=job.token_ids), params)
                in_flight += 1
            if in_flight == 0:
                return
            for output in engine.step():
                if not output.finished or not isinstance(output, RequestOutput):
                    continue
                key, kind = output.request_id.split(":")
                result = output.outputs[0]
                both = finished.setdefault(int(key), {})
                both[kind] = Completion(len(result.token_ids), str(result.finish_reason))
                if len(both) == 2:
                    del finished[int(key)]
                    in_flight -= 1
                    yield int(key), both["greedy"], both["sampled"]
