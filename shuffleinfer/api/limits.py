"""The bound on requests the server holds at once: past it, HTTP 429 with Retry-After.

A generation request takes a slot when it is accepted and gives it back when it ends,
however it ends (finished, failed, client gone). With every slot taken, a new request is
refused at once, before it reaches the cluster, with an OpenAI-style `rate_limit_error`
body and a Retry-After header; requests already held are not touched. So a burst beyond
what the cluster can take grows neither its queues nor the server's memory.
"""

from __future__ import annotations

from prometheus_client import Gauge

from shuffleinfer.api.errors import APIError


class RequestLimit:
    """At most `limit` requests held at once."""

    def __init__(self, limit: int, retry_after_s: int, gauge: Gauge) -> None:
        if limit < 1 or retry_after_s < 1:
            raise ValueError(f"need limit >= 1 and retry_after_s >= 1, got {limit} and "
                             f"{retry_after_s}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.held = 0
        self._gauge = gauge

    def take(self) -> Slot:
        """A slot for one request; raises a 429 `APIError` when none is free."""
        if self.held >= self.limit:
            raise APIError(
                429, f"The server is holding as many requests as it takes at once "
                f"({self.limit}, --max-num-requests); retry after {self.retry_after_s} s.",
                headers={"Retry-After": str(self.retry_after_s)})
        self.held += 1
        self._gauge.set(self.held)
        return Slot(self)

    def _give_back(self) -> None:
        self.held -= 1
        self._gauge.set(self.held)


class Slot:
    """One request's place under the limit; `release` may be called more than once."""

    def __init__(self, limit: RequestLimit) -> None:
        self._limit: RequestLimit | None = limit

    def release(self) -> None:
        if self._limit is not None:
            self._limit._give_back()
            self._limit = None
