"""Scheduler half of the KV connector: decides what to lease and what to pull.

It runs in vLLM's EngineCore process, sees `Request` objects and block ids, and tells the
worker half what to do through `ShuffleConnectorMetadata`, one engine step at a time.

- Prefill engine: a request carrying {"do_remote_decode": True, "transfer_id": T} ends
  after one token (`max_tokens=1`, FINISHED_LENGTH_CAPPED). `request_finished` keeps its
  blocks (returns True) under a lease and returns the params a decode engine needs.
- Decode engine: a request carrying those params asks `get_num_new_matched_tokens`, which
  claims the remote prompt tokens the local prefix cache lacks and says "load async";
  `update_state_after_alloc` maps the remote blocks onto the freshly allocated local ones.
- Overlap mode (prefill engine): each step also says which of a leased-to-be prompt's
  blocks the step completes (`StageBlocks`, from the step's `SchedulerOutput`), so the
  worker half copies them out while the next chunks compute (`staging.py`); and which
  requests' blocks were freed under those copies (preempted: `fences`; ended without a
  lease: `dropped`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from shuffleinfer.kv import metadata as m
from shuffleinfer.kv.channel import release
from shuffleinfer.kv.selection import host_identity
from shuffleinfer.kv.transport import KVTransferError

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Streamed:
    """Overlap mode: a prefill whose blocks are staged as they complete."""

    transfer_id: str
    request: Request
    num_blocks: int
    block_ids: list[int] = field(default_factory=list)
    num_staged: int = 0
    num_preemptions: int = 0


class ConnectorScheduler:
    """The scheduler half; `ShuffleKVConnector` forwards the scheduler-side calls here."""

    def __init__(self, advertise_host: str, port: int, block_size: int,
                 kv_device: str = "cpu", auth_token: str | None = None,
                 host_id: str | None = None, overlap: bool = False) -> None:
        """`kv_device`: device type of this engine's KV cache; `host_id`: this host's
        identity (defaults to `host_identity()`); both are advertised to decode engines.
        `overlap`: stage prefills' blocks as they complete (`staging.py`)."""
        self._host = advertise_host
        self._port = port
        self._block_size = block_size
        self._kv_device = kv_device
        self._auth_token = auth_token
        self._host_id = host_id if host_id is not None else host_identity()
        self._new_leases: list[m.Lease] = []
        self._new_loads: list[m.PlannedLoad] = []
        self._overlap = overlap and kv_device == "cpu"  # nccl moves device memory itself
        self._streamed: dict[str, _Streamed] = {}
        self._dropped: list[str] = []

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        """Called when the engine schedules a waiting request: how many tokens to pull."""
        params = request.kv_transfer_params
        if self._overlap and params and params.get(m.DO_REMOTE_DECODE):
            if request.request_id not in self._streamed:
                self._streamed[request.request_id] = _Streamed(
                    str(params[m.TRANSFER_ID]), request,
                    _cdiv(request.num_prompt_tokens, self._block_size),
                    num_preemptions=request.num_preemptions)
            return 0, False
        if not params or not params.get(m.DO_REMOTE_PREFILL) or params.get(m.LOAD_STARTED):
            return 0, False
        # At least one prompt token (the prefill's sampled token) is computed locally.
        remote_tokens = min(int(params[m.REMOTE_NUM_TOKENS]), request.num_prompt_tokens - 1)
        count = remote_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Called after blocks were allocated for the tokens claimed above."""
        params = request.kv_transfer_params
        if not params or not params.get(m.DO_REMOTE_PREFILL) or params.get(m.LOAD_STARTED):
            return
        params[m.LOAD_STARTED] = True
        if num_external_tokens <= 0:
            # Fully served by the local prefix cache: the remote lease is not needed.
            self._release_async(params)
            return
        remote_tokens = min(int(params[m.REMOTE_NUM_TOKENS]), request.num_prompt_tokens - 1)
        first_block = (remote_tokens - num_external_tokens) // self._block_size
        num_blocks = _cdiv(remote_tokens, self._block_size) - first_block
        remote = tuple(params[m.REMOTE_BLOCK_IDS][first_block:first_block + num_blocks])
        local = tuple(blocks.get_unhashed_block_ids()[:num_blocks])
        if len(local) != num_blocks or len(remote) != num_blocks:
            raise RuntimeError(f"KV load plan for {request.request_id} does not line up: "
                               f"{num_blocks} blocks, {len(local)} local, {len(remote)} remote")
        self._new_loads.append(m.PlannedLoad(
            transfer_id=str(params[m.TRANSFER_ID]), engine_req_id=request.request_id,
            remote_host=str(params[m.REMOTE_HOST]), remote_port=int(params[m.REMOTE_PORT]),
            remote_block_ids=remote, local_block_ids=local,
            remote_host_id=_str_or_none(params.get(m.REMOTE_HOST_ID)),
            remote_kv_device=str(params.get(m.REMOTE_KV_DEVICE) or "cpu"),
            num_tokens=num_external_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput | None = None
                             ) -> m.ShuffleConnectorMetadata:
        """Called once per engine step; hands this step's news to the worker half."""
        meta = m.ShuffleConnectorMetadata(new_leases=self._new_leases,
                                          new_loads=self._new_loads, dropped=self._dropped)
        self._new_leases, self._new_loads, self._dropped = [], [], []
        if self._streamed and scheduler_output is not None:
            self._plan_staging(scheduler_output, meta)
        return meta

    def _plan_staging(self, out: SchedulerOutput, meta: m.ShuffleConnectorMetadata) -> None:
        """Overlap mode: which streamed blocks this step completes, and which were freed."""
        for streamed in self._streamed.values():
            if streamed.request.num_preemptions != streamed.num_preemptions:  # blocks freed
                streamed.num_preemptions = streamed.request.num_preemptions
                streamed.block_ids = []
                meta.fences.append(streamed.transfer_id)
        done: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            if (found := self._streamed.get(new.req_id)) is not None:
                found.block_ids = list(new.block_ids[0])
                done[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (found := self._streamed.get(req_id)) is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                found.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                found.block_ids.extend(new_ids[0])
            done[req_id] = cached.num_computed_tokens[i]
        for req_id, computed in done.items():
            s = self._streamed[req_id]
            computed += out.num_scheduled_tokens.get(req_id, 0)
            full = min(computed // self._block_size, len(s.block_ids), s.num_blocks)
            if full > s.num_staged:
                meta.stage.append(m.StageBlocks(s.transfer_id, s.num_blocks, s.num_staged,
                                                tuple(s.block_ids[s.num_staged:full])))
                s.num_staged = full

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Called once when a request ends, before its blocks are freed."""
        params = request.kv_transfer_params
        if not params:
            return False, None
        streamed = self._streamed.pop(request.request_id, None)
        leased, out = self._finish(request, params, block_ids)
        if streamed is not None and not leased:
            self._dropped.append(streamed.transfer_id)
        return leased, out

    def _finish(self, request: Request, params: dict[str, Any], block_ids: list[int]
                ) -> tuple[bool, dict[str, Any] | None]:
        if params.get(m.DO_REMOTE_PREFILL) and not params.get(m.LOAD_STARTED):
            # A decode request aborted before it was scheduled: free the prefill's lease.
            self._release_async(params)
            return False, None
        if not params.get(m.DO_REMOTE_DECODE):
            return False, None
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or not block_ids:
            # Aborted, or finished by its first token (EOS or stop): nothing to hand over.
            return False, None
        tid = str(params[m.TRANSFER_ID])
        self._new_leases.append(m.Lease(tid, request.request_id, tuple(block_ids)))
        return True, {
            m.DO_REMOTE_PREFILL: True,
            m.TRANSFER_ID: tid,
            m.REMOTE_HOST: self._host,
            m.REMOTE_PORT: self._port,
            m.REMOTE_HOST_ID: self._host_id,
            m.REMOTE_KV_DEVICE: self._kv_device,
            m.REMOTE_BLOCK_IDS: list(block_ids),
            m.REMOTE_NUM_TOKENS: min(request.num_computed_tokens, request.num_prompt_tokens),
        }

    def _release_async(self, params: dict[str, Any]) -> None:
        threading.Thread(target=release_lease, args=(params, self._auth_token),
                         name="shuffleinfer-kv-release", daemon=True).start()


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def release_lease(params: dict[str, Any], auth_token: str | None = None) -> None:
    """Tell the prefill worker named in a prefill's output params that its lease will never
    be pulled, so it frees the blocks now; a failure is logged (the lease then expires).
    `auth_token`: the connector's shared secret, if one is configured (else refused)."""
    try:
        release(str(params[m.REMOTE_HOST]), int(params[m.REMOTE_PORT]),
                str(params[m.TRANSFER_ID]), auth_token=auth_token)
    except KVTransferError as e:
        logger.warning("could not release KV lease %s early (it will expire): %s",
                       params.get(m.TRANSFER_ID), e)
