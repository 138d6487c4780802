"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a vocabulary reduction should launch to fill the device."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Describe the rows of x [..., V] (unit-stride last dim) by two strides.

    Row r starts at (r // inner_size) * stride_outer + (r % inner_size) * stride_inner. Leading
    dims that cannot be folded into two strides are made contiguous (a copy in x's own dtype).
    Returns (x, stride_outer, stride_inner, inner_size).
    """
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    folded: list[list[int]] = []
    for size, stride in dims:
        if folded and folded[-1][1] == stride * size:
            folded[-1] = [folded[-1][0] * size, stride]
        else:
            folded.append([size, stride])
    if not folded:
        return x, 0, 0, 1
    if len(folded) == 1:
        return x, 0, folded[0][1], max(folded[0][0], 1)
    if len(folded) == 2:
        return x, folded[0][1], folded[1][1], folded[1][0]
    x = x.contiguous()
    return x, 0, x.shape[-1], max(x.numel() // x.shape[-1], 1)


def default_block_v(vocab: int, element_size: int) -> int:
    """Tile width of the log-prob backward pass: 4 KiB of logits per tile (2048 bf16/fp16, 1024 float32)."""
    return min(4096 // element_size, max(16, triton.next_power_of_2(vocab)))


def stats_block_v(vocab: int) -> int:
    """Tile width of the statistics pass (token_stats, log-sum-exp): 1024 columns, 4 warps, in every dtype.

    Measured on an H200 (benchmarks/results/kernel_layouts_cuda_2026-11-27.md, bf16, V = 126464):
    1024-column tiles beat 2048 and 4096 at N = 256 and 4096, greedy, sampling and log-sum-exp alike,
    and prefetching one tile beat two or three.
    """
    return min(1024, max(16, triton.next_power_of_2(vocab)))


def default_num_warps(block_v: int) -> int:
    """Warps of a vocabulary pass: 8 columns of each tile per thread (one 16-byte load of bf16), so the
    per-lane state of token_stats fits ~80 registers."""
    return max(1, min(8, block_v // 256))


def vocab_split(n_rows: int, vocab: int, element_size: int, device: torch.device, block_v: int | None,
                num_splits: int | None):
    """Pick the tile width and how many programs share one row's vocabulary.

    Returns (block_v, cols_per_split, num_splits); every split but the last covers cols_per_split
    columns, a multiple of block_v.
    """
    if block_v is None:
        block_v = default_block_v(vocab, element_size)
    n_tiles = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(target_programs(device), max(n_rows, 1))
    num_splits = max(1, min(num_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, num_splits) * block_v
    return block_v, cols_per_split, triton.cdiv(vocab, cols_per_split)
