"""The library's ops: one file each, holding dispatch, checks and autograd."""

import torch


def _settle_mkl_vml_dispatch() -> None:
    """Call each MKL VML function that CPU code here (and the models' rotary embeddings) uses once, on
    one element, in float32 and float64.

    torch's CPU wheels route contiguous float unary ops to oneMKL's VML, which picks a function's kernel
    on its first call. When that first call runs on several intra-op threads at once, one thread can run
    a low-accuracy kernel for its chunk (pytorch/pytorch#188792, oneMKL 2024.2). Seen here with torch
    2.13.0 on a 2-core Intel Xeon: the first torch.exp of a [9, 256] float32 tensor in a fresh process
    was off by up to 1.4e-4 relative in the second thread's half in 17 of 60 processes, and in none of
    60 after a one-element call. A one-element call runs on one thread and settles the choice.
    """
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.ones(1, dtype=dtype)
        for fn in (torch.exp, torch.expm1, torch.log, torch.log1p, torch.log2, torch.sqrt, torch.rsqrt,
                   torch.sin, torch.cos, torch.tanh, torch.erf, torch.sigmoid):
            fn(one)


_settle_mkl_vml_dispatch()

from atpo_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from atpo_fast.ops.selected_logprobs import selected_logprobs
from atpo_fast.ops.step_rows import StepRows, build_step_rows
from atpo_fast.ops.step_stats import StepStats, step_stats
from atpo_fast.ops.token_stats import TokenStats, token_stats

__all__ = ["StepRows", "StepStats", "TokenStats", "build_step_rows", "fused_linear_logprobs", "selected_logprobs",
           "step_stats", "token_stats"]
