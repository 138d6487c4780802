"""One-pass softmax statistics over the vocabulary: the kernel behind token_stats and the
forward of selected_logprobs.

Each row's vocabulary is split across `num_splits` programs (one when there are enough rows). A
program reads its columns once, in tiles of BLOCK_V, and keeps float32 state in registers:
    m      running max of the logits (the sums are rescaled when it grows)
    d      sum 2^y,  y = x * c - m * c,  c = scale * log2(e)  (one FMA per logit)
    t      sum y 2^y  (entropy = ln 2 * (log2 d - t / d))  (shifted: no cancellation)
    dt     sum 2^(y / temperature), for sampling at temperature != 1
    top1   each lane's largest logit (a lane: a column position in the tile)
    m_col  the first column holding m
On rows Triton can prove 16-byte aligned (_partial_kernel), a tile is read as slots of VEC
consecutive columns, one 16-byte load per thread and slot (but float32 rows sampled at a
temperature other than 1 go to _partial_kernel_lanes), and m, d, t and dt are kept per slot:
a tile needs no cross-thread reduction and no barrier; each slot's sums are rescaled to its own
max, and a slot remembers the tile that raised its max so that m_col is found by rereading VEC
columns at the end. Other rows (_partial_kernel_lanes) keep one m per program (the tile max, a
cross-thread reduction, found in the tile that raised m) and the sums per lane. Either way the
state is reduced once per program. The second-largest logit is the larger of the other lanes'
top1 and the largest of m_col's own lane apart from m_col; the merge finds that one by rereading
the columns congruent to the row's argmax modulo BLOCK_V (one strided read of V / BLOCK_V logits,
under 2% of the row's bytes), so the loop keeps one running max per lane, not two. A row holding
NaN or +inf gets d = NaN, a row of only -inf gets d = 0: both are reported as invalid (NaN
statistics, index -1). A split row's programs store their states and a second kernel merges them
(_merge_kernel); when one program covers the row (from about one wave of rows on), it writes the
outputs itself with the same code (_write_row), so no second launch waits on the first.

Sampling draws two uniforms per row from one Philox call keyed by (seed, row) and inverts the
CDF of softmax(x / temperature) in a fixed column order that does not depend on the launch
layout: columns are grouped by their lane group (GROUP_W consecutive lanes of a BLOCK_V tile);
each program stores its per-group sums, the merge picks the group from the sums with the first
uniform, then rescans only that group's columns (GROUP_W per tile of the row) and picks the column
with the second. No noise and no probability tensor of size V ever exists. The column within the
group is exact in any layout; the group sums round differently with the split count and the
kernel, which moves a draw to another group only when the first uniform falls within that rounding
(~1e-7 of the row's mass) of a group boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atpo_fast import _checks

from .outputs import row_stat_outputs
from .utils import default_block_v, programs_per_sm, row_layout, stats_num_warps, vocab_split

IGNORE_INDEX = tl.constexpr(_checks.IGNORE_INDEX)  # a constexpr: jitted code may read no plain global
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
GROUP_W = 16  # lanes per sampling group
_FLOAT_FIELDS = ("m", "d", "t", "top2")


@triton.jit
def _row_start(logits_ptr, row64, stride_outer, stride_inner, inner_size):
    return logits_ptr + (row64 // inner_size) * stride_outer + (row64 % inner_size) * stride_inner


@triton.jit
def _first_tile(row_ptr, lanes, col_start, col_end, PREFETCH: tl.constexpr, BLOCK_V: tl.constexpr):
    """The end of a split's whole tiles, and with PREFETCH its first tile, in flight (else a placeholder)."""
    full_end = col_start + ((col_end - col_start) // BLOCK_V) * BLOCK_V
    x_next = lanes
    if PREFETCH:
        x_next = tl.load(row_ptr + col_start + lanes, mask=col_start + lanes < full_end)
    return full_end, x_next


@triton.jit
def _tile(row_ptr, start, lanes, x_next, full_end, col_end, PHASE: tl.constexpr, PREFETCH: tl.constexpr,
          BLOCK_V: tl.constexpr, SCALAR_BASE: tl.constexpr):
    """The logits at columns start + lanes (lanes: any shape of offsets below BLOCK_V) as float32, and the
    prefetched tile after it. Phase 0 reads whole tiles without a mask (with PREFETCH: x_next, while the
    next one is loaded); phase 1 the last, partial tile, its missing columns -inf.

    SCALAR_BASE reads whole tiles from a scalar pointer plus the constant lanes, and after the last whole
    tile prefetches that tile again (in bounds, unused) instead of masking each column: a thread's
    addresses become one register and immediate offsets. In the kernel of lanes (scalar loads) that
    took 3.8-4.6 instructions per element off the loop (Triton 3.6 / 3.9, sm_90). The kernel of slots
    keeps int32 columns: with its (optional) prefetch the scalar form saved ~0.5 but raised the bf16 T = 1
    one-program pass at V = 126464 from 64 to 71 registers (8 to 7 programs per SM); without it (the
    default) it saved 0.125 at the same registers (10.8 per element), not worth a second form.
    """
    cols = start + lanes
    if PHASE == 0:
        if PREFETCH:  # the next tile is in flight while this one is reduced
            x = x_next.to(tl.float32)
            if SCALAR_BASE:
                x_next = tl.load(row_ptr + tl.minimum(start + BLOCK_V, full_end - BLOCK_V) + lanes)
            else:
                x_next = tl.load(row_ptr + cols + BLOCK_V, mask=cols + BLOCK_V < full_end)
        elif SCALAR_BASE:
            x = tl.load(row_ptr + start + lanes).to(tl.float32)
        else:
            x = tl.load(row_ptr + cols).to(tl.float32)
    else:
        x = tl.load(row_ptr + cols, mask=cols < col_end, other=float("-inf")).to(tl.float32)
    return x, x_next


@triton.jit
def _rescaled(d, t, dt, m, shift, t_ratio, ENTROPY: tl.constexpr, TEMPERED: tl.constexpr):
    """The sums d, t, dt taken from the running max m to a new one: shift = m * c - (new max) * c (scalar
    or per slot, like m); all 0 while m is -inf (nothing summed yet)."""
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp2(shift))
    if ENTROPY:
        t = alpha * (t + shift * d)
    d = alpha * d
    if TEMPERED:
        dt = tl.where(m == float("-inf"), 0.0, tl.exp2(shift * t_ratio)) * dt
    return d, t, dt


@triton.jit(do_not_specialize=["field_stride", "seed_hi", "seed_lo"])
def _partial_kernel(
    logits_ptr, part_ptr, part_idx_ptr, group_ptr,
    vocab, cols_per_split, field_stride,
    stride_outer, stride_inner, inner_size,
    c, t_ratio, seed_hi, seed_lo,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, ENTROPY: tl.constexpr, SAMPLE: tl.constexpr, TEMPERED: tl.constexpr,
    BLOCK_V: tl.constexpr, GROUPS: tl.constexpr, PREFETCH: tl.constexpr, VEC: tl.constexpr,
    FUSED: tl.constexpr, HAS_TARGETS: tl.constexpr, STORE_LSE: tl.constexpr, N_TILES: tl.constexpr,
):
    """Partial state of columns [split * cols_per_split, +cols_per_split) of one row.

    c = scale * log2(e); t_ratio = 1 / temperature (sampling). A tile is read as [BLOCK_V / VEC, VEC]
    (one slot of VEC consecutive lanes per thread), and the running max and the sums are kept per
    slot, so a tile needs no cross-thread reduction. Writes, with entry = row * num_splits + split,
    the fields of _FLOAT_FIELDS at part_ptr + k * field_stride + entry, top1's column at
    part_idx_ptr + entry, and with SAMPLE the GROUPS lane-group sums of 2^(y / temperature) at
    group_ptr + entry * GROUPS (y taken to the program's own max m).
    """
    SLOTS: tl.constexpr = BLOCK_V // VEC
    row64 = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = _row_start(logits_ptr, row64, stride_outer, stride_inner, inner_size)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, vocab)
    lanes = tl.arange(0, SLOTS)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [SLOTS, VEC]: column in the tile

    neg_inf = float("-inf")
    zeros = tl.zeros([SLOTS], dtype=tl.float32)
    m = zeros + neg_inf  # each slot's running max
    mc = zeros  # m * c, the offset of y; 0 while m is -inf
    d = zeros
    t = zeros
    dt = zeros
    top1 = tl.zeros([SLOTS, VEC], dtype=tl.float32) + neg_inf
    raised_at = tl.zeros([SLOTS], dtype=tl.int32) + col_start  # the tile that raised the slot's max last
    full_end, x_next = _first_tile(row_ptr, lanes, col_start, col_end, PREFETCH, BLOCK_V)
    for phase in tl.static_range(2):  # the whole tiles (unmasked loads), then the last partial one
        lo = col_start if phase == 0 else full_end
        hi = full_end if phase == 0 else col_end
        for start in tl.range(lo, hi, BLOCK_V):
            x, x_next = _tile(row_ptr, start, lanes, x_next, full_end, col_end, phase, PREFETCH, BLOCK_V, False)
            if TOP2:
                top1 = tl.maximum(top1, x)
                m_new = tl.max(top1, axis=1)
                raised_at = tl.where(m_new > m, start, raised_at)
            else:
                m_new = tl.maximum(m, tl.max(x, axis=1))
            # rescale each slot's sums to its new max (by 1 where it did not grow; 0 while it was -inf)
            mc_new = tl.where(m_new == neg_inf, 0.0, m_new * c)
            d, t, dt = _rescaled(d, t, dt, m, mc - mc_new, t_ratio, ENTROPY, TEMPERED)
            m = m_new
            mc = mc_new
            y = tl.fma(x, c, -mc[:, None])  # x * c - m * c in one rounding; the error of m * c is common to a slot
            e = tl.exp2(y)
            d += tl.sum(e, axis=1)
            if ENTROPY:
                t += tl.sum(tl.maximum(y, -1.0e4) * e, axis=1)  # a -inf logit adds 0 (not -inf * 0)
            if TEMPERED:
                dt += tl.sum(tl.exp2(y * t_ratio), axis=1)

    # the slots' states taken to the program's max
    m_all = tl.max(m, axis=0)
    mc_all = tl.where(m_all == neg_inf, 0.0, m_all * c)
    shift = mc - mc_all
    w = tl.where(m == neg_inf, 0.0, tl.exp2(shift))
    d_all = tl.sum(w * d, axis=0)
    t_all = d_all  # a placeholder where a flag leaves a field out
    if ENTROPY:
        t_all = tl.sum(tl.where(w > 0, w * (t + shift * d), 0.0), axis=0)
    runner_up = m_all
    top1_col = col_start
    if TOP2:
        # the first column of the max: in each slot holding it, the first of the tile that raised the
        # slot's max last (reread: VEC columns of the one or few slots that hold it)
        holds = m == m_all
        cols = raised_at[:, None] + lanes
        reread = holds[:, None] & (cols < col_end)
        x = tl.load(row_ptr + cols, mask=reread, other=neg_inf).to(tl.float32)
        m_col = tl.min(tl.min(tl.where(reread & (x == m_all), cols, col_end), axis=1), axis=0)
        first_lane = tl.min(tl.min(tl.where(top1 == m_all, lanes, BLOCK_V), axis=1), axis=0)  # m once
        runner_up = tl.max(tl.max(tl.where(lanes == first_lane, neg_inf, top1), axis=1), axis=0)  # other lanes
        top1_col = tl.where(m_col == col_end, col_start, m_col)
    group_sums = d_all
    if SAMPLE:
        if TEMPERED:
            scaled = tl.where(m == neg_inf, 0.0, tl.exp2(shift * t_ratio)) * dt
        else:
            scaled = w * d
        group_sums = tl.sum(tl.reshape(scaled, (GROUPS, SLOTS // GROUPS)), axis=1)
    _finish_program(
        row_ptr, row64, split, m_all, d_all, t_all, runner_up, top1_col, group_sums,
        part_ptr, part_idx_ptr, group_ptr, field_stride, vocab, c, t_ratio, seed_hi, seed_lo,
        targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
        top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
        TOP2, ENTROPY, SAMPLE, FUSED, HAS_TARGETS, STORE_LSE, BLOCK_V, GROUPS, N_TILES)


@triton.jit(do_not_specialize=["field_stride", "seed_hi", "seed_lo"])
def _partial_kernel_lanes(
    logits_ptr, part_ptr, part_idx_ptr, group_ptr,
    vocab, cols_per_split, field_stride,
    stride_outer, stride_inner, inner_size,
    c, t_ratio, seed_hi, seed_lo,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, ENTROPY: tl.constexpr, SAMPLE: tl.constexpr, TEMPERED: tl.constexpr,
    BLOCK_V: tl.constexpr, GROUPS: tl.constexpr, PREFETCH: tl.constexpr,
    FUSED: tl.constexpr, HAS_TARGETS: tl.constexpr, STORE_LSE: tl.constexpr, N_TILES: tl.constexpr,
):
    """_partial_kernel for rows Triton cannot prove 16-byte aligned (a thread's columns are then not
    contiguous, and slots of several columns would need cross-thread reductions): one running max for
    the whole tile (a cross-thread reduction per tile, with a rescale only when it grows) and the sums
    per lane. Writes the same fields.
    """
    row64 = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = _row_start(logits_ptr, row64, stride_outer, stride_inner, inner_size)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, vocab)
    lanes = tl.arange(0, BLOCK_V)

    m = float("-inf")
    mc = 0.0  # m * c, the offset of y; 0 while m is -inf
    zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
    d = zeros
    t = zeros
    dt = zeros
    top1 = zeros + float("-inf")
    m_col = col_start
    full_end, x_next = _first_tile(row_ptr, lanes, col_start, col_end, PREFETCH, BLOCK_V)
    for phase in tl.static_range(2):  # the whole tiles (unmasked loads), then the last partial one
        lo = col_start if phase == 0 else full_end
        hi = full_end if phase == 0 else col_end
        for start in tl.range(lo, hi, BLOCK_V):
            x, x_next = _tile(row_ptr, start, lanes, x_next, full_end, col_end, phase, PREFETCH, BLOCK_V, True)
            if TOP2:
                top1 = tl.maximum(top1, x)
            tile_max = tl.max(x, axis=0)
            if tile_max > m:  # rare after the first tiles: rescale the lanes' sums to the new max
                mc_new = tile_max * c
                d, t, dt = _rescaled(d, t, dt, m, mc - mc_new, t_ratio, ENTROPY, TEMPERED)
                if TOP2:  # the first column of the row's max is in the tile that raised m last
                    m_col = start + tl.min(tl.where(x == tile_max, lanes, BLOCK_V), axis=0)
                m = tile_max
                mc = mc_new
            y = tl.fma(x, c, -mc)  # x * c - m * c in one rounding; the error of m * c is common to all terms
            e = tl.exp2(y)
            d += e
            if ENTROPY:
                t += tl.maximum(y, -1.0e4) * e  # a -inf logit adds 0 (not -inf * 0)
            if TEMPERED:
                dt += tl.exp2(y * t_ratio)

    d_all = tl.sum(d, axis=0)
    t_all = d_all  # a placeholder where a flag leaves a field out
    if ENTROPY:
        t_all = tl.sum(t, axis=0)
    runner_up = m
    if TOP2:
        first_lane = tl.min(tl.where(top1 == m, lanes, BLOCK_V), axis=0)  # m once; a tie elsewhere is top2
        runner_up = tl.max(tl.where(lanes == first_lane, float("-inf"), top1), axis=0)  # the other lanes' best
    group_sums = d_all
    if SAMPLE:
        if TEMPERED:
            group_sums = tl.sum(tl.reshape(dt, (GROUPS, BLOCK_V // GROUPS)), axis=1)
        else:
            group_sums = tl.sum(tl.reshape(d, (GROUPS, BLOCK_V // GROUPS)), axis=1)
    _finish_program(
        row_ptr, row64, split, m, d_all, t_all, runner_up, m_col, group_sums,
        part_ptr, part_idx_ptr, group_ptr, field_stride, vocab, c, t_ratio, seed_hi, seed_lo,
        targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
        top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
        TOP2, ENTROPY, SAMPLE, FUSED, HAS_TARGETS, STORE_LSE, BLOCK_V, GROUPS, N_TILES)


@triton.jit
def _open_unit(bits):
    """23 random bits as a uniform in (0, 1), centred, so never 0 or 1 in float32."""
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _uniforms_open(seed_hi, seed_lo, row64):
    """Two independent uniforms in (0, 1) for this row, from one Philox call keyed by (seed, row)."""
    bits_group, bits_column, _, _ = tl.randint4x((seed_hi.to(tl.int64) << 31) | seed_lo, row64.to(tl.uint32))
    return _open_unit(bits_group), _open_unit(bits_column)


@triton.jit
def _terms(row_ptr, cols, vocab, c, mc_max, t_ratio):
    """The logits x at the columns cols of the row as float32 (-inf past the vocabulary) and their terms
    2^((x * c - mc_max) * t_ratio)."""
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return x, tl.exp2(tl.fma(x, c, -mc_max) * t_ratio)


@triton.jit
def _sample(row_ptr, row64, group_sum, mc_max, vocab, c, t_ratio, seed_hi, seed_lo, fallback, x_fallback,
            BLOCK_V: tl.constexpr, GROUPS: tl.constexpr, N_TILES: tl.constexpr):
    """Inverse-CDF draw from softmax(x * c * t_ratio / log2(e)); returns the column (int32) and its logit
    (float32, as read).

    A lane group is drawn with one uniform from the programs' group sums, then a column of that group
    with the other from its rescanned terms. The second draw reads only logits and the row's max, so
    the column depends on the launch layout only through the group: the group sums' rounding differs
    between split counts and kernels, and moves a draw only when the first uniform falls within that
    rounding of one of the GROUPS - 1 group boundaries (a single draw over the row would move with any
    of its V column boundaries). group_sum [GROUPS]: the row's group sums (_row_group_sums); mc_max:
    the row's max times c. fallback, x_fallback: the column and logit to return if rounding leaves the
    chosen group's rescanned terms all 0 (never seen; it keeps every read in the row).
    """
    g = tl.arange(0, GROUPS)
    never = 2147483647

    u_group, u_column = _uniforms_open(seed_hi, seed_lo, row64)
    cum = tl.cumsum(group_sum, axis=0)
    # the first group whose running sum reaches u_group times the last (a positive one: see the column below);
    # none only for an invalid row (a NaN or no positive sum), whose draw is not reported
    target = u_group * tl.max(cum, axis=0)
    group = tl.minimum(tl.min(tl.where((cum >= target) & (group_sum > 0), g, GROUPS), axis=0), GROUPS - 1)

    # the chosen group's lanes in every tile of the row, in column order, 2 KiB of logits at a time (16 bytes
    # per thread on 4 warps: one chunk at V = 126464 in bf16, and a pass that samples at its end keeps its
    # loop's registers, where a whole group of 4096 float32 columns took 128). The column is the first whose
    # running sum reaches u_column times the group's total: one exists whenever the total is > 0, since the
    # last running sum is the total itself (the same additions) and u_column < 1; it has a positive term, as
    # the sum before it stayed below the threshold (e > 0 only excludes every column when the total is 0)
    WIDTH: tl.constexpr = BLOCK_V // GROUPS
    CHUNK: tl.constexpr = 16384 // row_ptr.dtype.element_ty.primitive_bitwidth  # columns
    RESCAN_TILES: tl.constexpr = N_TILES if N_TILES * WIDTH <= CHUNK else CHUNK // WIDTH
    lanes = tl.reshape(tl.arange(0, RESCAN_TILES)[:, None] * BLOCK_V + tl.arange(0, WIDTH)[None, :],
                       (RESCAN_TILES * WIDTH,)) + group * WIDTH
    if RESCAN_TILES == N_TILES:  # one chunk: its running sum gives the total and the column from one read
        x, e = _terms(row_ptr, lanes, vocab, c, mc_max, t_ratio)
        running = tl.cumsum(e, axis=0)
        threshold = u_column * tl.max(running, axis=0)
        col = tl.min(tl.where((running >= threshold) & (e > 0), lanes, never), axis=0)
        x_col = tl.max(tl.where(lanes == col, x, float("-inf")), axis=0)
    else:  # the total first, then the column, chunk by chunk (up to the last tile that holds a column)
        real_tiles = tl.cdiv(vocab, BLOCK_V)
        total = 0.0
        for start in tl.range(0, real_tiles, RESCAN_TILES):
            _, e = _terms(row_ptr, start * BLOCK_V + lanes, vocab, c, mc_max, t_ratio)
            total += tl.max(tl.cumsum(e, axis=0), axis=0)
        threshold = u_column * total
        col = never
        x_col = float("-inf")
        carry = 0.0
        for start in tl.range(0, real_tiles, RESCAN_TILES):
            cols = start * BLOCK_V + lanes
            x, e = _terms(row_ptr, cols, vocab, c, mc_max, t_ratio)
            running = tl.cumsum(e, axis=0)  # the chunk's running sum; its last entry is what the total added
            found = tl.min(tl.where((carry + running >= threshold) & (e > 0), cols, never), axis=0)
            x_col = tl.where(col == never, tl.max(tl.where(cols == found, x, float("-inf")), axis=0), x_col)
            col = tl.minimum(col, found)
            carry += tl.max(running, axis=0)
    return tl.where(col == never, fallback, col), tl.where(col == never, x_fallback, x_col)


@triton.jit
def _row_group_sums(m_j, sums_j, c, t_ratio):
    """The row's lane-group sums [GROUPS] of 2^(y / temperature), y taken to the row's max, from its
    programs' maxima m_j [BLOCK_S] (-inf for none) and group sums sums_j [BLOCK_S, GROUPS] (each taken
    to its program's max). Reduced as soon as they are read: [BLOCK_S, GROUPS] values per row would
    otherwise stay in registers through the other outputs."""
    m = tl.max(m_j, axis=0)
    mc = tl.where(m == float("-inf"), 0.0, m * c)
    w_j = tl.where(m_j == float("-inf"), 0.0, tl.exp2((m_j * c - mc) * t_ratio))  # each program's scale
    return tl.sum(sums_j * w_j[:, None], axis=0)


@triton.jit
def _write_row(
    row_ptr, row64, j, valid, m_j, d_j, t_j, top2_j, col_j, group_sum, vocab, c, t_ratio, seed_hi, seed_lo,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, ENTROPY: tl.constexpr, SAMPLE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, GROUPS: tl.constexpr,
    N_TILES: tl.constexpr,
):
    """Merge a row's program states and write its outputs (statistics of softmax(x * c / log2(e))).

    The states are vectors over j = arange(BLOCK_S), valid marking the row's programs (the others hold
    m -inf, d and t 0, column 0): m_j, d_j, t_j, top2_j (each program's runner-up) and col_j (the
    first column of its max); group_sum [GROUPS]: the row's lane-group sums (_row_group_sums, SAMPLE).
    Everything is computed in the programs' units y = x * c - m * c, so the rounding of m * c, common
    to a program's terms, cancels.
    """
    m = tl.max(m_j, axis=0)
    mc = tl.where(m == float("-inf"), 0.0, m * c)
    shift_j = m_j * c - mc
    w_j = tl.where(m_j == float("-inf"), 0.0, tl.exp2(shift_j))
    d = tl.sum(d_j * w_j, axis=0)
    invalid = ~(d >= 0.5)  # NaN: a NaN or +inf logit; 0: only -inf (the max term alone gives ~1)
    log2_d = tl.log2(d)
    nan = float("nan")

    if ENTROPY:
        t = tl.sum(tl.where(w_j > 0, w_j * (t_j + shift_j * d_j), 0.0), axis=0)
        tl.store(entropy_ptr + row64, tl.where(invalid, nan, LN2 * (log2_d - t / d)))
    if STORE_LSE:
        empty = tl.where(d == 0.0, float("-inf"), nan)  # log 0 for a row of only -inf; NaN for NaN or +inf
        tl.store(lse_ptr + row64, tl.where(invalid, empty, LN2 * (mc + log2_d)))
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row64)
        ignored = target == IGNORE_INDEX
        x_t = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32)
        logprob = tl.where(invalid, nan, LN2 * (tl.fma(x_t, c, -mc) - log2_d))
        tl.store(target_logprob_ptr + row64, tl.where(ignored, 0.0, logprob))
    if TOP2:
        j_top = tl.min(tl.where(valid & (m_j == m), j, BLOCK_S), axis=0)
        top1_col = tl.sum(tl.where(j == j_top, col_j, 0), axis=0)
        top2 = tl.maximum(tl.max(top2_j, axis=0), tl.max(tl.where(j == j_top, float("-inf"), m_j), axis=0))
        # the argmax's own lane: the columns congruent to it modulo BLOCK_V (splits start at multiples of it),
        # read now and used after the draw, whose own reads are then in flight at the same time
        same_lane = top1_col % BLOCK_V + tl.arange(0, N_TILES) * BLOCK_V
        x_lane = tl.load(row_ptr + same_lane, mask=(same_lane < vocab) & (same_lane != top1_col),
                         other=float("-inf")).to(tl.float32)
        col = top1_col  # greedy: the argmax, whose logit is m
        x_col = m
        if SAMPLE:
            col, x_col = _sample(row_ptr, row64, group_sum, mc, vocab, c, t_ratio, seed_hi, seed_lo, top1_col, m,
                                 BLOCK_V, GROUPS, N_TILES)
        top2 = tl.maximum(top2, tl.max(x_lane, axis=0))
        e_top1 = tl.exp2(tl.fma(m, c, -mc))  # 1 up to the rounding of m * c, as in d
        tl.store(top1_prob_ptr + row64, tl.where(invalid, nan, e_top1 / d))
        tl.store(margin_ptr + row64, tl.where(invalid, nan, (e_top1 - tl.exp2(tl.fma(top2, c, -mc))) / d))
        tl.store(argmax_ptr + row64, tl.where(invalid, -1, top1_col).to(tl.int64))
        tl.store(sampled_ptr + row64, tl.where(invalid, -1, col).to(tl.int64))
        tl.store(sampled_prob_ptr + row64, tl.where(invalid, nan, tl.exp2(tl.fma(x_col, c, -mc)) / d))


@triton.jit
def _finish_program(
    row_ptr, row64, split, m, d, t, top2, top1_col, group_sums,
    part_ptr, part_idx_ptr, group_ptr, field_stride, vocab, c, t_ratio, seed_hi, seed_lo,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, ENTROPY: tl.constexpr, SAMPLE: tl.constexpr, FUSED: tl.constexpr,
    HAS_TARGETS: tl.constexpr, STORE_LSE: tl.constexpr, BLOCK_V: tl.constexpr, GROUPS: tl.constexpr,
    N_TILES: tl.constexpr,
):
    """The end of a vocabulary pass: with FUSED (one program covers the row) write the row's outputs as
    the merge kernel would from this one state (the same code on the same values: bit-identical);
    otherwise store the state for the merge, at entry = row * num_splits + split: the fields of
    _FLOAT_FIELDS at part_ptr + k * field_stride + entry, top1_col at part_idx_ptr + entry, and with
    SAMPLE the GROUPS group sums at group_ptr + entry * GROUPS."""
    if FUSED:  # a merge of one state and one empty slot, as the merge kernel sees a row of one split
        j = tl.arange(0, 2)
        first = j == 0
        neg_inf = float("-inf")
        m_j = tl.where(first, m, neg_inf)
        d_j = tl.where(first, d, 0.0)
        group_sum = d  # a placeholder without SAMPLE
        if SAMPLE:
            group_sum = _row_group_sums(m_j, tl.where(first[:, None], group_sums[None, :], 0.0), c, t_ratio)
        _write_row(
            row_ptr, row64, j, first, m_j, d_j, tl.where(first, t, 0.0), tl.where(first, top2, neg_inf),
            tl.where(first, top1_col, 0), group_sum, vocab, c, t_ratio, seed_hi, seed_lo,
            targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
            top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
            TOP2, ENTROPY, SAMPLE, HAS_TARGETS, STORE_LSE, 2, BLOCK_V, GROUPS, N_TILES)
    else:
        entry = row64 * tl.num_programs(1) + split
        tl.store(part_ptr + entry, m)
        tl.store(part_ptr + field_stride + entry, d)
        if ENTROPY:
            tl.store(part_ptr + 2 * field_stride + entry, t)
        if TOP2:
            tl.store(part_ptr + 3 * field_stride + entry, top2)
            tl.store(part_idx_ptr + entry, top1_col)
        if SAMPLE:
            tl.store(group_ptr + entry * GROUPS + tl.arange(0, GROUPS), group_sums)


@triton.jit(do_not_specialize=["field_stride", "seed_hi", "seed_lo"])
def _merge_kernel(
    part_ptr, part_idx_ptr, group_ptr, field_stride, n_splits,
    logits_ptr, stride_outer, stride_inner, inner_size, vocab, c, t_ratio, seed_hi, seed_lo,
    targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
    top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
    TOP2: tl.constexpr, ENTROPY: tl.constexpr, SAMPLE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, GROUPS: tl.constexpr,
    N_TILES: tl.constexpr,
):
    """Merge the partial states of a row's n_splits programs and write its outputs (_write_row)."""
    row64 = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    valid = j < n_splits
    entry = row64 * n_splits + j
    m_j = tl.load(part_ptr + entry, mask=valid, other=float("-inf"))
    d_j = tl.load(part_ptr + field_stride + entry, mask=valid, other=0.0)
    t_j = d_j  # placeholders where a flag leaves a field out
    top2_j = m_j
    col_j = j
    group_sum = d_j
    if ENTROPY:
        t_j = tl.load(part_ptr + 2 * field_stride + entry, mask=valid, other=0.0)
    if TOP2:
        top2_j = tl.load(part_ptr + 3 * field_stride + entry, mask=valid, other=float("-inf"))
        col_j = tl.load(part_idx_ptr + entry, mask=valid, other=0)
    if SAMPLE:
        g = tl.arange(0, GROUPS)
        sums_j = tl.load(group_ptr + entry[:, None] * GROUPS + g[None, :], mask=valid[:, None], other=0.0)
        group_sum = _row_group_sums(m_j, sums_j, c, t_ratio)
    _write_row(
        _row_start(logits_ptr, row64, stride_outer, stride_inner, inner_size), row64, j, valid,
        m_j, d_j, t_j, top2_j, col_j, group_sum, vocab, c, t_ratio, seed_hi, seed_lo,
        targets_ptr, entropy_ptr, lse_ptr, target_logprob_ptr,
        top1_prob_ptr, margin_ptr, argmax_ptr, sampled_ptr, sampled_prob_ptr,
        TOP2, ENTROPY, SAMPLE, HAS_TARGETS, STORE_LSE, BLOCK_S, BLOCK_V, GROUPS, N_TILES)


def _rows_aligned(logits: torch.Tensor, stride_outer: int, stride_inner: int, inner_size: int) -> bool:
    """Whether Triton's specialisation proves every row 16-byte aligned: the pointer aligned and the
    strides multiples of 16 (then each thread reads its columns with one vector load)."""
    return logits.data_ptr() % 16 == 0 and stride_outer % 16 == 0 and (inner_size == 1 or stride_inner % 16 == 0)


_PROGRAMS_PER_SM: dict[tuple, int] = {}


def _partial_programs_per_sm(kernel, logits, vocab, stride_outer, stride_inner, inner_size, flags,
                             num_warps) -> int:
    """How many programs of the vocabulary pass one SM holds, from the registers of the specialisation a
    split row launches (compiled here if it is new, without running it); cached per specialisation."""
    key = (kernel.fn.__name__, logits.device, logits.dtype, logits.data_ptr() % 16, vocab % 16, stride_outer % 16,
           stride_inner % 16, inner_size == 1, tuple(flags.items()), num_warps)
    if key not in _PROGRAMS_PER_SM:
        f32 = torch.empty(1, dtype=torch.float32, device=logits.device)
        i32 = torch.empty(1, dtype=torch.int32, device=logits.device)
        compiled = kernel.warmup(
            logits, f32, i32, f32, vocab, flags["BLOCK_V"], 1, stride_outer, stride_inner, inner_size, 1.0, 1.0, 0, 0,
            i32, *[f32] * 8, **flags, **_SPLIT, num_warps=num_warps, grid=(1,))
        # no compiled kernel under the interpreter: its programs run one at a time anyway
        _PROGRAMS_PER_SM[key] = 8 if compiled is None else programs_per_sm(compiled, num_warps, logits.device)
    return _PROGRAMS_PER_SM[key]


# the vocabulary pass of a split row stores its state for the merge kernel; the output flags are unused
_SPLIT = dict(FUSED=False, HAS_TARGETS=False, STORE_LSE=False, N_TILES=1)


def softmax_row_stats(
    logits: torch.Tensor,
    *,
    scale: float = 1.0,
    temperature: float = 0.0,
    seed: int = 0,  # 62 bits are used
    targets: torch.Tensor | None = None,
    top2: bool = True,
    entropy: bool = True,
    lse: bool = False,
    block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    prefetch: bool | None = None,
    lanes: bool = False,
    fuse_merge: bool = True,
) -> dict[str, torch.Tensor]:
    """Launch the kernels on logits [..., V]; returns the requested outputs, each of shape [N].

    scale multiplies the logits before the softmax (1 / temperature for log-probs). With top2,
    returns top1_prob, margin, argmax, sampled and sampled_prob; sampling is an inverse-CDF draw
    from softmax(logits / temperature) when temperature > 0, the argmax otherwise. Targets equal
    to -100 give 0. Rows holding NaN or +inf, or only -inf, give NaN statistics and index -1, except
    lse: -inf for a row of only -inf (fused_linear_logprobs merges the lse of vocabulary slices, where
    such a row is valid), NaN for NaN or +inf.
    A seeded sample depends on block_v (the column order), and on num_splits and on the kernel only
    where the group sums' rounding moves it across a lane-group boundary (see _sample). block_v,
    num_splits, num_warps (of the vocabulary pass) and prefetch (load the next tile before reducing
    this one; by default only the kernel of lanes does) override the launch layout, and lanes reads
    aligned rows with the kernel of lanes too (float32 rows sampled at temperature != 1 always are),
    for tests and tuning. When one program covers each row, the vocabulary pass writes the outputs
    itself (bit-identical to the merge kernel's); fuse_merge=False launches the merge kernel anyway
    (tests and timing).
    """
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    device = logits.device
    logits, stride_outer, stride_inner, inner_size = row_layout(logits)
    sample = top2 and temperature > 0
    block_v = block_v or default_block_v(vocab, logits.element_size())
    flags = dict(TOP2=top2, ENTROPY=entropy, SAMPLE=sample, TEMPERED=sample and temperature != 1.0,
                 BLOCK_V=block_v, GROUPS=max(block_v // GROUP_W, 1))
    partial = _partial_kernel_lanes
    vec = 16 // logits.element_size()  # a slot: one 16-byte load
    # float32 slots hold 4 columns, too few to pay for the per-slot rescale of a tempered sample's sums: those
    # keep the kernel of lanes (Triton 3.6, sm_90, the loop over whole tiles: 16.4-16.75 SASS instructions per
    # element with slots, 16.4-16.6 with lanes; a GPU has not compared them)
    slots = not lanes and not (flags["TEMPERED"] and vec < 8)
    if slots and _rows_aligned(logits, stride_outer, stride_inner, inner_size):
        partial, flags["VEC"] = _partial_kernel, vec
    # Prefetch by default only in the kernel of lanes. H200, bf16 V = 126464, CUDA graphs: without it that kernel
    # lost 8-15 points of copy bandwidth (kernel_layouts_cuda_2026-11-27_run2.md); the kernel of slots (2048
    # columns on 4 warps) gained in 11 of 12 cases over two runs (_run4, _run5; greedy, T = 1, log-sum-exp at
    # N = 256 and 4096), 1.6 points on average: each thread's two 16-byte loads per tile keep enough in flight.
    flags["PREFETCH"] = partial is _partial_kernel_lanes if prefetch is None else prefetch
    num_warps = num_warps or stats_num_warps(block_v, logits.element_size())
    per_sm = 8
    if num_splits is None and device.type == "cuda" and n_rows:
        per_sm = _partial_programs_per_sm(partial, logits, vocab, stride_outer, stride_inner, inner_size, flags,
                                          num_warps)
    block_v, cols_per_split, n_splits = vocab_split(n_rows, vocab, logits.element_size(), device, block_v,
                                                    num_splits, per_sm)
    groups = flags["GROUPS"]

    out = row_stat_outputs(n_rows, device, entropy=entropy, lse=lse, targets=targets is not None, top2=top2)
    if n_rows == 0:
        return out

    fused = fuse_merge and n_splits == 1
    field_stride = n_rows * n_splits
    part = torch.empty(1 if fused else len(_FLOAT_FIELDS) * field_stride, dtype=torch.float32, device=device)
    part_idx = torch.empty(1 if fused else field_stride, dtype=torch.int32, device=device)
    group = torch.empty(field_stride * groups if sample and not fused else 1, dtype=torch.float32, device=device)
    c = float(scale) * LOG2E
    t_ratio = 1.0 / temperature if sample else 1.0
    seed_hi, seed_lo = (seed >> 31) & 0x7FFFFFFF, seed & 0x7FFFFFFF
    dummy = part  # pointer for outputs a flag switches off; never read or written
    outputs = (targets.reshape(-1).contiguous() if targets is not None else part_idx,
               *[out.get(name, dummy) for name in ("entropy", "lse", "target_logprob", "top1_prob", "margin",
                                                   "argmax", "sampled", "sampled_prob")])
    row_flags = dict(HAS_TARGETS=targets is not None, STORE_LSE=lse,
                     N_TILES=triton.next_power_of_2(triton.cdiv(vocab, block_v)))
    partial[(n_rows, n_splits)](
        logits, part, part_idx, group,
        vocab, cols_per_split, field_stride,
        stride_outer, stride_inner, inner_size,
        c, t_ratio, seed_hi, seed_lo, *outputs,
        **flags, **(dict(FUSED=True, **row_flags) if fused else _SPLIT), num_warps=num_warps,
    )
    if not fused:
        _merge_kernel[(n_rows,)](
            part, part_idx, group, field_stride, n_splits,
            logits, stride_outer, stride_inner, inner_size, vocab, c, t_ratio, seed_hi, seed_lo, *outputs,
            TOP2=top2, ENTROPY=entropy, SAMPLE=sample, BLOCK_S=max(triton.next_power_of_2(n_splits), 2),
            BLOCK_V=block_v, GROUPS=groups, **row_flags, num_warps=4 if sample else 1,
        )
    return out
