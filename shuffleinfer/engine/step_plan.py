"""What `shuffleinfer calibrate --profile` runs, and the work each engine step does.

A profile is a list of cases, each run alone on one engine:
- a prefill case submits prompts with `max_tokens=1`, so every step it causes is prefill
  only (the last chunk of a prompt samples its one token and the request ends);
- a decode case submits `batch` prompts of `prompt_len` tokens with `ignore_eos` and
  times the steps in which all of them decode.

A step is described by what the simulator's cost model (`shuffleinfer.sim.cost`) charges
for: prefill `tokens` and `attn` (the sum over its prompt slices of `s * (o + s)`, a slice
of `s` tokens at offset `o`), decode `batch` and `context` (the sum over its decodes of
prompt plus tokens generated so far). `step_shape` reads them off what vLLM's scheduler
really scheduled; `planned_steps` says what the plan meant it to schedule, so a profile
notices an engine that split the work otherwise.

Everything here is pure: no engine, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepShape:
    """The work of one engine step, in the cost model's terms."""

    tokens: int = 0
    """Prompt tokens prefilled."""
    attn: int = 0
    """Attention work of the prefill: sum of `s * (o + s)` over its prompt slices."""
    batch: int = 0
    """Requests decoding one token each."""
    context: int = 0
    """Summed context of the decodes: prompt plus tokens generated so far."""


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part in a step, as the scheduler scheduled it."""

    prompt_len: int
    num_computed_tokens: int
    """Tokens already in its KV cache when the step starts."""
    num_scheduled_tokens: int


def step_shape(scheduled: Iterable[ScheduledRequest]) -> StepShape:
    """The shape of a step that runs `scheduled`."""
    tokens = attn = batch = context = 0
    for r in scheduled:
        if r.num_computed_tokens < r.prompt_len:  # a slice of its prompt
            s, o = r.num_scheduled_tokens, r.num_computed_tokens
            tokens += s
            attn += s * (o + s)
        else:  # a decode feeds its last token and attends to everything before it too
            batch += 1
            context += r.num_computed_tokens + 1
    return StepShape(tokens, attn, batch, context)


def planned_steps(prompt_lens: Sequence[int], budget: int, max_tokens: int = 1
                  ) -> list[StepShape]:
    """The steps vLLM's scheduler makes of prompts submitted together: at every step, in
    the order they came, each request takes what it needs of the `budget` tokens while
    any are left: the rest of its prompt (split if it does not fit: chunked prefill) or
    one token to decode. A request's first token comes with its last prompt chunk and it
    ends with its `max_tokens`-th."""
    computed = [0] * len(prompt_lens)
    made = [0] * len(prompt_lens)
    steps = []
    while any(m < max_tokens for m in made):
        left, scheduled = budget, []
        for i, n in enumerate(prompt_lens):
            if left == 0:
                break
            if made[i] == max_tokens:
                continue
            s = min(n - computed[i], left) if computed[i] < n else 1
            scheduled.append(ScheduledRequest(n, computed[i], s))
            computed[i] += s
            left -= s
            if computed[i] >= n:  # prompt done: this step made a token
                made[i] += 1
        steps.append(step_shape(scheduled))
    return steps


@dataclass(frozen=True)
class PrefillCase:
    """Prompts submitted together, each with `max_tokens=1`."""

    prompt_lens: tuple[int, ...]

    @property
    def label(self) -> str:
        lens = set(self.prompt_lens)
        if len(lens) == 1:
            return f"{len(self.prompt_lens)}x{lens.pop()}"
        return "+".join(map(str, self.prompt_lens))


@dataclass(frozen=True)
class DecodeCase:
    """`batch` prompts of `prompt_len` tokens decoding `max_tokens` each; the steps in
    which all of them decode are timed but the first `skip_steps` (oneDNN builds its
    kernels for a new batch shape on its first steps)."""

    batch: int
    prompt_len: int
    max_tokens: int
    skip_steps: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.prompt_len}"


@dataclass(frozen=True)
class ProfilePlan:
    """Everything one profile runs, on an engine with `max_num_batched_tokens=budget`."""

    budget: int
    prefill: tuple[PrefillCase, ...]
    decode: tuple[DecodeCase, ...]

    @property
    def max_model_len(self) -> int:
        """The longest request the plan makes: its prompt plus its output."""
        return max([max(c.prompt_lens) + 1 for c in self.prefill]
                   + [c.prompt_len + c.max_tokens for c in self.decode])


def make_plan(sizes: Sequence[int], batches: Sequence[int], prompt_lens: Sequence[int],
              *, decode_steps: int = 12, skip_steps: int = 3) -> ProfilePlan:
    """Prefill cases that vary `attn` apart from `tokens`: one prompt of each size; four
    prompts of a quarter size each (and sixteen of 1/16 of the largest), down to 16
    tokens a prompt; a prompt one step longer than the largest size, whose second step
    is a chunk of 1/8 or 1/2 of the largest at that offset. Decode cases: every batch
    size at every prompt length, with enough output for `skip_steps + decode_steps`
    steps after the last prompt of the batch is prefilled."""
    budget = max(sizes)
    prefill = [PrefillCase((t,)) for t in sorted(sizes)]
    prefill += [PrefillCase((t // 4,) * 4) for t in sorted(sizes) if t // 4 >= 16]
    if budget // 16 >= 16:
        prefill.append(PrefillCase((budget // 16,) * 16))
    prefill += [PrefillCase((budget + budget // k,)) for k in (8, 2) if budget // k >= 8]
    decode = []
    for length in prompt_lens:
        for b in batches:
            if b >= budget:
                raise ValueError(f"a decode batch of {b} leaves no room to prefill in a "
                                 f"step of {budget} tokens")
            # Its prompts need this many steps at most (the decodes already running
            # take a token each); the first of them decodes from the first step on.
            prefill_steps = math.ceil(b * length / (budget - b)) + 1
            decode.append(DecodeCase(b, length, prefill_steps + skip_steps + decode_steps,
                                     skip_steps))
    return ProfilePlan(budget, tuple(prefill), tuple(decode))


FULL_PLAN = make_plan((32, 64, 128, 256, 512, 1024), (1, 4, 16, 32), (64, 512))
"""About four minutes on one core of this machine for the default model."""
QUICK_PLAN = make_plan((16, 32, 64), (1, 4), (16, 32), decode_steps=4, skip_steps=1)
"""Seconds: enough steps to fit, too few to trust; for tests."""


@dataclass(frozen=True)
class StepSample:
    """One step shape's median latency."""

    case: str
    """The case it came from, e.g. `prefill 4x256`, `decode 16x512`."""
    shape: StepShape
    seconds: float
    num_steps: int
    """Timed steps the median is over."""


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVGeometry:
    """A model's KV cache per token, read from its Hugging Face config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    """As the engine runs it: float32, float16 or bfloat16."""

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer's KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]


def kv_geometry(hf_config: Any, dtype: str) -> KVGeometry:
    """The KV geometry of a Hugging Face model config (its text part, if it has several);
    `dtype` as the engine runs it, `auto` meaning the model's own."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if dtype == "auto":
        dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", "float32"))
    dtype = dtype.removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"no KV size for dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return KVGeometry(text.num_hidden_layers, heads, head_dim, dtype)
