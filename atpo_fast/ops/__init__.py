"""The library's ops: one file each, holding dispatch, checks and autograd."""

from atpo_fast.ops.step_stats import StepStats, step_stats
from atpo_fast.ops.token_stats import TokenStats, token_stats

__all__ = ["StepStats", "TokenStats", "step_stats", "token_stats"]
