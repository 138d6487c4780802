"""atpo_fast: fast ATPO (adaptive trajectory policy optimisation) for masked-diffusion LLMs."""

from atpo_fast.ops import StepStats, TokenStats, step_stats, token_stats

__version__ = "0.1.0"

__all__ = ["StepStats", "TokenStats", "step_stats", "token_stats"]
