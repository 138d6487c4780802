"""Kernels of selected_logprobs. Forward: the token_stats pass with top-2 and sampling compiled out,
keeping the log-sum-exp. Backward: d log p(target) / d logits, one pass, written in the logits' dtype:

grad[r, v] = g[r] * scale * (onehot(target[r])[v] - softmax(scale * z[r])[v]), with the softmax
rebuilt from the saved log-sum-exp; rows whose target is -100 get exact zeros. The programs tile
the vocabulary like the forward (kernels/token_stats.py): whole tiles with unmasked 16-byte loads
and stores, then the last partial tile; the target column's +g is written after the tiles. With
g * scale = -1 and no target the same pass writes the softmax terms exp(scale * z - shift) (softmax_terms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .token_stats import IGNORE_INDEX, LOG2E, _row_start, softmax_row_stats
from .utils import default_num_warps, row_layout, vocab_split


@triton.jit
def _logprob_backward_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, grad_out_ptr,
    vocab, cols_per_split, stride_outer, stride_inner, inner_size, scale, c,
    BLOCK_V: tl.constexpr,
):
    """Columns [split * cols_per_split, +cols_per_split) of one row's gradient; c = scale * log2(e)."""
    row64 = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, vocab)
    full_end = col_start + ((col_end - col_start) // BLOCK_V) * BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    in_ptr = _row_start(logits_ptr, row64, stride_outer, stride_inner, inner_size)
    out_ptr = grad_ptr + row64 * vocab
    target = tl.load(targets_ptr + row64)
    ignored = target == IGNORE_INDEX
    g = tl.where(ignored, 0.0, tl.load(grad_out_ptr + row64).to(tl.float32) * scale)
    neg_g = -g
    lse2 = tl.load(lse_ptr + row64) * 1.4426950408889634  # log2 units, to match c
    for phase in tl.static_range(2):  # the whole tiles (unmasked), then the last partial one
        lo = col_start if phase == 0 else full_end
        hi = full_end if phase == 0 else col_end
        for start in tl.range(lo, hi, BLOCK_V):
            cols = start + lanes
            if phase == 0:
                x = tl.load(in_ptr + cols).to(tl.float32)
            else:
                x = tl.load(in_ptr + cols, mask=cols < col_end, other=0.0).to(tl.float32)
            grad = neg_g * tl.exp2(tl.fma(x, c, -lse2))
            if ignored:  # exact zeros whatever the logits hold (NaN / inf included)
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            if phase == 0:
                tl.store(out_ptr + cols, grad.to(grad_ptr.dtype.element_ty))
            else:
                tl.store(out_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < col_end)
    if (target >= col_start) & (target < col_end):  # the one-hot term, after this program's stores
        tl.debug_barrier()
        x_t = tl.load(in_ptr + target).to(tl.float32)
        grad_t = g * (1.0 - tl.exp2(tl.fma(x_t, c, -lse2)))
        tl.store(out_ptr + target, grad_t.to(grad_ptr.dtype.element_ty))


def logprob_forward(logits: torch.Tensor, targets: torch.Tensor, scale: float, entropy: bool) -> dict:
    """log p(target), the log-sum-exp of scale * logits (and the entropy if asked), each float32 [N]."""
    return softmax_row_stats(logits, scale=scale, targets=targets, top2=False, entropy=entropy, lse=True)


def logprob_backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gradient [..., V] (contiguous, logits' dtype) for logits [..., V], flat targets/lse/grad_out [N]."""
    return _launch_backward(logits, targets, lse, grad_out, float(scale), float(scale) * LOG2E)


def softmax_terms(logits: torch.Tensor, shift: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(scale * logits - shift) [N, V] (contiguous, logits' dtype) for logits [N, V], shift float32 [N]:
    the backward pass with g * scale = -1 and no target, one read and one write of the tile (fused_linear_logprobs'
    frozen-head route, whose torch ops took four float32 passes)."""
    n_rows = logits.shape[0]
    no_target = torch.full((n_rows,), -1, dtype=torch.int64, device=logits.device)  # outside [0, V): no one-hot
    minus_one = torch.full((n_rows,), -1.0, dtype=torch.float32, device=logits.device)
    return _launch_backward(logits, no_target, shift, minus_one, 1.0, float(scale) * LOG2E)


def _launch_backward(logits, targets, lse, grad_out, g_scale: float, c: float) -> torch.Tensor:
    """The backward kernel over logits [..., V]: g = grad_out * g_scale, the softmax of x * c in log2 units."""
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad
    logits, stride_outer, stride_inner, inner_size = row_layout(logits)
    block_v, cols_per_split, n_splits = vocab_split(n_rows, vocab, logits.element_size(), logits.device, None, None)
    _logprob_backward_kernel[(n_rows, n_splits)](
        logits, grad, targets.reshape(-1).contiguous(), lse.contiguous(), grad_out.reshape(-1).contiguous(),
        vocab, cols_per_split, stride_outer, stride_inner, inner_size, g_scale, c,
        BLOCK_V=block_v, num_warps=default_num_warps(block_v),
    )
    return grad
