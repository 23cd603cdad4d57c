"""A predictor's state as a value: what the learner pushes to prediction sites and what
is saved across restarts (one .npz file: the arrays plus a JSON metadata entry)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATE_FORMAT = 1
"""Version of the saved layout; a file of another format is refused."""
_METADATA = "metadata_json"


@dataclass(frozen=True)
class PredictorState:
    """A versioned snapshot of a learned predictor."""

    version: int
    """Counts the learner's updates (fit and each observation); newer wins."""
    num_observed: int
    """Finished requests observed online since the model was created."""
    fitted: bool
    """Whether the model was fitted on labelled data (then it is used from the start)."""
    config: dict[str, Any]
    """The predictor's configuration (a snapshot applies only to an equal config)."""
    prior_window: tuple[int, ...]
    """The running-median prior's remembered lengths, oldest first."""
    arrays: dict[str, np.ndarray] = field(repr=False)
    """Weights by name; the optimiser state too in saved files, not in pushed snapshots."""

    @property
    def num_bytes(self) -> int:
        """Size of the arrays (what a push moves)."""
        return sum(a.nbytes for a in self.arrays.values())


def write_state(state: PredictorState, path: Path) -> None:
    """Write `state` to `path` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": STATE_FORMAT, "version": state.version,
                "num_observed": state.num_observed, "fitted": state.fitted,
                "config": state.config, "prior_window": list(state.prior_window)}
    if _METADATA in state.arrays:
        raise ValueError(f"array name {_METADATA!r} is reserved")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            arrays: dict[str, Any] = {**state.arrays, _METADATA: np.array(json.dumps(metadata))}
            np.savez(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path) -> PredictorState:
    """Read a state written by `write_state`; raises FileNotFoundError or ValueError
    (naming the file) for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictor state {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a predictor state file: {e}") from None
    try:
        metadata = json.loads(str(arrays.pop(_METADATA)))
        if metadata["format"] != STATE_FORMAT:
            raise ValueError(f"format {metadata['format']}, expected {STATE_FORMAT}")
        return PredictorState(
            version=int(metadata["version"]), num_observed=int(metadata["num_observed"]),
            fitted=bool(metadata["fitted"]), config=dict(metadata["config"]),
            prior_window=tuple(int(v) for v in metadata["prior_window"]), arrays=arrays)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a predictor state file: {e}") from None
