"""One lookup for every policy registry: a name picks an entry; an unknown name is an error
that lists the known ones (never a silent default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """Return `registry[name]`; raise ValueError naming `what` and the known names."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; known: {known}") from None
