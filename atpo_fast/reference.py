"""Plain float64 implementations of the method's definitions: the ground truth of the tests.

Written for clarity, not speed or memory: every function here materialises [N, V] float64.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _invalid_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows holding NaN or +inf, or nothing but -inf."""
    return torch.isnan(z).any(-1) | (z == float("inf")).any(-1) | (z == float("-inf")).all(-1)


def token_stats(logits: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """entropy, top1_prob, margin, argmax, probs (and target_logprob) of softmax(logits) in float64.

    logits [..., V]; every output has the leading shape except probs [..., V]. Invalid rows give
    NaN and index -1.
    """
    z = logits.double()
    invalid = _invalid_rows(z)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = p.topk(2, dim=-1).values
    out = {
        "entropy": entropy,
        "top1_prob": top[..., 0],
        "margin": top[..., 0] - top[..., 1],
        "argmax": z.argmax(-1),
        "probs": p,
    }
    if targets is not None:
        out["target_logprob"] = logp.gather(-1, targets[..., None]).squeeze(-1)
    for name, value in out.items():
        if name == "argmax":
            out[name] = value.masked_fill(invalid, -1)
        elif name != "probs":
            out[name] = value.masked_fill(invalid, float("nan"))
    return out


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] in float64; targets of -100 give 0."""
    ignored = targets == IGNORE_INDEX
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    picked = logp.gather(-1, targets.masked_fill(ignored, 0)[..., None]).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def step_stats(entropy, margin, token_mask, prev_entropy=None, relative=False) -> dict[str, torch.Tensor]:
    """Per-sequence mean entropy and margin over token_mask [..., L], count, and RoEC, in float64."""
    entropy, margin = entropy.double(), margin.double()
    count = token_mask.sum(-1)
    mean_h = torch.stack([e[m].mean() for e, m in zip(entropy.reshape(-1, entropy.shape[-1]),
                                                        token_mask.reshape(-1, token_mask.shape[-1]))])
    mean_m = torch.stack([g[m].mean() for g, m in zip(margin.reshape(-1, margin.shape[-1]),
                                                       token_mask.reshape(-1, token_mask.shape[-1]))])
    mean_h, mean_m = mean_h.reshape(count.shape), mean_m.reshape(count.shape)
    if prev_entropy is None:
        roec = torch.zeros_like(mean_h)
    else:
        roec = (mean_h - prev_entropy.double()).abs()
        if relative:
            roec = roec / (prev_entropy.double() + 1e-6)
    return {"entropy": mean_h, "margin": mean_m, "roec": roec, "count": count}
