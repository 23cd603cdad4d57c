"""Labelling: run the served model over prompts and record its output lengths.

The life of one `label_prompts` run:
1. ids already in the labels file are dropped (a run resumes where the last one stopped);
2. each remaining prompt is tokenised with the chat template; one longer than
   `max_prompt_tokens` gets a row saying why, and no generation;
3. the others go to the engine in batches of `batch_size` prompts, both samplings of a
   prompt (greedy and temperature 0.7 with a per-prompt seed) side by side in one batch
   so that the prefix cache computes the prompt once;
4. each batch's rows are appended to the labels file and flushed before the next batch.

The engine is injected (a factory of `LabelEngine`, called only if something is left to
label): `VllmLabelEngine` wraps vLLM's offline `LLM`; tests pass a fake.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from shuffleinfer.predictor.data import PromptRecord, stable_hash
from shuffleinfer.predictor.labels import LabelRow, append_labels, labelled_ids

log = logging.getLogger(__name__)

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


class LabelEngine(ABC):
    """Tokenises prompts and generates from them."""

    @abstractmethod
    def tokenize(self, record: PromptRecord) -> list[int]:
        """The prompt's token ids, chat template applied (generation prompt added)."""

    @abstractmethod
    def generate(self, prompts: Sequence[list[int]],
                 seeds: Sequence[int]) -> list[tuple[Completion, Completion]]:
        """(greedy, sampled) completions of each prompt; `seeds` seed the sampled ones."""


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


def label_prompts(records: Sequence[PromptRecord], out: Path,
                  make_engine: Callable[[], LabelEngine], *, max_prompt_tokens: int,
                  batch_size: int = 32, seed: int = 0, progress: bool = True) -> LabelSummary:
    """Label the records not yet in `out`, appending rows batch by batch (see module).

    `make_engine` is called once, and only if some record is left to label.
    Raises ValueError for a batch_size or max_prompt_tokens below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    done = labelled_ids(out)
    todo = [r for r in records if r.id not in done]
    summary = LabelSummary(len(records), len(records) - len(todo), 0, 0)
    if not todo:
        return summary
    engine = make_engine()
    labelled = skipped = 0
    started_at = time.monotonic()
    with tqdm(total=len(todo), desc="labelling", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            rows = _label_batch(batch, engine, max_prompt_tokens, seed)
            append_labels(out, rows)
            skipped += sum(r.greedy_output_tokens is None for r in rows)
            labelled += sum(r.greedy_output_tokens is not None for r in rows)
            bar.update(len(batch))
    return LabelSummary(summary.num_selected, summary.num_already_labelled, labelled, skipped,
                        time.monotonic() - started_at)


def _label_batch(batch: Sequence[PromptRecord], engine: LabelEngine, max_prompt_tokens: int,
                 seed: int) -> list[LabelRow]:
    token_ids = [engine.tokenize(r) for r in batch]
    runnable = [i for i, ids in enumerate(token_ids) if len(ids) <= max_prompt_tokens]
    results = engine.generate([token_ids[i] for i in runnable],
                              [stable_hash(batch[i].id, seed) % (1 << 31) for i in runnable]
                              ) if runnable else []
    if len(results) != len(runnable):
        raise RuntimeError(f"engine returned {len(results)} results for {len(runnable)} prompts")
    by_index = dict(zip(runnable, results, strict=True))
    rows = []
    for i, record in enumerate(batch):
        greedy: Completion | None
        sampled: Completion | None
        if i in by_index:
            greedy, sampled = by_index[i]
        else:
            log.info("skipping %s: %d prompt tokens > %d", record.id, len(token_ids[i]),
                     max_prompt_tokens)
            greedy = sampled = None
        rows.append(LabelRow(
            id=record.id, prompt_id=record.prompt_id, task=record.task,
            prompt_tokens=len(token_ids[i]),
            greedy_output_tokens=greedy.num_output_tokens if greedy else None,
            greedy_finish_reason=greedy.finish_reason if greedy else SKIPPED_TOO_LONG,
            sampled_output_tokens=sampled.num_output_tokens if sampled else None,
            sampled_finish_reason=sampled.finish_reason if sampled else SKIPPED_TOO_LONG))
    return rows


def set_cpu_engine_env(num_threads_bind: str = "0-1", kv_cache_gib: int = 4) -> None:
    """Default vLLM's CPU-backend settings when unset (KV cache size, cores to bind)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", num_threads_bind)


class VllmLabelEngine(LabelEngine):
    """vLLM's offline `LLM` over a model path (bf16, prefix caching on)."""

    def __init__(self, model: str, *, max_tokens: int, max_prompt_tokens: int,
                 seed: int = 0) -> None:
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        self.max_tokens = max_tokens
        self.llm = LLM(model=model, dtype="bfloat16", seed=seed, enable_prefix_caching=True,
                       max_model_len=max_prompt_tokens + max_tokens)
        self.tokenizer = self.llm.get_tokenizer()

    def tokenize(self, record: PromptRecord) -> list[int]:
        """Chat template with the generation prompt, then tokenised without extra
        special tokens (the template already has them)."""
        text = self.tokenizer.apply_chat_template(list(record.messages), tokenize=False,
                                                  add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"chat template returned {type(text)}, expected text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: Sequence[list[int]],
                 seeds: Sequence[int]) -> list[tuple[Completion, Completion]]:
        """Greedy and sampled completion of each prompt, submitted together."""
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        greedy = self._sampling_params(temperature=0.0, max_tokens=self.max_tokens)
        requests: list[TokensPrompt] = []
        params = []
        for ids, seed in zip(prompts, seeds, strict=True):
            sampled = self._sampling_params(temperature=SAMPLED_TEMPERATURE,
                                            max_tokens=self.max_tokens, seed=seed)
            requests += [TokensPrompt(prompt_token_ids=ids), TokensPrompt(prompt_token_ids=ids)]
            params += [greedy, sampled]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [Completion(len(o.outputs[0].token_ids), str(o.outputs[0].finish_reason))
                       for o in outputs]
        return list(zip(completions[0::2], completions[1::2], strict=True))
