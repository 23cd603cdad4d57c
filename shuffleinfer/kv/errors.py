"""The KV hand-over's one error type, apart so low-level modules (block views) need not
import the transport contract."""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """A pull or release failed; the caller recomputes or reports the failure."""
