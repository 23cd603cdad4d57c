"""Argument types shared by the command-line tools (serve, calibrate, predictor)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any


def json_object(text: str) -> dict[str, Any]:
    """A flag value that is a JSON object, e.g. '{"prefill_pool": 1}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def boolean(text: str) -> bool:
    """A flag value that is true or false (also on/off, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("true", "on", "yes", "1"):
        return True
    if value in ("false", "off", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def engine_arg(text: str) -> tuple[str, Any]:
    """`--engine-arg KEY=VALUE`: VALUE parsed as JSON when it is JSON, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.replace("-", "_"), parsed


def owned_engine_args(command: str, keys: Iterable[str], owns: Iterable[str]) -> str | None:
    """The error for `--engine-arg` KEYS that `command` sets itself, or None."""
    owned = sorted(set(owns) & set(keys))
    if not owned:
        return None
    return f"invalid --engine-arg: {command} sets {', '.join(owned)} itself"


def positive_int(text: str) -> int:
    """A flag value that is an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
