"""Chunked PyTorch version of the one-pass softmax statistics (the CPU path).

Same state and merge rules as kernels/token_stats.py, computed on [rows, cols] chunks of at most
`chunk_elems` elements, so no [N, V] float32 temporary exists. Sampling draws uniform noise per
chunk from a torch.Generator and takes the Gumbel-max argmax z / T - log(-log u).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atpo_fast.kernels.outputs import row_stat_outputs

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMS = 1 << 20
VOCAB_CHUNK = 32768
BLOCK = 256  # columns per first-level max block; VOCAB_CHUNK is a multiple of it


class _State(NamedTuple):
    m: torch.Tensor  # [R] running max of the scaled logits; NaN or +inf marks an invalid row
    d: torch.Tensor  # [R] sum exp(z - m)
    t: torch.Tensor  # [R] sum (z - m) exp(z - m)
    top1_idx: torch.Tensor  # [R]
    top2: torch.Tensor  # [R]
    best: torch.Tensor | None  # [R] best perturbed score (sampling only)
    best_idx: torch.Tensor | None
    best_logit: torch.Tensor | None


def _reference_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _chunk_state(z: torch.Tensor, col0: int, inv_temperature: float | None, generator) -> _State:
    """State of one chunk z [R, C] (float32, scaled, C a multiple of BLOCK; modified in place).

    The max and its first index are found in two levels (max of each BLOCK columns, then inside
    the first block holding the row max), which is several times faster than argmax / topk on CPU.
    NaN and +inf propagate into m and mark the row invalid.
    """
    rows, cols = z.shape
    blocks = z.view(rows, cols // BLOCK, BLOCK)
    block_max = blocks.amax(2)
    m = block_max.amax(1)
    first_block = (block_max == m[:, None]).to(torch.uint8).argmax(1)
    inner = blocks.gather(1, first_block[:, None, None].expand(rows, 1, BLOCK)).squeeze(1)
    within = (inner == m[:, None]).to(torch.uint8).argmax(1)
    neg_inf = float("-inf")
    top2 = torch.maximum(block_max.scatter(1, first_block[:, None], neg_inf).amax(1),
                         inner.scatter(1, within[:, None], neg_inf).amax(1))
    best = best_idx = best_logit = None
    if inv_temperature is not None:
        gumbel = torch.empty_like(z).uniform_(generator=generator).log_().neg_().log_().neg_()
        score = gumbel.add_(z, alpha=inv_temperature)  # -inf logits stay -inf
        best_idx = score.argmax(dim=1)
        best = score.gather(1, best_idx[:, None]).squeeze(1)
        best_logit = z.gather(1, best_idx[:, None]).squeeze(1)
        del gumbel, score
        best_idx = best_idx + col0
    z.sub_(_reference_max(m)[:, None])  # z - m; -inf stays -inf
    e = torch.exp(z)
    d = e.sum(dim=1)
    t = torch.nansum(z.mul_(e), dim=1)  # -inf * 0 gives NaN: exactly the terms that are 0
    return _State(m, d, t, first_block * BLOCK + within + col0, top2, best, best_idx, best_logit)


def _merge(a: _State, b: _State) -> _State:
    """Merge the states of two column ranges, a before b."""
    m = torch.maximum(a.m, b.m)
    m_ref = _reference_max(m)

    def rescaled(s: _State) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.exp(s.m - m_ref)
        shift = torch.where(s.d > 0, s.m - m_ref, 0.0) * s.d
        return s.d * w, w * (s.t + shift)

    da, ta = rescaled(a)
    db, tb = rescaled(b)
    best = best_idx = best_logit = None
    if a.best is not None:
        b_better = b.best > a.best
        best = torch.maximum(a.best, b.best)
        best_idx = torch.where(b_better, b.best_idx, a.best_idx)
        best_logit = torch.where(b_better, b.best_logit, a.best_logit)
    return _State(
        m, da + db, ta + tb,
        torch.where(b.m > a.m, b.top1_idx, a.top1_idx),
        torch.maximum(torch.maximum(a.top2, b.top2), torch.minimum(a.m, b.m)),
        best, best_idx, best_logit,
    )


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are worked on in float64 (for gradcheck), everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load_chunk(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [R, C] as a fresh [R, ceil(C / BLOCK) * BLOCK] tensor in the working dtype, padded with -inf,
    times scale."""
    rows, cols = x.shape
    padded = -(-cols // BLOCK) * BLOCK
    dtype = working_dtype(x.dtype)
    if padded == cols:
        z = x.to(dtype, copy=True)
    else:
        z = torch.full((rows, padded), float("-inf"), dtype=dtype, device=x.device)
        z[:, :cols] = x
    return z if scale == 1.0 else z.mul_(scale)


def softmax_row_stats_torch(
    x: torch.Tensor,
    *,
    scale: float = 1.0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    targets: torch.Tensor | None = None,
    top2: bool = True,
    entropy: bool = True,
    lse: bool = False,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    vocab_chunk: int = VOCAB_CHUNK,
) -> dict[str, torch.Tensor]:
    """Torch twin of kernels.token_stats.softmax_row_stats on x [..., V]; outputs have shape [N].

    Works in float32, or float64 for float64 input; float outputs are in that dtype.
    """
    vocab = x.shape[-1]
    x = x.reshape(-1, vocab)
    n_rows = x.shape[0]
    out = row_stat_outputs(n_rows, x.device, entropy=entropy, lse=lse, targets=targets is not None, top2=top2,
                           dtype=working_dtype(x.dtype))
    cols = max(2, min(vocab, vocab_chunk))
    rows = max(1, chunk_elems // cols)
    inv_temperature = 1.0 / temperature if (top2 and temperature > 0) else None
    targets = targets.reshape(-1) if targets is not None else None

    for r0 in range(0, n_rows, rows):
        state = None
        for c0 in range(0, vocab, cols):
            chunk = _chunk_state(_load_chunk(x[r0:r0 + rows, c0:c0 + cols], scale), c0, inv_temperature, generator)
            state = chunk if state is None else _merge(state, chunk)
        row_targets = targets[r0:r0 + rows] if targets is not None else None
        for name, value in _finish(state, x[r0:r0 + rows], scale, row_targets).items():
            if name in out:
                out[name][r0:r0 + rows] = value
    return out


def _finish(s: _State, x: torch.Tensor, scale: float, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Final statistics of rows x [R, V] from their merged state; NaN / -1 for invalid rows."""
    m_ref = _reference_max(s.m)
    log_d = torch.log(s.d)
    invalid = ~torch.isfinite(s.m)  # NaN, +inf, or a row of -inf only

    def checked(v: torch.Tensor) -> torch.Tensor:
        return v.masked_fill(invalid, float("nan"))

    top1_prob = 1.0 / s.d
    argmax = s.top1_idx.masked_fill(invalid, -1)
    out = {
        "entropy": checked(log_d - s.t / s.d),
        "lse": checked(m_ref + log_d),
        "top1_prob": checked(top1_prob),
        "margin": checked(-torch.expm1(s.top2 - m_ref) / s.d),
        "argmax": argmax,
        "sampled": argmax if s.best is None else s.best_idx.masked_fill(invalid, -1),
        "sampled_prob": checked(top1_prob if s.best is None else torch.exp(s.best_logit - m_ref) / s.d),
    }
    if targets is not None:
        ignored = targets == IGNORE_INDEX
        x_t = x.gather(1, targets.masked_fill(ignored, 0)[:, None]).squeeze(1).to(m_ref.dtype) * scale
        out["target_logprob"] = checked(x_t - m_ref - log_d).masked_fill(ignored, 0.0)
    return out
