"""Stop strings across the prefill/decode boundary.

Each engine checks stop strings only within its own output: the prefill leg sees the
first token's text, the decode leg the rest. A stop string that starts in the first
token's text and ends in the decode leg's text is seen by neither. `StopBoundary` closes
that gap: it holds back the tail of the first token's text that could begin a stop string
and releases it as soon as the decode text shows whether a stop string completes there.
Once that is settled, deltas pass through untouched (vLLM handles the rest).
"""

from __future__ import annotations

from dataclasses import replace

from shuffleinfer.protocol import TokenDelta


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class StopBoundary:
    """Filters one request's deltas; feed the first delta, then every decode delta."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._tail_len = 0
        """How much of `_held` is the first token's text (matches must start there)."""
        self._settled = not self._stops
        self.stopped = False
        """True once a stop string straddling the boundary ended the request."""

    def first(self, delta: TokenDelta) -> TokenDelta:
        """The prefill leg's delta, minus any tail that may begin a stop string."""
        if self._settled or delta.finish_reason is not None:
            self._settled = True
            return delta
        k = _held_suffix(delta.text, self._stops)
        if k == 0:
            self._settled = True
            return delta
        self._held = delta.text[-k:]
        self._tail_len = k
        return replace(delta, text=delta.text[:-k])

    def decode(self, delta: TokenDelta) -> TokenDelta:
        """A decode-leg delta, with held text released, or cut at a straddling stop."""
        if self._settled:
            return delta
        buf = self._held + delta.text
        for stop in self._stops:
            start = buf.find(stop)
            if 0 <= start < self._tail_len:
                self._settled = self.stopped = True
                return replace(delta, text=buf[:start], finish_reason="stop")
        still_open = any(stop.startswith(buf[i:]) and len(buf) - i < len(stop)
                         for stop in self._stops for i in range(self._tail_len))
        if still_open and delta.finish_reason is None:
            self._held = buf
            return replace(delta, text="")
        self._settled = True
        self._held = ""
        return replace(delta, text=buf)
