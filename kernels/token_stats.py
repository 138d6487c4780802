"""One-pass softmax statistics over the vocabulary: the kernel behind token_stats and the
forward of selected_logprobs.

Each row's vocabulary is split across `num_splits` programs. A program reads its columns once, in
tiles of BLOCK_V, keeping an online state in float32 registers:
    m   running max of the (scaled) logits        d  sum exp(z - m)
    t   sum (z - m) exp(z - m)  (entropy = log d - t / d, shifted so large logits lose nothing)
    top1 index (first on ties) and top2 value     n_bad  count of NaN / +inf entries
    best Gumbel-perturbed score, its index and its logit (when sampling)
A second kernel merges the partial states of a row and writes the outputs. No probability and no
noise tensor of size V ever exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .outputs import row_stat_outputs
from .utils import row_layout, vocab_split

IGNORE_INDEX = -100
_NUM_FLOAT_FIELDS = 6  # m, d, t, top2, best, best_logit
_NUM_INT_FIELDS = 3  # top1_idx, best_idx, n_bad


@triton.jit
def _uniform_open(seed, cols, row):
    """Counter-based uniform in (0, 1) for (row, col): Philox keyed by seed."""
    zero = cols * 0
    bits, _, _, _ = tl.philox(seed, cols.to(tl.uint32), (zero + row).to(tl.uint32), zero.to(tl.uint32),
                              zero.to(tl.uint32))
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _partial_kernel(
    logits_ptr, part_ptr, part_idx_ptr,
    vocab, cols_per_split, field_stride,
    stride_outer, stride_inner, inner_size,
    scale, inv_temperature, seed,
    TOP2: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    row64 = row.to(tl.int64)
    row_ptr = logits_ptr + (row64 // inner_size) * stride_outer + (row64 % inner_size) * stride_inner
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, vocab)
    lanes = tl.arange(0, BLOCK_V)

    m = float("-inf")
    d = 0.0
    t = 0.0
    n_bad = 0
    top1_idx = col_start
    top2 = float("-inf")
    best = float("-inf")
    best_idx = col_start
    best_logit = float("-inf")
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + lanes
        x = tl.load(row_ptr + cols, mask=cols < col_end, other=float("-inf")).to(tl.float32)
        ok = (x == x) & (x != float("inf"))
        n_bad += tl.sum((ok == 0).to(tl.int32), axis=0)
        x = tl.where(ok, x, float("-inf")) * scale

        tile_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, tile_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)
        t = alpha * (t + tl.where(d > 0, m - m_ref, 0.0) * d) + tl.sum(tl.where(e > 0, x - m_ref, 0.0) * e, axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        if TOP2:
            tile_idx = tl.min(tl.where(x == tile_max, cols, vocab), axis=0)
            tile_top2 = tl.max(tl.where(cols == tile_idx, float("-inf"), x), axis=0)
            top2 = tl.maximum(top2, tl.maximum(tl.minimum(m, tile_max), tile_top2))
            top1_idx = tl.where(tile_max > m, tile_idx, top1_idx)
        m = m_new
        if SAMPLE:
            u = _uniform_open(seed, cols, row)
            score = tl.where(x > float("-inf"), x * inv_temperature - tl.log(-tl.log(u)), float("-inf"))
            tile_best = tl.max(score, axis=0)
            tile_best_idx = tl.min(tl.where(score == tile_best, cols, vocab), axis=0)
            tile_best_logit = tl.max(tl.where(cols == tile_best_idx, x, float("-inf")), axis=0)
            better = tile_best > best
            best_idx = tl.where(better, tile_best_idx, best_idx)
            best_logit = tl.where(better, tile_best_logit, best_logit)
            best = tl.maximum(best, tile_best)

    slot = row64 * n_splits + split
    tl.store(part_ptr + slot, m)
    tl.store(part_ptr + field_stride + slot, d)
    tl.store(part_ptr + 2 * field_stride + slot, t)
    tl.store(part_ptr + 3 * field_stride + slot, top2)
    tl.store(part_ptr + 4 * field_stride + slot, best)
    tl.store(part_ptr + 5 * field_stride + slot, best_logit)
    tl.store(part_idx_ptr + slot, top1_idx)
    tl.store(part_idx_ptr + field_stride + slot, best_idx)
    tl.store(part_idx_ptr + 2 * field_stride + slot, n_bad)


@triton.jit
def _merge_kernel(
    part_ptr, part_idx_ptr, field_stride, n_splits,
    logits_ptr, stride_outer, stride_inner, inner_size, scale,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, SAMPLE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    STORE_ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    valid = j < n_splits
    slot = row64 * n_splits + j
    m_j = tl.load(part_ptr + slot, mask=valid, other=float("-inf"))
    d_j = tl.load(part_ptr + field_stride + slot, mask=valid, other=0.0)
    t_j = tl.load(part_ptr + 2 * field_stride + slot, mask=valid, other=0.0)
    n_bad = tl.sum(tl.load(part_idx_ptr + 2 * field_stride + slot, mask=valid, other=0), axis=0)

    m = tl.max(m_j, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(m_j - m_ref)
    d = tl.sum(d_j * w, axis=0)
    t = tl.sum(w * (t_j + tl.where(d_j > 0, m_j - m_ref, 0.0) * d_j), axis=0)
    log_d = tl.log(d)
    invalid = (n_bad > 0) | (m == float("-inf"))
    nan = float("nan")

    if STORE_ENTROPY:
        tl.store(entropy_ptr + row64, tl.where(invalid, nan, log_d - t / d))
    if STORE_LSE:
        tl.store(lse_ptr + row64, tl.where(invalid, nan, m_ref + log_d))
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row64)
        ignored = target == IGNORE_INDEX
        row_ptr = logits_ptr + (row64 // inner_size) * stride_outer + (row64 % inner_size) * stride_inner
        x_t = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32) * scale
        logprob = tl.where(invalid, nan, x_t - m_ref - log_d)
        tl.store(target_logprob_ptr + row64, tl.where(ignored, 0.0, logprob))
    if TOP2:
        j_top = tl.min(tl.where(valid & (m_j == m), j, BLOCK_S), axis=0)
        top1_idx = tl.sum(tl.where(j == j_top, tl.load(part_idx_ptr + slot, mask=valid, other=0), 0), axis=0)
        top2_j = tl.load(part_ptr + 3 * field_stride + slot, mask=valid, other=float("-inf"))
        top2 = tl.maximum(tl.max(top2_j, axis=0), tl.max(tl.where(j == j_top, float("-inf"), m_j), axis=0))
        top1_prob = 1.0 / d
        tl.store(top1_prob_ptr + row64, tl.where(invalid, nan, top1_prob))
        tl.store(margin_ptr + row64, tl.where(invalid, nan, (1.0 - tl.exp(top2 - m_ref)) / d))
        tl.store(argmax_ptr + row64, tl.where(invalid, -1, top1_idx).to(tl.int64))
        if SAMPLE:
            best_j = tl.load(part_ptr + 4 * field_stride + slot, mask=valid, other=float("-inf"))
            best = tl.max(best_j, axis=0)
            j_best = tl.min(tl.where(valid & (best_j == best), j, BLOCK_S), axis=0)
            best_idx = tl.sum(tl.where(j == j_best, tl.load(part_idx_ptr + field_stride + slot, mask=valid,
                                                                other=0), 0), axis=0)
            best_logit = tl.max(tl.where(j == j_best, tl.load(part_ptr + 5 * field_stride + slot, mask=valid,
                                                                  other=float("-inf")), float("-inf")), axis=0)
            tl.store(sampled_ptr + row64, tl.where(invalid, -1, best_idx).to(tl.int64))
            tl.store(sampled_prob_ptr + row64, tl.where(invalid, nan, tl.exp(best_logit - m_ref) / d))
        else:
            tl.store(sampled_ptr + row64, tl.where(invalid, -1, top1_idx).to(tl.int64))
            tl.store(sampled_prob_ptr + row64, tl.where(invalid, nan, top1_prob))


def softmax_row_stats(
    logits: torch.Tensor,
    *,
    scale: float = 1.0,
    temperature: float = 0.0,
    seed: int = 0,
    targets: torch.Tensor | None = None,
    top2: bool = True,
    entropy: bool = True,
    lse: bool = False,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the two kernels on logits [..., V]; returns the requested outputs, each of shape [N].

    scale multiplies the logits before the softmax (1 / temperature for log-probs). With top2,
    returns top1_prob, margin, argmax, sampled and sampled_prob; sampling is Gumbel-max on
    logits / temperature when temperature > 0, argmax otherwise. Targets equal to -100 give 0.
    Rows holding NaN or +inf, or only -inf, give NaN statistics and index -1.
    """
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    device = logits.device
    logits, stride_outer, stride_inner, inner_size = row_layout(logits)
    block_v, cols_per_split, n_splits = vocab_split(n_rows, vocab, device, block_v, num_splits)
    sample = top2 and temperature > 0

    out = row_stat_outputs(n_rows, device, entropy=entropy, lse=lse, targets=targets is not None, top2=top2)
    if n_rows == 0:
        return out

    field_stride = n_rows * n_splits
    part = torch.empty(_NUM_FLOAT_FIELDS * field_stride, dtype=torch.float32, device=device)
    part_idx = torch.empty(_NUM_INT_FIELDS * field_stride, dtype=torch.int32, device=device)
    _partial_kernel[(n_rows, n_splits)](
        logits, part, part_idx,
        vocab, cols_per_split, field_stride,
        stride_outer, stride_inner, inner_size,
        float(scale), 1.0 / temperature if sample else 1.0, int(seed) & 0x7FFFFFFFFFFFFFFF,
        TOP2=top2, SAMPLE=sample, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    dummy = part  # pointer for outputs a flag switches off; never read or written
    _merge_kernel[(n_rows,)](
        part, part_idx, field_stride, n_splits,
        logits, stride_outer, stride_inner, inner_size, float(scale),
        targets.reshape(-1).contiguous() if targets is not None else part_idx,
        out.get("entropy", dummy), out.get("lse", dummy), out.get("target_logprob", dummy),
        out.get("top1_prob", dummy), out.get("margin", dummy),
        out.get("argmax", dummy), out.get("sampled", dummy), out.get("sampled_prob", dummy),
        TOP2=top2, SAMPLE=sample, HAS_TARGETS=targets is not None,
        STORE_ENTROPY=entropy, STORE_LSE=lse, BLOCK_S=max(triton.next_power_of_2(n_splits), 2),
        num_warps=1,
    )
    return out
