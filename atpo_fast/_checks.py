"""Input validation shared by every op: each failure is a ValueError naming the argument."""

from __future__ import annotations

import math

import torch

from atpo_fast.choices import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE_INDEX = -100


def check_float(tensor: torch.Tensor, name: str, backend: str) -> None:
    """A float32/bfloat16/float16 tensor; float64 too on the torch backend (for gradcheck)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype in FLOAT_DTYPES or (tensor.dtype == torch.float64 and backend == "torch"):
        return
    extra = " (float64 only with backend='torch')" if tensor.dtype == torch.float64 else ""
    raise ValueError(f"{name} must be float32, bfloat16 or float16{extra}, got {tensor.dtype}")


def check_logits(logits: torch.Tensor, backend: str, name: str = "logits") -> int:
    """Check a [..., V] float tensor with a unit-stride last dim; returns V."""
    check_float(logits, name, backend)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"{name} needs a vocabulary dimension V >= 2, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must be unit-stride in its last (vocabulary) dim, got strides {logits.stride()}; "
            "call .contiguous() first"
        )
    return vocab


def check_targets(
    targets: torch.Tensor,
    shape: torch.Size,
    vocab: int,
    device: torch.device,
    *,
    allow_ignore: bool,
    name: str = "targets",
) -> None:
    """Check int64 targets of `shape` on `device` with values in [0, vocab) (or IGNORE_INDEX).

    The value range (which needs the data) is checked in eager mode, not inside torch.compile.
    """
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {targets.dtype}")
    if targets.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} must be on {device}, got {targets.device}")
    if targets.numel() == 0 or torch.compiler.is_compiling():
        return  # a value check cannot run inside a traced graph; eager calls always check
    valid = (targets >= 0) & (targets < vocab)
    if allow_ignore:
        valid |= targets == IGNORE_INDEX
    if not bool(valid.all()):
        bad = targets[~valid][0].item()
        allowed = f"[0, {vocab})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(f"{name} must lie in {allowed}, found {bad}")


def check_temperature(temperature: float | None, *, allow_zero: bool, name: str = "temperature") -> float:
    """Return the temperature as a float (None -> 0.0); negative, NaN or inf raise."""
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0 or (temperature == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {expected}, got {temperature}")
    return temperature


def check_seed(seed: int | None, name: str = "seed") -> None:
    """None, or an int in [0, 2**64) (what torch.Generator.manual_seed takes)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"{name} must be an int in [0, 2**64) or None, got {seed!r}")


def check_backend(backend: str, tensor: torch.Tensor, name: str) -> str:
    """Resolve "auto" to "triton" on CUDA and "torch" elsewhere for the device of `tensor` (the
    argument called `name`); validate explicit choices."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    device = tensor.device
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        from atpo_fast.kernels import interpreter_enabled

        if not interpreter_enabled():
            raise ValueError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 in the environment before "
                "atpo_fast is imported; use backend='torch' or a CUDA tensor"
            )
    return backend

