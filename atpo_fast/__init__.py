"""atpo_fast: fast ATPO (adaptive trajectory policy optimisation) for masked-diffusion LLMs."""

from atpo_fast.ops import (StepRows, StepStats, TokenStats, build_step_rows, fused_linear_logprobs,
                           selected_logprobs, step_stats, token_stats)

from atpo_fast.sampler import Rollout, Trace, generate  # noqa: E402  (after the ops it uses)

__version__ = "0.1.0"

__all__ = ["Rollout", "StepRows", "StepStats", "TokenStats", "Trace", "build_step_rows", "fused_linear_logprobs",
           "generate", "selected_logprobs", "step_stats", "token_stats"]
