"""Stop strings that straddle the first token (prefill leg) and the decode leg."""

from __future__ import annotations

import pytest

from shuffleinfer.protocol import TokenDelta
from shuffleinfer.runtime.stop_boundary import StopBoundary


def d(text: str, finish: str | None = None) -> TokenDelta:
    return TokenDelta(token_ids=(1,), text=text, finish_reason=finish)  # type: ignore[arg-type]


def run(stops: tuple[str, ...], first: str, decodes: list[str]) -> tuple[str, str | None, int]:
    """Client-visible text, finish reason and number of deltas passed on."""
    guard = StopBoundary(stops)
    out = [guard.first(d(first))]
    for i, text in enumerate(decodes):
        last = i == len(decodes) - 1
        out.append(guard.decode(d(text, "length" if last else None)))
        if guard.stopped:
            break
    return "".join(x.text for x in out), out[-1].finish_reason, len(out)


@pytest.mark.parametrize(("stops", "first", "decodes", "text", "finish"), [
    # straddling: "\n\n" = first token "\n" + decode "\n"
    (("\n\n",), "Hi\n", ["\nmore", " text"], "Hi", "stop"),
    # three-part stop string over three deltas
    (("END",), "xE", ["N", "D!", "zz"], "x", "stop"),
    # looked like a stop, was not: everything released, nothing lost
    (("END",), "xE", ["Nd", " more"], "xENd more", "length"),
    (("\n\n",), "a\n", ["b", "c"], "a\nbc", "length"),
    # nothing to hold: passes through
    (("STOP",), "hello", [" world"], "hello world", "length"),
    ((), "a\n", ["\n"], "a\n\n", "length"),
    # request ends while still ambiguous: held text is released
    (("END",), "xE", ["N"], "xEN", "length"),
])
def test_stop_strings_across_the_boundary(stops: tuple[str, ...], first: str,
                                          decodes: list[str], text: str, finish: str) -> None:
    got_text, got_finish, _ = run(stops, first, decodes)
    assert (got_text, got_finish) == (text, finish)


def test_first_delta_that_already_finished_passes_through() -> None:
    guard = StopBoundary(("\n\n",))
    delta = d("a\n", "length")
    assert guard.first(delta) == delta
    assert guard.decode(d("\n")).text == "\n"
