"""ShuffleInfer's vLLM KV connector, loaded by every engine through
`kv_transfer_config = {"kv_connector": "ShuffleKVConnector",
"kv_connector_module_path": "shuffleinfer.kv.connector", "kv_role": "kv_both", ...}`.

vLLM builds one instance per role: the scheduler role in the EngineCore process and the
worker role in each Worker process. This class only routes vLLM's calls to the half that
owns them (`scheduler_side.ConnectorScheduler`, `worker_side.ConnectorWorker`).

`kv_connector_extra_config` keys (`options.ConnectorOptions`): host (KV server bind
address), advertise_host (address peers dial; defaults to host), port, lease_s,
pull_timeout_s, transport ("auto" | "tcp" | "shm" | "nccl", see `selection.py`),
auth_token (a shared secret every KV request must carry), overlap (stage a prefill's
blocks chunk by chunk as they complete, `staging.py`) and staging_mib (its bound).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from shuffleinfer.kv.block_views import VLLM_BLOCK_DIM
from shuffleinfer.kv.metadata import ShuffleConnectorMetadata
from shuffleinfer.kv.options import ConnectorOptions
from shuffleinfer.kv.scheduler_side import ConnectorScheduler
from shuffleinfer.kv.stats import ShuffleKVStats
from shuffleinfer.kv.worker_side import ConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def handshake_identity(vllm_config: VllmConfig) -> dict[str, object]:
    """What two engines must share beyond the KV layout for a hand-over to make sense: the
    model (by name: its path may differ between hosts) and the tensor-parallel size (each
    rank pulls from the same rank)."""
    model = str(vllm_config.model_config.model).rstrip("/")
    return {"model": model.rsplit("/", 1)[-1],
            "tp_size": int(vllm_config.parallel_config.tensor_parallel_size)}


class ShuffleKVConnector(KVConnectorBase_V1):
    """Pull-based KV hand-over between a prefill and a decode engine."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        opts = ConnectorOptions.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ConnectorScheduler(
                opts.advertise_host or opts.host, opts.port,
                vllm_config.cache_config.block_size,
                kv_device=str(vllm_config.device_config.device_type),
                auth_token=opts.auth_token, overlap=opts.overlap)
        else:
            self._worker = ConnectorWorker(
                opts.host, opts.port, opts.lease_s, opts.pull_timeout_s,
                transport=opts.transport, auth_token=opts.auth_token,
                staging_bytes=opts.staging_mib << 20 if opts.overlap else 0,
                share_cache=opts.shared_cache, identity=handshake_identity(vllm_config))

    # --- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        # vLLM 0.32 registers each attention layer as a [B, H, N, C] view whose strides
        # follow the resolved KV cache layout; dim 0 counts num_blocks (times the kernel
        # blocks per block when the kernel splits blocks).
        logger.info("registering the KV cache: %s layout, %d blocks",
                    self._vllm_config.cache_config.kv_cache_layout,
                    self._kv_cache_config.num_blocks)
        self._worker.register_kv_caches(kv_caches, num_blocks=self._kv_cache_config.num_blocks,
                                        block_dim=VLLM_BLOCK_DIM)

    def _bound_metadata(self) -> ShuffleConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, ShuffleConnectorMetadata) else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Called before the step's forward pass: the last point to fence staging copies
        # of blocks this forward may overwrite (vLLM may start loads after the forward).
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata,
                                                   ShuffleConnectorMetadata):
            self._worker.on_metadata(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        if (meta := self._bound_metadata()) is not None:
            self._worker.on_metadata(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are whole-request and finish before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return None  # nothing is pushed: decode engines pull leased blocks

    def wait_for_save(self) -> None:
        # Called after the step's forward pass: its completed blocks can be staged.
        assert self._worker is not None
        if (meta := self._bound_metadata()) is not None:
            self._worker.on_metadata(meta)
            self._worker.after_forward(meta)

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._worker.get_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return ShuffleKVStats.from_dict(data)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # --- scheduler side -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)
