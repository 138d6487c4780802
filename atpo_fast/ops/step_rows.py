"""build_step_rows: selected denoising steps to training rows, gathering only what the loss needs.

Row r (sequence b, interval [start, end)): input_ids[r] is tokens[b] with every position whose
step_map >= start set to mask_id (the state before step `start`); its targets are the positions
with start <= step_map < end. The native path is the C++/CUDA extension atpo_fast._C; the torch
path is a vectorised fallback with the same results and the same input checks.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch


class StepRows(NamedTuple):
    input_ids: torch.Tensor  # [R, L] int64
    target_mask: torch.Tensor  # [R, L] bool
    seq_index: torch.Tensor  # [R] int64: the sequence each row comes from
    step_start: torch.Tensor  # [R] int64: the interval's first step
    target_row: torch.Tensor  # [P] int64: flat target coordinates, ordered by row then position
    target_pos: torch.Tensor  # [P] int64
    target_token: torch.Tensor  # [P] int64: tokens[seq_index[target_row], target_pos]


def native_extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from atpo_fast import _C
    except ImportError:
        return None
    return _C


def _check_layout(tokens, step_map, starts, ends, mask_id) -> None:
    """Types, shapes, dtypes and devices (no device sync), checked before either path runs."""
    for name, t in (("tokens", tokens), ("step_map", step_map), ("starts", starts), ("ends", ends)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape [B, L], got {list(tokens.shape)}")
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64, got {tokens.dtype}")
    if step_map.shape != tokens.shape:
        raise ValueError(f"step_map must have tokens' shape {list(tokens.shape)}, got {list(step_map.shape)}")
    if step_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step_map must be int32 or int64, got {step_map.dtype}")
    if starts.dim() != 2 or starts.shape[0] != tokens.shape[0]:
        raise ValueError(f"starts must have shape [B={tokens.shape[0]}, k], got {list(starts.shape)}")
    if ends.shape != starts.shape:
        raise ValueError(f"ends must have starts' shape {list(starts.shape)}, got {list(ends.shape)}")
    for name, t in (("starts", starts), ("ends", ends)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}")
    for name, t in (("step_map", step_map), ("starts", starts), ("ends", ends)):
        if t.device != tokens.device:
            raise ValueError(f"{name} must be on tokens' device {tokens.device}, got {t.device}")
    if mask_id < 0:
        raise ValueError(f"mask_id must be >= 0, got {mask_id}")


def _check_values(step_map, starts, ends) -> None:
    """The value checks (csrc/step_rows.cpp makes them too, with the same messages), a few device syncs.

    Made in Python before either path runs: an exception thrown inside the extension crashed the
    process on one CUDA machine (an extension built with another GCC than torch's), so user errors
    never reach the C++ side.
    """
    if step_map.numel() and int(step_map.min()) < -1:
        raise ValueError(f"step_map must hold steps >= 0 or -1 (prompt / never masked), found {int(step_map.min())}")
    unused = (starts == -1) | (ends == -1)
    if bool((unused & (starts != ends)).any()):
        b, j = (unused & (starts != ends)).nonzero()[0].tolist()
        raise ValueError(f"starts and ends must mark an unused slot with -1 together; slot [{b}, {j}] has start "
                         f"{int(starts[b, j])} and end {int(ends[b, j])}")
    if bool(((starts < 0) & ~unused).any()):
        raise ValueError(f"starts must be >= 0 or -1, got {int(starts[(starts < 0) & ~unused][0])}")
    if bool(((starts > ends) & ~unused).any()):
        b, j = ((starts > ends) & ~unused).nonzero()[0].tolist()
        raise ValueError(f"starts must not exceed ends, got start {int(starts[b, j])} > end {int(ends[b, j])} "
                         f"at [{b}, {j}]")


def build_step_rows_torch(tokens, step_map, starts, ends, mask_id: int) -> StepRows:
    """Vectorised PyTorch fallback of the extension (same outputs, same checks)."""
    _check_layout(tokens, step_map, starts, ends, mask_id)
    _check_values(step_map, starts, ends)
    seq_index, slot = (starts != -1).nonzero(as_tuple=True)
    start, end = starts[seq_index, slot], ends[seq_index, slot]
    steps = step_map[seq_index].long()
    masked = steps >= start[:, None]
    target_mask = masked & (steps < end[:, None])
    row_tokens = tokens[seq_index]
    input_ids = torch.where(masked, mask_id, row_tokens)
    target_row, target_pos = target_mask.nonzero(as_tuple=True)
    return StepRows(input_ids, target_mask, seq_index, start, target_row, target_pos,
                    row_tokens[target_row, target_pos])


def build_step_rows(
    tokens: torch.Tensor,
    step_map: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    mask_id: int,
    *,
    backend: str = "auto",
) -> StepRows:
    """Training rows for the selected intervals of every response.

    tokens [B, L] int64 (prompt + response); step_map [B, L] int32/int64, the step at which each
    position was committed (-1: prompt or never masked); starts, ends [B, k] int64 intervals
    [start, end), -1 in both marking an unused slot. Rows are the used slots ordered by sequence
    then slot. backend: "auto" (the extension when built, else torch), "native" or "torch".
    """
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise ValueError(f"mask_id must be an int, got {type(mask_id).__name__}")
    ext = native_extension()
    if backend == "native" and ext is None:
        raise ValueError("backend='native' needs the extension atpo_fast._C, which is not built; reinstall with "
                         "`pip install --no-build-isolation -e .` or use backend='torch'")
    on_cuda = isinstance(tokens, torch.Tensor) and tokens.is_cuda
    use_native = ext is not None and backend != "torch" and (not on_cuda or ext.with_cuda or backend == "native")
    if use_native:
        _check_layout(tokens, step_map, starts, ends, mask_id)  # user errors never reach the C++ side
        _check_values(step_map, starts, ends)
        return StepRows(*ext.build_step_rows(tokens, step_map, starts, ends, mask_id))
    if on_cuda and backend == "auto" and not _warned_cuda_fallback:
        _warn_cuda_fallback(ext)
    return build_step_rows_torch(tokens, step_map, starts, ends, mask_id)


_warned_cuda_fallback = False


def _warn_cuda_fallback(ext) -> None:
    """Say once that CUDA rows are built by the torch path because the extension has no CUDA kernels."""
    global _warned_cuda_fallback
    _warned_cuda_fallback = True
    why = "is not built" if ext is None else "was built without its CUDA sources (see the build log)"
    warnings.warn(f"build_step_rows: atpo_fast._C {why}; CUDA tensors take the torch path "
                  "(same rows, slower). Reinstall with a CUDA toolkit matching torch's CUDA version.", stacklevel=3)
