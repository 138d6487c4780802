"""Small helpers of the training code (trainer and warm start): derived seeds, the warm-up schedule."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 62-bit seed from any values (stable across runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly to its value over the first `steps` steps (none when steps is 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps) if steps else 1.0)
