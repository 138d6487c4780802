"""fused_linear_logprobs: log p(target) from hidden states times the LM head, never holding [N, V] logits.

The vocabulary is walked in slices of at most VOCAB_TILE rows of the weight, the rows in chunks
sized so that one logits tile takes at most `chunk_bytes` (in float32). Each tile is one GEMM in
hidden's dtype; one pass over it then gives the per-row log-sum-exp and target logit (forward) or
the gradient d logp / d logits (backward, written in the tile's dtype and fed straight to the two
gradient GEMMs). On CUDA those passes are the Triton kernels of selected_logprobs
(`backend="triton"`, which on CPU runs them under TRITON_INTERPRET=1); the torch backend uses a
few in-place torch ops on a float32 tile. The forward merges the slices' log-sum-exps and saves
only lse [N]; the backward recomputes each tile. Vocabulary slices are the outer loop, so each
weight slice is cast once and its gradient is accumulated in float32 over the row chunks (on
CUDA by addmm with a float32 output) before being written.

Peak extra memory: a few tiles (<= chunk_bytes each), a float32 [VOCAB_TILE, D] weight-gradient
slice, and, when hidden is bf16/fp16, a float32 [N, D] buffer for hidden's gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from atpo_fast._checks import IGNORE_INDEX, check_backend, check_float, check_targets, check_temperature
from atpo_fast.ops.token_stats import working_dtype

CUDA_CHUNK_BYTES = 256 * 2**20  # default float32 logits tile on CUDA
CPU_CHUNK_BYTES = 32 * 2**20  # smaller on CPU: caches are smaller and nothing runs in parallel to hide
VOCAB_TILE = 32768
NO_ONE_HOT = -1  # a tile's local target when the row's target lies in another vocabulary slice


def _tile_shape(vocab: int, chunk_bytes: int) -> tuple[int, int]:
    cols = min(vocab, VOCAB_TILE)
    return max(1, chunk_bytes // (cols * 4)), cols


def _logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T + bias in hidden's dtype; hidden [R, D], weight [C, D] -> [R, C]."""
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def _vocab_slices(weight, bias, compute_dtype, cols):
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        b = None if bias is None else bias[v0:v1].to(compute_dtype)
        yield v0, v1, weight[v0:v1].to(compute_dtype), b


def _local_targets(targets: torch.Tensor, v0: int, v1: int, outside: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of targets inside [v0, v1), their column in the slice; `outside` elsewhere, -100 kept)."""
    inside = (targets >= v0) & (targets < v1)
    local = torch.where(inside, targets - v0, torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, outside))
    return inside, local


def _tile_lse(z: torch.Tensor, local: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a logits tile z [R, C]: (log-sum-exp of scale * z, scale * z at the local target)."""
    if backend == "triton":
        from atpo_fast.kernels.token_stats import softmax_row_stats

        out = softmax_row_stats(z, scale=scale, targets=local, top2=False, entropy=False, lse=True)
        return out["lse"], out["target_logprob"] + out["lse"]
    z = z.to(working_dtype(z.dtype))  # this function's own tile: scaled in place
    if scale != 1.0:
        z.mul_(scale)
    return torch.logsumexp(z, dim=1), z.gather(1, local.clamp_min(0)[:, None]).squeeze(1)


def _tile_grad(z: torch.Tensor, local: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, scale: float,
               backend: str) -> torch.Tensor:
    """d(sum_r g_r logp_r) / d z for a logits tile z [R, C], in z's dtype: g * scale * (onehot - p).

    local: each row's target column in the tile, NO_ONE_HOT when it is elsewhere, -100 (zeros).
    """
    if backend == "triton":
        from atpo_fast.kernels.selected_logprobs import logprob_backward

        return logprob_backward(z, local, lse, g, scale)
    gs = (g.to(lse.dtype) * scale).masked_fill(local == IGNORE_INDEX, 0.0)
    grad = z.to(lse.dtype)  # z is this function's own tile: worked on in place when already that dtype
    if scale != 1.0:
        grad.mul_(scale)
    grad.sub_(lse[:, None]).exp_().mul_(-gs[:, None])
    inside = local >= 0
    grad.scatter_add_(1, local.clamp_min(0)[:, None], torch.where(inside, gs, 0.0)[:, None])
    return grad.to(z.dtype)


@torch.library.custom_op("atpo_fast::fused_linear_logprobs", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             scale: float, chunk_bytes: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, work = hidden.shape[0], working_dtype(hidden.dtype)
    rows, cols = _tile_shape(weight.shape[0], chunk_bytes)
    lse = torch.full((n_rows,), float("-inf"), dtype=work, device=hidden.device)
    target_logit = torch.zeros(n_rows, dtype=work, device=hidden.device)
    for v0, v1, w, b in _vocab_slices(weight, bias, hidden.dtype, cols):
        inside, local = _local_targets(targets, v0, v1, outside=IGNORE_INDEX)
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            tile_lse, picked = _tile_lse(_logits_tile(hidden[r0:r1], w, b), local[r0:r1], scale, backend)
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], tile_lse.to(work))
            target_logit[r0:r1] += torch.where(inside[r0:r1], picked.to(work), 0.0)
    logprob = torch.where(targets == IGNORE_INDEX, 0.0, target_logit - lse)
    return logprob, lse


@_forward.register_fake
def _(hidden, weight, bias, targets, scale, chunk_bytes, backend):
    dtype = working_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=dtype)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the product kept in acc's (wider) dtype, never rounded to a's dtype first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # bf16/fp16 GEMM with an fp32 result (cuBLAS)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # exact upcast; CPU GEMMs have no out_dtype


@torch.library.custom_op("atpo_fast::fused_linear_logprobs_backward", mutates_args=())
def _backward(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              targets: torch.Tensor, lse: torch.Tensor, scale: float, chunk_bytes: int, backend: str,
              need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, work = hidden.shape[0], working_dtype(hidden.dtype)
    rows, cols = _tile_shape(weight.shape[0], chunk_bytes)
    grad_hidden = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    wide = torch.float64 if work == torch.float64 else torch.float32
    for v0, v1, w, b in _vocab_slices(weight, bias, hidden.dtype, cols):
        _, local = _local_targets(targets, v0, v1, outside=NO_ONE_HOT)
        acc_weight = torch.zeros(v1 - v0, weight.shape[1], dtype=wide, device=weight.device) if need_weight else None
        acc_bias = torch.zeros(v1 - v0, dtype=wide, device=weight.device) if need_bias else None
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            grad_z = _tile_grad(_logits_tile(hidden[r0:r1], w, b), local[r0:r1], lse[r0:r1], grad_out[r0:r1],
                                scale, backend)
            if need_bias:
                acc_bias += grad_z.sum(0, dtype=wide)
            if need_hidden:
                _accumulate(grad_hidden[r0:r1], grad_z, w)
            if need_weight:
                _accumulate(acc_weight, grad_z.t(), hidden[r0:r1])
        if need_weight:
            grad_weight[v0:v1] = acc_weight
        if need_bias:
            grad_bias[v0:v1] = acc_bias
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


@_backward.register_fake
def _(grad_out, hidden, weight, bias, targets, lse, scale, chunk_bytes, backend, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, scale, chunk_bytes, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.scale, ctx.chunk_bytes, ctx.backend = scale, chunk_bytes, backend
    ctx.mark_non_differentiable(output[1])


def _grad(ctx, grad_logprob, _grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = _backward(grad_logprob, hidden, weight, bias, targets, lse, ctx.scale, ctx.chunk_bytes, ctx.backend,
                      need_hidden, need_weight, need_bias and bias is not None)
    grads = [g if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias))]
    return grads[0], grads[1], grads[2], None, None, None, None


torch.library.register_autograd("atpo_fast::fused_linear_logprobs", _grad, setup_context=_setup_context)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[target], differentiable in hidden, weight, bias.

    hidden [N, D] and weight [V, D] (the LM head) float32/bfloat16/float16 (float64 for gradcheck);
    the matmuls run in hidden's dtype. bias [V] optional. targets int64 [N] in [0, V) or -100
    (gives 0, no gradient). Returns float32 [N]. No [N, V] logits tensor is ever held: one tile
    of logits takes at most chunk_bytes in float32 (default 256 MiB on CUDA, 32 MiB on CPU).
    backend: the one-pass tile ops, "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch";
    float64 inputs (gradcheck) need "torch" or "auto".
    """
    if backend == "auto" and torch.float64 in (getattr(hidden, "dtype", None), getattr(weight, "dtype", None)):
        backend = "torch"  # gradcheck's float64: the Triton kernels take 16- and 32-bit floats
    backend = check_backend(backend, hidden, "hidden")
    check_float(hidden, "hidden", backend)
    check_float(weight, "weight", backend)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, D], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, D={hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"weight needs a vocabulary dimension V >= 2, got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if bias is not None:
        check_float(bias, "bias", backend)
        if bias.shape != (weight.shape[0],) or bias.device != hidden.device:
            raise ValueError(f"bias must have shape [V={weight.shape[0]}] on {hidden.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    check_targets(targets, hidden.shape[:1], weight.shape[0], hidden.device, allow_ignore=True)
    temperature = check_temperature(temperature, allow_zero=False)
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if hidden.is_cuda else CPU_CHUNK_BYTES
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    logprob, _ = _forward(hidden, weight, bias, targets, 1.0 / temperature, chunk_bytes, backend)
    return logprob
