"""Block views of the KV cache layouts vLLM hands over: the block dimension is found or
refused, a pull between two workers moves whole blocks (K and V) into the right blocks
over tcp and shm, directly and staged through host memory as on a GPU, and peers whose
blocks differ are refused naming the field."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shuffleinfer.kv.block_views import VLLM_BLOCK_DIM, KVCacheViews, find_block_dim
from shuffleinfer.kv.transport import KVTransferError
from tests.kv.conftest import (
    NUM_BLOCKS,
    WorkerFactory,
    as_bytes,
    hand_over,
    kv_caches,
    lease_and_load,
    legacy_flash_kv_caches,
    vllm_kv_caches,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("shape", "block_dim", "expected"), [
    ((8, 4, 16, 128), 0, (0, 1)),  # vLLM 0.32: [B, H, N, C]
    ((16, 4, 16, 128), 0, (0, 2)),  # the kernel splits each block in two
    ((2, 8, 16, 4, 64), None, (1, 1)),  # FlashAttention before 0.32: found by its size
    ((8, 4, 16, 128), None, (0, 1)),
    ((2, 8, 16, 4, 64), 1, (1, 1)),
    ((2, 8, 8, 4, 64), None, "dimensions \\[1, 2\\] all have num_blocks=8"),
    ((2, 6, 16, 4, 64), None, "no dimension has num_blocks=8"),
    ((12, 4, 16, 128), 0, "not a multiple of num_blocks=8"),
    ((8, 4), 2, "out of range"),
])
def test_block_dim_is_told_or_found_and_never_guessed(
        shape: tuple[int, ...], block_dim: int | None, expected: tuple[int, int] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            find_block_dim("layer", shape, 8, block_dim)
    else:
        assert find_block_dim("layer", shape, 8, block_dim) == expected


def test_without_any_hint_the_block_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="pass block_dim or num_blocks"):
        KVCacheViews(kv_caches(0))


def test_a_raw_buffer_is_not_taken_for_blocks() -> None:
    # vLLM registers the raw buffer itself for layers without per-layer views (Mamba).
    with pytest.raises(ValueError, match="not a view of blocks"):
        KVCacheViews({"model.layers.0.mixer": torch.zeros(4096, dtype=torch.int8)},
                     num_blocks=NUM_BLOCKS, block_dim=VLLM_BLOCK_DIM)


CacheFactory = Callable[[int], dict[str, torch.Tensor]]

# name: (caches(seed), the block_dim hint a caller passes, where the blocks really are)
LAYOUTS: dict[str, tuple[CacheFactory, int | None, int]] = {
    "cpu backend (LBHNC)": (lambda seed: vllm_kv_caches(seed, "LBHNC"), VLLM_BLOCK_DIM, 0),
    "flash-attn (LBNHC)": (lambda seed: vllm_kv_caches(seed, "LBNHC"), VLLM_BLOCK_DIM, 0),
    "block-outer (BLHNC)": (lambda seed: vllm_kv_caches(seed, "BLHNC"), VLLM_BLOCK_DIM, 0),
    "head-major (LHBNC)": (lambda seed: vllm_kv_caches(seed, "LHBNC"), VLLM_BLOCK_DIM, 0),
    # The kernel splits each block of 16 tokens in two: dim 0 has 2 * num_blocks rows.
    "kernel blocks (LBNHC, 16 = 2 x 8)": (
        lambda seed: vllm_kv_caches(seed, "LBNHC", kernel_block_size=8), VLLM_BLOCK_DIM, 0),
    # No hint: found as the one dim of size num_blocks.
    "flash-attn before 0.32 (2, B, N, H, D)": (legacy_flash_kv_caches, None, 1),
}


def _block(cache: torch.Tensor, block_id: int, dim: int) -> bytes:
    """One block of a layer, every element (K and V; all its kernel blocks), as bytes."""
    blocks = cache.unflatten(dim, (NUM_BLOCKS, -1)).select(dim, block_id)
    return as_bytes(blocks)


@pytest.mark.parametrize("stage_through_host", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pull_moves_whole_blocks_into_the_right_blocks(
        make_worker: WorkerFactory, layout: str, transport: str,
        stage_through_host: bool) -> None:
    make_caches, block_dim, dim = LAYOUTS[layout]
    src, dst = make_caches(0), make_caches(1)
    before = {name: [_block(t, b, dim) for b in range(NUM_BLOCKS)]
              for name, t in dst.items()}
    prefill = make_worker(src, block_dim=block_dim, stage_through_host=stage_through_host)
    decode = make_worker(dst, block_dim=block_dim, stage_through_host=stage_through_host,
                         transport=transport)
    remote, local = (6, 1, 3), (2, 7, 5)  # neither side contiguous nor in order
    lease, load = lease_and_load(prefill, "t-layout", remote=remote, local=local)
    hand_over(prefill, decode, lease, load)

    assert decode.get_block_ids_with_load_errors() == set()
    stats = decode.get_stats()
    assert stats is not None and stats.data[f"num_transfers_{transport}"] == 1
    moved = dict(zip(local, remote, strict=True))
    for name in src:
        for b in range(NUM_BLOCKS):
            expected = _block(src[name], moved[b], dim) if b in moved else before[name][b]
            assert _block(dst[name], b, dim) == expected, (name, b)


def test_both_halves_of_a_block_move_when_k_and_v_lead(make_worker: WorkerFactory) -> None:
    src, dst = legacy_flash_kv_caches(0), legacy_flash_kv_caches(1)
    prefill, decode = make_worker(src), make_worker(dst, transport="tcp")
    lease, load = lease_and_load(prefill, "t-kv", remote=(4,), local=(0,))
    hand_over(prefill, decode, lease, load)
    for name in src:
        assert torch.equal(dst[name][0, 0], src[name][0, 4])  # K
        assert torch.equal(dst[name][1, 0], src[name][1, 4])  # V


def _views(layout: str) -> KVCacheViews:
    make_caches, block_dim, _ = LAYOUTS[layout]
    return KVCacheViews(make_caches(0), num_blocks=NUM_BLOCKS, block_dim=block_dim)


@pytest.mark.parametrize(("ours", "theirs", "rows", "field"), [
    # Same shape, but a block is [H, N, C] in memory on one side, [N, H, C] on the other.
    ("cpu backend (LBHNC)", "flash-attn (LBNHC)", False, "block_order"),
    ("cpu backend (LBHNC)", "flash-attn before 0.32 (2, B, N, H, D)", False, "block_shape"),
    # One run per block against one per head: the same bytes, but not the same nccl rows.
    ("cpu backend (LBHNC)", "head-major (LHBNC)", True, "block_run_bytes"),
])
def test_peers_whose_blocks_differ_are_refused_naming_the_field(
        ours: str, theirs: str, rows: bool, field: str) -> None:
    with pytest.raises(KVTransferError, match=f"layout mismatch: {field} is"):
        _views(ours).check_layout(_views(theirs).layout, rows=rows)


def test_blocks_stored_alike_are_accepted_whatever_the_layers_do() -> None:
    # Layer-outer or block-outer, a block of a layer is the same [H, N, C] run.
    _views("cpu backend (LBHNC)").check_layout(_views("block-outer (BLHNC)").layout,
                                               rows=True)
    # Head-major splits a block into runs, but its bytes come in the same order.
    _views("cpu backend (LBHNC)").check_layout(_views("head-major (LHBNC)").layout)
