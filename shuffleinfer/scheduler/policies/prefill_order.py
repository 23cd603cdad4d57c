"""Prefill order: in which order a prefill instance's local queue runs its prompts, and
what fills the next fixed-size chunk.

Windows bound starvation: the queue numbers prompts as they arrive (`arrival_seq`), and
prompt n belongs to window n // sched_window. A policy only reorders prompts within a
window and runs windows in arrival order, so at most sched_window - 1 later arrivals can
overtake a prompt. A prompt already partly prefilled (sliced across chunks) runs first
whatever the policy: it holds KV blocks, and pausing it delays its first token for nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.scheduler.policies.registry import lookup


class PrefillOrderConfig(BaseModel):
    """Parameters of the prefill queue order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sched_window: int = Field(default=16, ge=1, description=(
        "Prompts are reordered only within windows of this many arrivals (the paper: 16)."))


class QueuedPrompt(NamedTuple):
    """A prompt waiting in a prefill instance's local queue."""

    req_id: str
    arrival_seq: int
    """Position in the instance's arrival order (0, 1, 2, ...; never reused)."""
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    """Tokens already prefilled in earlier chunks."""

    @property
    def num_remaining_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_computed_tokens


class ChunkSlice(NamedTuple):
    """`num_tokens` of `req_id`'s prompt go into the chunk."""

    req_id: str
    num_tokens: int


class PrefillOrderPolicy(ABC):
    """Orders the local prefill queue."""

    def __init__(self, config: PrefillOrderConfig | None = None) -> None:
        self.config = config or PrefillOrderConfig()

    @abstractmethod
    def length_key(self, prompt: QueuedPrompt) -> int:
        """How this policy ranks prompts within a window (lower runs first)."""

    def order(self, queue: Sequence[QueuedPrompt]) -> list[QueuedPrompt]:
        """Called before each chunk is formed, with the queue in any order; returns the
        prompts in the order to run."""
        window = self.config.sched_window
        return sorted(queue, key=lambda p: (p.num_computed_tokens == 0,
                                            p.arrival_seq // window,
                                            self.length_key(p), p.arrival_seq))


class FCFS(PrefillOrderPolicy):
    """Arrival order."""

    def length_key(self, prompt: QueuedPrompt) -> int:
        return 0


class SJF(PrefillOrderPolicy):
    """Shortest prompt first within a window (the paper's best: -7.8 % waiting)."""

    def length_key(self, prompt: QueuedPrompt) -> int:
        return prompt.num_prompt_tokens


class LJF(PrefillOrderPolicy):
    """Longest prompt first within a window."""

    def length_key(self, prompt: QueuedPrompt) -> int:
        return -prompt.num_prompt_tokens


PREFILL_ORDER_POLICIES: dict[str, type[PrefillOrderPolicy]] = {
    "fcfs": FCFS,
    "sjf": SJF,
    "ljf": LJF,
}


def make_prefill_order_policy(name: str,
                              config: PrefillOrderConfig | None = None) -> PrefillOrderPolicy:
    """Build an order policy by name; an unknown name raises ValueError listing the known."""
    return lookup(PREFILL_ORDER_POLICIES, name, "prefill order policy")(config)


def fill_chunk(ordered: Sequence[QueuedPrompt], chunk_size: int) -> list[ChunkSlice]:
    """What the next chunk of at most `chunk_size` tokens runs: prompts in the given order,
    short ones packed whole, the one that does not fit sliced to fill the chunk exactly.
    Called once per chunk with `PrefillOrderPolicy.order`'s result."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    slices: list[ChunkSlice] = []
    budget = chunk_size
    for prompt in ordered:
        if budget == 0:
            break
        take = min(prompt.num_remaining_tokens, budget)
        if take > 0:
            slices.append(ChunkSlice(prompt.req_id, take))
            budget -= take
    return slices
