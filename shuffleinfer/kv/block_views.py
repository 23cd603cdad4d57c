"""Byte views of whole KV blocks, layer by layer: host views for byte transports (tcp,
shm), device rows for nccl.

What vLLM hands `register_kv_caches`. In vLLM 0.32 every attention layer's tensor is the
view `allocate_kv_cache` builds: logically [num_blocks, H, N, C] (KV heads, tokens, and
C = K and V side by side, 2 * head_size elements), with the strides of the resolved
`KVCacheLayout`. The CPU backend asks for LBHNC: each layer's tensor is contiguous.
FlashAttention states no preference, so GPUs get LBNHC: a block sits in memory as
[N, H, C], and the layer's view is not contiguous. Block-outer layouts (BLHNC, ...)
interleave the layers of a block; head-major ones (LHBNC, BHLNC) split a block into one
run per head. Dimension 0 counts kernel blocks (num_blocks * ratio) when the attention
kernel splits vLLM's blocks. Older vLLM FlashAttention shaped a layer as
(2, num_blocks, N, H, D): K and V in a leading dimension, the block in dimension 1.

So the block dimension is told or found, never assumed: `block_dim` (0 for vLLM 0.32,
`VLLM_BLOCK_DIM`) or else the one dimension of size `num_blocks`; several such
dimensions are refused as ambiguous. Everything else in the layer tensor belongs to the
block, K and V alike. On the wire one block of one layer is its elements in memory order
(dimensions by decreasing stride): the same bytes whether the block is one run of memory
or several. Peers must agree on the block's shape, memory order and dtype (`layout`,
refused field by field by `check_layout`; nccl, which moves run by run, also on the runs).

On CPU the views point straight into the engine's own KV tensors, one per run: a pull is
received into the destination blocks and sent from the source blocks with no copy of
ours. KV tensors on an accelerator are staged through host memory: the sender gathers the
asked blocks into one host buffer; the receiver fills a host buffer and then copies it
into its blocks (`PendingWrite.commit`). NCCL moves device memory itself, so
`read_rows`/`write_rows` never stage.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shuffleinfer.kv.errors import KVTransferError

VLLM_BLOCK_DIM = 0
"""The block dimension of the per-layer tensors vLLM 0.32 registers ([B, H, N, C])."""

_ROWS_ONLY_FIELDS = frozenset({"block_run_bytes"})
"""Layout fields that only nccl needs equal (it sends and receives run by run)."""


@dataclass(frozen=True)
class BlockFormat:
    """How one block of one layer is laid out; peers must agree (`KVCacheViews.layout`)."""

    block_bytes: int
    """Bytes of one block of one layer."""
    block_shape: list[int]
    """The block's dims as the layer tensor orders them, without the block dim."""
    block_order: list[int]
    """`block_shape`'s dims in memory order, outermost first (e.g. [1, 0, 2]: a [H, N, C]
    block stored as [N, H, C])."""
    block_run_bytes: int
    """Bytes of each contiguous run of a block (= block_bytes when it is one run)."""


def _stretches(block_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first id, count) of each stretch of consecutive ids in `block_ids`, in order."""
    stretches: list[tuple[int, int]] = []
    for b in block_ids:
        if stretches and stretches[-1][0] + stretches[-1][1] == b:
            stretches[-1] = (stretches[-1][0], stretches[-1][1] + 1)
        else:
            stretches.append((b, 1))
    return stretches


def block_spans(geometries: Sequence[tuple[int, int, int]], block_ids: tuple[int, ...]
                ) -> list[tuple[int, int]]:
    """(start, bytes) of the blocks `block_ids` of each layer in turn, for layers whose
    block 0 starts at `start`, blocks `stride` bytes apart and `size` long (`geometries`:
    one (start, stride, size) per layer): one span per stretch of consecutive ids when
    blocks lie back to back, else one per block."""
    stretches, singles = _stretches(block_ids), [(b, 1) for b in block_ids]
    # One comprehension: on a one-block pull's critical path, a loop of one per layer
    # cost twice as much here, run with the caches cold.
    return [(start + first * stride, count * size) for start, stride, size in geometries
            for first, count in (stretches if stride == size else singles)]


@dataclass(frozen=True)
class _LayerBlocks:
    """One layer's cache as bytes: dim 0 the block, the others in memory order."""

    blocks: torch.Tensor
    """uint8 [num_blocks, *interior]; a view of the engine's tensor."""
    num_outer: int
    """How many leading interior dims cut a block into runs (0: one run per block)."""
    host_rows: np.ndarray | None = None
    """uint8 [num_blocks, block_bytes] over the same memory, when each block is one run
    in host memory: a block's bytes are then one cheap index away (`host_views`)."""
    geometry: tuple[int, int, int] | None = None
    """With `host_rows`: (address of block 0, bytes from one block to the next, bytes of
    a block), for `block_spans`."""

    def host_views(self, block_ids: tuple[int, ...]) -> list[memoryview]:
        """The blocks' bytes in order as memoryviews of host memory, one per stretch of
        consecutive block ids when blocks lie back to back (fewer, longer copies and
        socket calls), else one per contiguous run of each block."""
        rows = self.host_rows
        if rows is None:
            return [run.numpy().data for b in block_ids for run in self.runs(b)]
        if rows.strides[0] != rows.shape[1]:
            return [rows[b].data for b in block_ids]
        return [rows[first:first + count].reshape(-1).data
                for first, count in _stretches(block_ids)]

    def host_spans(self, block_ids: tuple[int, ...]) -> list[tuple[int, int]]:
        """(address, bytes) of each of `host_views(block_ids)`, found without making the
        views (for copies by address: a pull's few hundred views cost ~0.1 ms)."""
        if self.geometry is None:
            return [(run.data_ptr(), run.numel()) for b in block_ids for run in self.runs(b)]
        return block_spans([self.geometry], block_ids)

    def runs(self, block_id: int) -> list[torch.Tensor]:
        """The block's contiguous runs as 1-D uint8 views, in memory order."""
        block = self.blocks[block_id]
        if self.num_outer == 0:
            return [block.reshape(-1)]
        flat = block.flatten(self.num_outer)
        return [flat[idx] for idx in itertools.product(*map(range, flat.shape[:-1]))]


@dataclass
class PendingWrite:
    """Where a pull lands; `commit()` once every byte has arrived."""

    views: list[memoryview]
    _staging: torch.Tensor | None = None
    _layers: list[_LayerBlocks] | None = None
    _index: torch.Tensor | None = None

    def commit(self) -> None:
        """Copy staged bytes into the KV blocks (nothing to do without staging)."""
        if self._staging is None or self._layers is None or self._index is None:
            return
        for layer, staged in zip(self._layers, self._staging, strict=True):
            dest = layer.blocks
            dest.index_copy_(0, self._index.to(dest.device),
                             staged.view(-1, *dest.shape[1:]).to(dest.device))
        if self._layers[0].blocks.device.type == "cuda":
            torch.cuda.synchronize(self._layers[0].blocks.device)


def find_block_dim(name: str, shape: tuple[int, ...], num_blocks: int | None,
                   block_dim: int | None) -> tuple[int, int]:
    """The block dimension of a layer's tensor and how many entries of it make one block
    (kernel blocks per block; 1 unless the kernel splits blocks). Raises ValueError when
    it cannot tell: no hint, no dimension of size `num_blocks`, or several."""
    if block_dim is not None:
        if not -len(shape) <= block_dim < len(shape):
            raise ValueError(f"KV cache of {name}: block_dim {block_dim} is out of range "
                             f"for shape {list(shape)}")
        dim = block_dim % len(shape)
        if num_blocks is None:
            return dim, 1
        if shape[dim] % num_blocks:
            raise ValueError(f"KV cache of {name}: dimension {dim} of shape {list(shape)} "
                             f"is not a multiple of num_blocks={num_blocks}")
        return dim, shape[dim] // num_blocks
    if num_blocks is None:
        raise ValueError("the block dimension needs a hint: pass block_dim or num_blocks")
    matches = [d for d, size in enumerate(shape) if size == num_blocks]
    if len(matches) != 1:
        which = f"dimensions {matches} all have" if matches else "no dimension has"
        raise ValueError(f"KV cache of {name}: cannot tell the block dimension of shape "
                         f"{list(shape)}: {which} num_blocks={num_blocks} entries; "
                         f"pass block_dim")
    return matches[0], 1


def _memory_order(name: str, shape: list[int], strides: list[int]) -> list[int]:
    """A block's dims, outermost in memory first: size-1 dims (their stride means nothing)
    first, then by decreasing stride. Raises ValueError if two dims overlap in memory."""
    ones = [d for d, size in enumerate(shape) if size == 1]
    rest = sorted((d for d, size in enumerate(shape) if size != 1), key=lambda d: -strides[d])
    # Each dim must step over the whole of the next one, and the innermost over one element.
    spans = [strides[d] * shape[d] for d in rest[1:]] + [1]
    for d, span in zip(rest, spans, strict=True):
        if strides[d] < span:
            raise ValueError(f"KV cache of {name}: the dims of a block overlap in memory "
                             f"(shape {shape}, strides {strides})")
    return ones + rest


def _num_outer(shape: torch.Size, strides: tuple[int, ...]) -> int:
    """How many leading dims to iterate so that the remaining ones are one dense run."""
    dense_from, expected = len(shape), 1
    for d in reversed(range(len(shape))):
        if shape[d] != 1 and strides[d] != expected:
            break
        expected *= shape[d]
        dense_from = d
    return dense_from


def _layer_blocks(name: str, cache: torch.Tensor, num_blocks: int | None,
                  block_dim: int | None) -> tuple[_LayerBlocks, BlockFormat]:
    """One layer's blocks and their format."""
    if cache.dim() < 2:
        raise ValueError(f"KV cache of {name} has shape {list(cache.shape)}, not a view of "
                         f"blocks: only attention layers' caches can be handed over")
    dim, ratio = find_block_dim(name, tuple(cache.shape), num_blocks, block_dim)
    if ratio > 1:  # kernel blocks: group them, as vLLM's group_kernel_blocks does
        cache = cache.unflatten(dim, (cache.shape[dim] // ratio, ratio))
    interior = [d for d in range(cache.dim()) if d != dim]
    block_shape = [int(cache.shape[d]) for d in interior]
    order = _memory_order(name, block_shape, [cache.stride(d) for d in interior])
    try:
        blocks = cache.permute(dim, *(interior[i] for i in order)).view(torch.uint8)
    except RuntimeError as e:  # the innermost dim is not dense: no byte view
        raise ValueError(f"KV cache of {name}: no byte view of its blocks: {e}") from e
    num_outer = _num_outer(blocks.shape[1:], blocks.stride()[1:])
    block_format = BlockFormat(math.prod(blocks.shape[1:]), block_shape, order,
                               math.prod(blocks.shape[1 + num_outer:]))
    host_rows = blocks.view(blocks.shape[0], -1).numpy() \
        if num_outer == 0 and blocks.device.type == "cpu" else None
    geometry = None if host_rows is None else \
        (blocks.data_ptr(), blocks.stride(0), host_rows.shape[1])
    return _LayerBlocks(blocks, num_outer, host_rows, geometry), block_format


class KVCacheViews:
    """The engine's KV cache seen as whole blocks of bytes, layer by layer.

    `num_blocks` (vLLM's `KVCacheConfig.num_blocks`) and `block_dim` locate the block
    dimension (`find_block_dim`); at least one is needed. Raises ValueError for tensors
    that are not views of blocks or whose layers differ."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], *, num_blocks: int | None = None,
                 block_dim: int | None = None, stage_through_host: bool | None = None,
                 identity: dict[str, object] | None = None) -> None:
        """`identity`: more fields peers must agree on (the connector sends the model and
        the tensor-parallel size), checked with the layout."""
        self._identity = dict(identity or {})
        if not kv_caches:
            raise ValueError("no KV cache tensors to serve")
        self.layer_names = sorted(kv_caches)
        first = kv_caches[self.layer_names[0]]
        self._layers: list[_LayerBlocks] = []
        formats: list[BlockFormat] = []
        for name in self.layer_names:
            cache = kv_caches[name]
            if cache.dtype != first.dtype:
                raise ValueError(f"KV cache of {name} is {cache.dtype}, not {first.dtype}")
            layer, block_format = _layer_blocks(name, cache, num_blocks, block_dim)
            if block_format != (formats or [block_format])[0]:
                raise ValueError(f"KV cache of {name} has blocks {block_format}, "
                                 f"{self.layer_names[0]} {formats[0]}")
            self._layers.append(layer)
            formats.append(block_format)
        self.stage = (first.device.type != "cpu") if stage_through_host is None \
            else stage_through_host
        self.dtype = str(first.dtype)
        self.block_format = formats[0]
        self.block_bytes = self.block_format.block_bytes
        found = [layer.geometry for layer in self._layers if layer.geometry is not None]
        self._geometry = found if len(found) == len(self._layers) else None
        self._layout = {**self._identity, "num_layers": len(self._layers),
                        **asdict(self.block_format), "dtype": self.dtype}

    @property
    def device(self) -> torch.device:
        """Where the KV cache lives."""
        return self._layers[0].blocks.device

    @property
    def layout(self) -> dict[str, object]:
        """What a peer's blocks must match, sent with every pull."""
        return dict(self._layout)

    def check_layout(self, layout: dict[str, object], *, rows: bool = False) -> None:
        """Called by the serving side for each pull: raise naming the first field where
        the peer's layout differs from ours (`rows`: the pull moves nccl rows)."""
        for key, value in self.layout.items():
            if key in _ROWS_ONLY_FIELDS and not rows:
                continue
            if layout.get(key) != value:
                raise KVTransferError(
                    f"KV layout mismatch: {key} is {value} here, {layout.get(key)} at the peer"
                )

    def _index(self, block_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=device)

    def read_views(self, block_ids: tuple[int, ...]) -> list[memoryview]:
        """The bytes of `block_ids`, layer by layer, ready to send."""
        if not self.stage:
            return [view for views in self.layer_views(block_ids) for view in views]
        staged = torch.stack([
            layer.blocks.index_select(0, self._index(block_ids, layer.blocks.device))
            .reshape(len(block_ids), -1) for layer in self._layers]).cpu()
        flat = staged.numpy()
        return [flat[layer, i].data for layer in range(len(self._layers))
                for i in range(len(block_ids))]

    def host_spans(self, block_ids: tuple[int, ...]) -> list[tuple[int, int]]:
        """(address, bytes) of each of `read_views(block_ids)` (the same spans receive a
        pull by address); host-memory caches only (`stage` False)."""
        if self.stage:
            raise ValueError("a cache staged through host memory has no host spans")
        if self._geometry is not None:
            return block_spans(self._geometry, block_ids)
        return [span for layer in self._layers for span in layer.host_spans(block_ids)]

    def block_geometry(self) -> list[tuple[int, int, int]] | None:
        """Each layer's `(address of block 0, stride, block bytes)` (`block_spans`), when
        every block of every layer is one run of host memory; else None."""
        return None if self.stage else self._geometry

    def layer_views(self, block_ids: tuple[int, ...]) -> list[list[memoryview]]:
        """`read_views` of a host-memory cache, layer by layer."""
        return [layer.host_views(block_ids) for layer in self._layers]

    def write_views(self, block_ids: tuple[int, ...]) -> PendingWrite:
        """Where to receive the bytes of `block_ids` (same byte order as `read_views`)."""
        if not self.stage:
            return PendingWrite(self.read_views(block_ids))  # the same memory
        staging = torch.empty(len(self._layers), len(block_ids), self.block_bytes,
                              dtype=torch.uint8)
        flat = staging.numpy()
        views = [flat[layer, i].data for layer in range(len(self._layers))
                 for i in range(len(block_ids))]
        return PendingWrite(views, staging, self._layers,
                            self._index(block_ids, torch.device("cpu")))

    def read_rows(self, block_ids: tuple[int, ...]) -> list[torch.Tensor]:
        """Each contiguous run of each block of each layer as a 1-D uint8 tensor on the
        cache's device, in `read_views` byte order: what NCCL sends from."""
        return [run for layer in self._layers for b in block_ids for run in layer.runs(b)]

    def write_rows(self, block_ids: tuple[int, ...]) -> list[torch.Tensor]:
        """The destination rows of `block_ids` (same order as `read_rows`)."""
        return self.read_rows(block_ids)
