"""Where a request runs, and how it goes on when an instance serving it dies.

`RayBackend.generate` keeps a request's `Legs`: its engine request and the instances of
both legs. A prefill instance that dies before the first token: the same request is
prefilled again on another. A decode instance that dies mid-stream: the request goes on
as its `continuation` (prompt plus the tokens the client already has, budgets reduced by
as many), prefilled and decoded on other instances; its first token is the next token of
the client's stream, so nothing is lost or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from shuffleinfer.protocol import GenerateRequest, PrefillResult

MAX_FAILOVERS = 3
"""Times one request's leg moves off a dead instance before the request fails (503)."""


@dataclass
class Legs:
    """Where a request runs now: its engine request (the client's, or its continuation
    after a decode instance died) and the instances serving it."""

    request: GenerateRequest
    prefill_id: str | None = None
    prefill_actor: Any = None
    prefill_ref: Any = None
    prefill: PrefillResult | None = None
    decode_id: str | None = None
    decode_actor: Any = None

    def settled(self) -> Legs:
        """These legs with the prefill done (nothing of it left to abort)."""
        return replace(self, prefill_actor=None, prefill_ref=None)


def continuation(request: GenerateRequest, output_ids: list[int], n: int) -> GenerateRequest:
    """`request` to go on after `output_ids`: those tokens join the prompt, the budgets
    shrink by as many. Greedy output is what the first decode would have made; sampled
    output follows the same parameters with a new draw."""
    s = request.sampling
    done = len(output_ids)
    return replace(request, req_id=f"{request.req_id}~{n}",
                   prompt_token_ids=request.prompt_token_ids + tuple(output_ids),
                   sampling=replace(s, max_tokens=s.max_tokens - done,
                                    min_tokens=max(s.min_tokens - done, 0)))
