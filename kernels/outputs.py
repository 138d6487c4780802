"""Output buffers of the row-statistics ops, shared by the Triton and torch paths (no Triton import)."""

from __future__ import annotations

import torch

TOP2_FIELDS = ("top1_prob", "margin", "argmax", "sampled", "sampled_prob")
INDEX_FIELDS = ("argmax", "sampled")


def row_stat_outputs(
    n_rows: int, device: torch.device, *, entropy: bool, lse: bool, targets: bool, top2: bool,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Empty [n_rows] outputs, `dtype` except the int64 index fields, for the requested statistics."""
    names = [n for n, on in (("entropy", entropy), ("lse", lse), ("target_logprob", targets)) if on]
    if top2:
        names += TOP2_FIELDS
    return {
        name: torch.empty(n_rows, dtype=torch.int64 if name in INDEX_FIELDS else dtype, device=device)
        for name in names
    }
