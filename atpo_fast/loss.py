"""TraceRL's policy loss, which ATPO leaves unchanged, and group-normalised advantages."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N] in consecutive groups of group_size -> (advantages [N], informative [N] bool).

    Each reward is z-scored within its group (population std); a group whose rewards are all equal
    gets 0 and is marked uninformative (it carries no learning signal).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got "
                         f"{tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    spread = std > 0
    advantages = torch.where(spread, (grouped - grouped.mean(1, keepdim=True)) / torch.where(spread, std, 1.0), 0.0)
    return advantages.flatten(), spread.expand_as(grouped).flatten()


def clipped_policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    row: torch.Tensor,
    num_rows: int,
    clip_eps: float = 0.2,
    kl_beta: float = 0.01,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate over target tokens, averaged per row, summed over rows / num_rows.

    logprob, old_logprob, advantages [P]: per target token; row [P]: its row in this micro-batch
    (every row holds at least one target). Per token: -min(r A, clip(r, 1-eps, 1+eps) A) +
    kl_beta * k3, with r = exp(logprob - old_logprob) and k3 = exp(-d) + d - 1 at d = logprob -
    old_logprob. Dividing by the total row count num_rows lets micro-batches accumulate gradients.
    Returns (loss, detached stats: clip fraction, mean k3 KL, mean ratio).
    """
    delta = logprob - old_logprob
    ratio = delta.exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl = torch.expm1(-delta) + delta
    per_token = -surrogate + kl_beta * kl
    rows = int(row.max()) + 1 if row.numel() else 0
    row_sum = per_token.new_zeros(rows).index_add(0, row, per_token)
    row_count = torch.bincount(row, minlength=rows).clamp_min(1)
    loss = (row_sum / row_count).sum() / num_rows
    with torch.no_grad():
        stats = {"clip_fraction": ((ratio - 1).abs() > clip_eps).float().mean(), "kl": kl.mean(),
                 "ratio": ratio.mean()}
    return loss, stats
