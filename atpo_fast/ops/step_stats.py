"""step_stats: one denoising step's confusion signals per sequence, from per-token statistics."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from atpo_fast.ops.token_stats import TokenStats

RELATIVE_EPS = 1e-6


class StepStats(NamedTuple):
    """Per-sequence signals of one step, each of the mask's leading shape (float32, count int64).

    Mean entropy and margin are NaN where the token set is empty.
    """

    entropy: torch.Tensor  # H_t = mean entropy over the token set
    margin: torch.Tensor  # CM_t = mean (p1 - p2) over the token set
    roec: torch.Tensor  # |H_t - H_{t-1}| (or relative to H_{t-1}); 0 without a previous step
    count: torch.Tensor  # size of the token set


def step_stats(
    stats_or_entropy_margin: TokenStats | tuple[torch.Tensor, torch.Tensor],
    token_mask: torch.Tensor,
    prev_entropy: Optional[torch.Tensor] = None,
    relative: bool = False,
) -> StepStats:
    """Mean entropy and margin over token_mask [..., L] (bool), its count, and RoEC.

    stats_or_entropy_margin: a TokenStats or an (entropy, margin) pair, each [..., L].
    prev_entropy [...]: the previous step's H_{t-1}; RoEC is |H_t - H_{t-1}|, divided by
    (H_{t-1} + 1e-6) when relative. Without it RoEC is 0 (the first step).
    """
    if isinstance(stats_or_entropy_margin, TokenStats):
        entropy, margin = stats_or_entropy_margin.entropy, stats_or_entropy_margin.margin
    elif isinstance(stats_or_entropy_margin, (tuple, list)) and len(stats_or_entropy_margin) == 2:
        entropy, margin = stats_or_entropy_margin
    else:
        raise ValueError("stats_or_entropy_margin must be a TokenStats or an (entropy, margin) pair")
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a bool tensor, got {getattr(token_mask, 'dtype', type(token_mask))}")
    if token_mask.dim() < 1:
        raise ValueError("token_mask must have shape [..., L]")
    for name, value in (("entropy", entropy), ("margin", margin)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if value.shape != token_mask.shape:
            raise ValueError(f"{name} must have token_mask's shape {tuple(token_mask.shape)}, got {tuple(value.shape)}")
        if value.device != token_mask.device:
            raise ValueError(f"{name} must be on token_mask's device {token_mask.device}, got {value.device}")

    count = token_mask.sum(-1)
    denom = count.to(torch.float32)
    mean_entropy = torch.where(token_mask, entropy.float(), 0.0).sum(-1) / denom
    mean_margin = torch.where(token_mask, margin.float(), 0.0).sum(-1) / denom
    if prev_entropy is None:
        roec = torch.zeros_like(mean_entropy)
    else:
        if not isinstance(prev_entropy, torch.Tensor) or prev_entropy.shape != mean_entropy.shape:
            raise ValueError(f"prev_entropy must have shape {tuple(mean_entropy.shape)}, "
                             f"got {tuple(getattr(prev_entropy, 'shape', ()))}")
        if prev_entropy.device != token_mask.device:
            raise ValueError(f"prev_entropy must be on {token_mask.device}, got {prev_entropy.device}")
        roec = (mean_entropy - prev_entropy.float()).abs()
        if relative:
            roec = roec / (prev_entropy.float() + RELATIVE_EPS)
    return StepStats(mean_entropy, mean_margin, roec, count)
