"""What the two halves of the KV connector tell each other, and the transfer params.

The scheduler half (in vLLM's EngineCore process) decides; the worker half (in the Worker
process, next to the KV tensors) moves bytes. Each engine step the scheduler half packs
its decisions into a `ShuffleConnectorMetadata`, vLLM pickles it to the worker half.

`kv_transfer_params` keys (a plain dict, since it travels through vLLM and the api):
- prefill request in:  {"do_remote_decode": True, "transfer_id": T}
- prefill request out: {"do_remote_prefill": True, "transfer_id": T, "remote_host": H,
  "remote_port": P, "remote_host_id": I, "remote_kv_device": D,
  "remote_block_ids": [...], "remote_num_tokens": N}
  where I is the prefill's `selection.host_identity()` (equal on the decode side iff both
  can share /dev/shm) and D its KV cache's device type ("cpu", "cuda"): the decode side
  picks the transport from them.
- decode request in:   the prefill's output params, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"
TRANSFER_ID = "transfer_id"
REMOTE_HOST = "remote_host"
REMOTE_PORT = "remote_port"
REMOTE_HOST_ID = "remote_host_id"
REMOTE_KV_DEVICE = "remote_kv_device"
REMOTE_BLOCK_IDS = "remote_block_ids"
REMOTE_NUM_TOKENS = "remote_num_tokens"
LOAD_STARTED = "_shuffle_load_started"
"""Set on a decode request's params once its pull is planned, so it is never restarted."""


@dataclass(frozen=True)
class Lease:
    """Prefill side: blocks of a finished prefill, held until pulled, released or expired."""

    transfer_id: str
    engine_req_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class PlannedLoad:
    """Decode side: remote blocks to pull into local blocks (same length, same order)."""

    transfer_id: str
    engine_req_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    remote_host_id: str | None = None
    """The prefill's host identity; None (params from an older prefill): another host."""
    remote_kv_device: str = "cpu"
    num_tokens: int = 0
    """Prompt tokens the blocks hold (what the decode recomputes if the pull fails)."""


@dataclass(frozen=True)
class StageBlocks:
    """Prefill side, overlap mode: this step completes blocks `first_index`, ... of a
    prompt of `num_blocks` blocks; they are in `block_ids` (`staging.Stager.stage`)."""

    transfer_id: str
    num_blocks: int
    first_index: int
    block_ids: tuple[int, ...]


@dataclass
class ShuffleConnectorMetadata(KVConnectorMetadata):
    """One engine step's news from the scheduler half to the worker half."""

    new_leases: list[Lease] = field(default_factory=list)
    new_loads: list[PlannedLoad] = field(default_factory=list)
    stage: list[StageBlocks] = field(default_factory=list)
    """Copied out after this step's forward pass."""
    fences: list[str] = field(default_factory=list)
    """Transfers whose blocks were freed (preempted): their copies end before the forward."""
    dropped: list[str] = field(default_factory=list)
    """Transfers that ended without a lease (aborted, finished by their first token):
    fenced, then their staging freed."""
