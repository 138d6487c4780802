"""Backward of selected_logprobs: d log p(target) / d logits, one pass, written in the logits' dtype.

grad[r, v] = g[r] * scale * (onehot(target[r])[v] - softmax(scale * z[r])[v]), with the softmax
rebuilt from the saved log-sum-exp; rows whose target is -100 get exact zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import row_layout

IGNORE_INDEX = -100


@triton.jit
def _logprob_backward_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, grad_out_ptr,
    vocab, stride_outer, stride_inner, inner_size, scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < vocab
    target = tl.load(targets_ptr + row64)
    ignored = target == IGNORE_INDEX
    g = tl.load(grad_out_ptr + row64).to(tl.float32) * scale
    lse = tl.load(lse_ptr + row64)
    row_ptr = logits_ptr + (row64 // inner_size) * stride_outer + (row64 % inner_size) * stride_inner
    x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    p = tl.exp(x * scale - lse)
    grad = g * (tl.where(cols == target, 1.0, 0.0) - p)
    grad = tl.where(ignored, 0.0, grad)
    tl.store(grad_ptr + row64 * vocab + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def logprob_backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gradient [..., V] (contiguous, logits' dtype) for logits [..., V], flat targets/lse/grad_out [N]."""
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad
    logits, stride_outer, stride_inner, inner_size = row_layout(logits)
    block_v = min(4096, triton.next_power_of_2(vocab))
    _logprob_backward_kernel[(n_rows, triton.cdiv(vocab, block_v))](
        logits, grad, targets.reshape(-1).contiguous(), lse.contiguous(), grad_out.reshape(-1).contiguous(),
        vocab, stride_outer, stride_inner, inner_size, float(scale),
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return grad
