"""A simulated engine step, and the arithmetic of macro steps (many decode-only steps as
one event): with B decodes whose context grows by B per step, n steps take
`n * u + c * B * n * (n - 1) / 2` (u: the first step, c: seconds per context token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """A lone prompt's full chunks run as one event: when each of them ends."""


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
