"""Byte views of whole KV blocks, layer by layer: host views for byte transports (tcp,
shm), device rows for nccl.

On CPU the views point straight into the engine's own KV tensors: a pull is received
into the destination blocks and sent from the source blocks with no copy of ours. KV
tensors on an accelerator are staged through host memory: the sender gathers the asked
blocks into one host buffer; the receiver fills a host buffer and then copies it into its
blocks (`PendingWrite.commit`). Both sides run the same code; only CPU skips the staging.
NCCL moves device memory itself, so `read_rows`/`write_rows` never stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shuffleinfer.kv.transport import KVTransferError


@dataclass
class PendingWrite:
    """Where a pull lands; `commit()` once every byte has arrived."""

    views: list[memoryview]
    _staging: torch.Tensor | None = None
    _layers: list[torch.Tensor] | None = None
    _index: torch.Tensor | None = None

    def commit(self) -> None:
        """Copy staged bytes into the KV blocks (nothing to do without staging)."""
        if self._staging is None or self._layers is None or self._index is None:
            return
        for layer, staged in zip(self._layers, self._staging, strict=True):
            layer.index_copy_(0, self._index.to(layer.device), staged.to(layer.device))
        if self._layers[0].device.type == "cuda":
            torch.cuda.synchronize(self._layers[0].device)


class KVCacheViews:
    """The engine's KV cache seen as `[num_blocks, block_bytes]` byte rows per layer."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], *,
                 stage_through_host: bool | None = None) -> None:
        self.layer_names = sorted(kv_caches)
        first = kv_caches[self.layer_names[0]]
        self._layers: list[torch.Tensor] = []
        for name in self.layer_names:
            t = kv_caches[name]
            if not t.is_contiguous():
                raise ValueError(f"KV cache of {name} is not contiguous")
            self._layers.append(t.reshape(t.shape[0], -1).view(torch.uint8))
        self.stage = (first.device.type != "cpu") if stage_through_host is None \
            else stage_through_host
        self.dtype = str(first.dtype)
        # [kv_heads, block_size, 2 * head_size]: equal bytes per block are not enough,
        # e.g. twice the heads in half the block size would load garbage.
        self.block_shape = [int(d) for d in first.shape[1:]]
        self.block_bytes = int(self._layers[0].shape[1])

    @property
    def device(self) -> torch.device:
        """Where the KV cache lives."""
        return self._layers[0].device

    @property
    def layout(self) -> dict[str, object]:
        return {"num_layers": len(self._layers), "block_bytes": self.block_bytes,
                "block_shape": self.block_shape, "dtype": self.dtype}

    def check_layout(self, layout: dict[str, object]) -> None:
        """Raise naming the first field where a peer's layout differs from ours."""
        for key, value in self.layout.items():
            if layout.get(key) != value:
                raise KVTransferError(
                    f"KV layout mismatch: {key} is {value} here, {layout.get(key)} at the peer"
                )

    def _index(self, block_ids: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long)

    def read_views(self, block_ids: tuple[int, ...]) -> list[memoryview]:
        """The bytes of `block_ids`, layer by layer, ready to send."""
        if not self.stage:
            return [layer[b].numpy().data for layer in self._layers for b in block_ids]
        staged = torch.stack([layer.index_select(0, self._index(block_ids).to(layer.device))
                              .cpu() for layer in self._layers])
        flat = staged.numpy()
        return [flat[layer, i].data for layer in range(len(self._layers))
                for i in range(len(block_ids))]

    def write_views(self, block_ids: tuple[int, ...]) -> PendingWrite:
        """Where to receive the bytes of `block_ids` (same order as `read_views`)."""
        if not self.stage:
            return PendingWrite([layer[b].numpy().data for layer in self._layers
                                 for b in block_ids])
        staging = torch.empty(len(self._layers), len(block_ids), self.block_bytes,
                              dtype=torch.uint8)
        flat = staging.numpy()
        views = [flat[layer, i].data for layer in range(len(self._layers))
                 for i in range(len(block_ids))]
        return PendingWrite(views, staging, self._layers, self._index(block_ids))

    def read_rows(self, block_ids: tuple[int, ...]) -> list[torch.Tensor]:
        """Each block of each layer as a 1-D uint8 tensor on the cache's device, in
        `read_views` order: what NCCL sends from."""
        return [layer[b] for layer in self._layers for b in block_ids]

    def write_rows(self, block_ids: tuple[int, ...]) -> list[torch.Tensor]:
        """The destination rows of `block_ids` (same order as `read_rows`)."""
        return self.read_rows(block_ids)
