"""atpo_fast: fast ATPO (adaptive trajectory policy optimisation) for masked-diffusion LLMs."""

from atpo_fast.ops import (StepRows, StepStats, TokenStats, build_step_rows, fused_linear_logprobs,
                           selected_logprobs, step_stats, token_stats)

from atpo_fast.sampler import Rollout, Trace, generate  # noqa: E402  (after the ops it uses)
from atpo_fast.selection import select_steps  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Rollout", "StepRows", "StepStats", "TokenStats", "Trace", "build_step_rows", "fused_linear_logprobs",
           "generate", "select_steps", "selected_logprobs", "step_stats", "token_stats"]
