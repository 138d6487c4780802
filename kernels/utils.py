"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device, programs_per_sm: int = 8) -> int:
    """How many programs of a vocabulary reduction the device holds at once (one wave)."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another
    return programs_per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def programs_per_sm(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of `num_warps` warps that one SM holds at once, as the compiled kernel's registers allow.

    compiled: a Triton CompiledKernel for CUDA. Registers are allocated per warp in units of 256; the
    SM's register file, its thread limit and its 32 resident blocks bound the count (the vocabulary
    passes use a few hundred bytes of shared memory, never the limit).
    """
    compiled._init_handles()  # loads the binary, which sets n_regs
    props = torch.cuda.get_device_properties(device)
    warp_registers = -(-compiled.n_regs * 32 // 256) * 256
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // (warp_registers * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    return max(1, min(by_registers, by_threads, 32))


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
    """Tile width of the vocabulary passes: 4 KiB of logits per tile (2048 bf16/fp16, 1024 float32)."""
    return min(4096 // element_size, max(16, triton.next_power_of_2(vocab)))


def stats_num_warps(block_v: int, element_size: int) -> int:
    """Warps of the statistics pass (token_stats, log-sum-exp) over tiles of block_v columns: two 16-byte
    loads per thread and tile, 1 to 4 warps (4 on the default 4 KiB tiles of default_block_v).

    Measured on an H200 (bf16, V = 126464, CUDA graphs, kernel_layouts_cuda_2026-11-27_run3.md) with the
    kernel of slots: 2048 columns on 4 warps with one tile prefetched was the best layout or within 1.5
    points of it in all six cases (greedy, T = 1 and log-sum-exp at N = 256 and 4096). Greedy at N = 4096:
    85.3% of copy bandwidth, against 77.7% for 512 columns on 1 warp and 80.7% for 1024 on 4 without the
    prefetch; T = 1: 79.6% against 73.6% for 1024 on 4. As the default (_run4.md): 88.5% greedy, 82.1% at
    T = 1, no other of ten layouts better by more than 2.2 points. (The same tiles without the prefetch
    were faster in 11 of 12 cases of _run4 and _run5, so aligned rows now go without it.) The kernel of
    lanes takes the same layout: on 8 warps its 16-bit rows would hold 48-80 registers instead of 80-161,
    but run 1.4-2.2 more SASS instructions per element in the loop over whole tiles, float32 rows 3.0-3.75
    more (its per-tile reductions spread over fewer columns per thread; Triton 3.6, sm_90, V = 126464,
    N = 4096).
    """
    return max(1, min(4, block_v * element_size // 1024))


def default_num_warps(block_v: int) -> int:
    """Warps of the log-prob backward pass: 8 columns of each tile per thread (one 16-byte load of bf16)."""
    return max(1, min(8, block_v // 256))


def vocab_split(n_rows: int, vocab: int, element_size: int, device: torch.device, block_v: int | None,
                num_splits: int | None, programs_per_sm: int = 8):
    """Pick the tile width and how many programs share one row's vocabulary.

    By default the rows are split into as many parts as one wave of programs holds (programs_per_sm on
    every SM), never more: a second, mostly empty wave costs nearly as long as the first (on an H200,
    bf16 V = 126464, N = 256, greedy: 4 splits, one wave, 55% of copy bandwidth; 5 splits, 1.2 waves,
    45%; benchmarks/results/kernel_layouts_cuda_2026-11-27_run2.md).
    Returns (block_v, cols_per_split, num_splits); every split but the last covers cols_per_split
    columns, a multiple of block_v.
    """
    if block_v is None:
        block_v = default_block_v(vocab, element_size)
    n_tiles = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = target_programs(device, programs_per_sm) // max(n_rows, 1)
    num_splits = max(1, min(num_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, num_splits) * block_v
    return block_v, cols_per_split, triton.cdiv(vocab, cols_per_split)
