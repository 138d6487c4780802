"""The library's ops: one file each, holding dispatch, checks and autograd."""

from atpo_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from atpo_fast.ops.selected_logprobs import selected_logprobs
from atpo_fast.ops.step_rows import StepRows, build_step_rows
from atpo_fast.ops.step_stats import StepStats, step_stats
from atpo_fast.ops.token_stats import TokenStats, token_stats

__all__ = ["StepRows", "StepStats", "TokenStats", "build_step_rows", "fused_linear_logprobs", "selected_logprobs",
           "step_stats", "token_stats"]
