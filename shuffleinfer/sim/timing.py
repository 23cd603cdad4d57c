"""A simulated engine step, and the arithmetic of macro steps (many decode-only steps as
one event): with B decodes whose context grows by B per step, n steps take
`n * u + c * B * n * (n - 1) / 2` (u: the first step, c: seconds per context token).

And of a lone prompt's chunks as one event (on an instance with no decodes and no other
prompt). The order policy runs a started prompt first, so a prompt arriving meanwhile can
only get the room the prompt's last chunk leaves: it cuts the event before that chunk (if
the chunk has room and has not started). A decode handed over meanwhile cuts it at the
end of the chunk in progress.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from shuffleinfer.sim.cost import LinearCost
from shuffleinfer.sim.request import SimRequest


@dataclass(slots=True)
class Step:
    started_s: float
    ends_s: float
    steps: int
    """Engine steps it covers (1 for a step with prompt work, but for a lone prompt's
    chunks: one per chunk)."""
    first_step_s: float = 0.0
    growth_s: float = 0.0
    """Each further step of a macro step costs this much more than the one before."""
    slices: tuple[tuple[SimRequest, int], ...] = ()
    chunk_ends_s: tuple[float, ...] = ()
    """A lone prompt's chunks run as one event: when each of them ends."""


def macro_s(n: int, first_s: float, growth_s: float) -> float:
    """Seconds for n decode steps whose first takes `first_s`, each next `growth_s` more."""
    return n * first_s + growth_s * n * (n - 1) / 2


def steps_within(elapsed_s: float, first_s: float, growth_s: float) -> int:
    """How many whole steps of a macro step fit in `elapsed_s`."""
    if elapsed_s <= 0:
        return 0
    if growth_s <= 0:
        return int(elapsed_s // first_s) if first_s > 0 else 0
    # n * first + growth * n * (n - 1) / 2 <= elapsed
    a, b = growth_s / 2, first_s - growth_s / 2
    n = int((-b + math.sqrt(b * b + 4 * a * elapsed_s)) / (2 * a))
    while n > 0 and macro_s(n, first_s, growth_s) > elapsed_s:
        n -= 1
    return n


def chunk_ends_s(cost: LinearCost, start_s: float, size: int, done: int, left: int,
                 context_tokens: int) -> tuple[float, ...]:
    """When each chunk of a prompt with `done` tokens computed and `left` to go ends, run
    back to back from `start_s` in chunks of `size`, each as a step of its own (no decode
    beside it) would take."""
    t, ends = start_s, []
    while left > 0:
        n = min(size, left)
        t += cost.step_s(n, 0.0 + n * (done + n), 0, context_tokens)
        done, left = done + n, left - n
        ends.append(t)
    return tuple(ends)


def chunks_kept(ends_s: tuple[float, ...], now: float, size: int, tokens: int,
                prompt: bool) -> int | None:
    """How many of a prompt's chunks (ending at `ends_s`, `tokens` in all) to keep when new
    work arrives at `now`; None to keep them all. A decode joins after the chunk in
    progress; a prompt can only get the room the last chunk leaves, so the chunks stop
    before the last one (if it has room and has not started)."""
    if not prompt:
        keep = bisect_right(ends_s, now) + 1
    elif tokens % size and now <= ends_s[-2]:  # (an arrival goes first at a tie)
        keep = len(ends_s) - 1
    else:
        return None
    return keep if keep < len(ends_s) else None
