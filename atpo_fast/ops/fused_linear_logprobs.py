"""fused_linear_logprobs: log p(target) from hidden states times the LM head, never holding [N, V] logits.

The vocabulary is walked in slices of the weight's rows, each tile of logits covering every row at
once where the budget allows (then each weight slice's gradient is one GEMM over all rows), rows in
chunks otherwise; one float32 tile takes at most `chunk_bytes`. Each tile is one GEMM in hidden's
dtype; one pass over it then gives the per-row log-sum-exp and target logit (forward) or the
gradient d logp / d logits (backward, written in the tile's dtype and fed straight to the two
gradient GEMMs). On CUDA those passes are the Triton kernels of selected_logprobs
(`backend="triton"`, which on CPU runs them under TRITON_INTERPRET=1); the torch backend uses a
few in-place torch ops on a float32 tile. The forward merges the slices' log-sum-exps and saves
only lse [N]; the backward recomputes each tile. Vocabulary slices are the outer loop, so each
weight slice is cast once and its gradient is accumulated in float32 over the row chunks (on
CUDA by cuBLAS adding the float32 product straight into the accumulator, where the torch build
allows it) before being written.

A frozen LM head (no gradient for weight or bias, as under LoRA) takes another route with no
recomputation: the same walk also accumulates d logp_r / d hidden_r = scale * (W[target_r] - sum_v
p_rv W_v) online, like flash attention's output (each tile's exp(scale * z - the row's lse so far),
written in the tile's dtype by one Triton pass on CUDA, times the weight slice, the sum rescaled as
the lse grows), and the backward only scales it by the incoming gradient: two GEMMs in all, as many
as F.linear and its backward. Its log-probs are bit for bit those of the other route.

Peak extra memory: a few tiles (<= chunk_bytes each), a float32 [VOCAB_TILE, D] weight-gradient
slice, and, when hidden is bf16/fp16, a float32 [N, D] buffer for hidden's gradient (the frozen
head's route keeps that one from the forward to the backward).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from atpo_fast._checks import IGNORE_INDEX, check_backend, check_float, check_targets, check_temperature
from atpo_fast.ops.token_stats import scratch_tiles, working_dtype

CUDA_CHUNK_BYTES = 256 * 2**20  # default float32 logits tile on CUDA
CPU_CHUNK_BYTES = 16 * 2**20  # smaller on CPU: caches are smaller and nothing runs in parallel to hide
VOCAB_TILE = 8192  # widest vocabulary slice: bounds the float32 weight-gradient slice [VOCAB_TILE, D]
MIN_TILE_COLS = 1024  # the narrowest slice before the rows are chunked instead
GATHER_ROWS = 1024  # target rows of the weight gathered at once (the frozen head's route)
NO_ONE_HOT = -1  # a tile's local target when the row's target lies in another vocabulary slice


def _tile_shape(n_rows: int, vocab: int, chunk_bytes: int) -> tuple[int, int]:
    """(rows, cols) of one float32 logits tile of at most chunk_bytes: every row at once with as many
    vocabulary columns as fit (up to VOCAB_TILE), the rows chunked only below MIN_TILE_COLS columns.
    On a 2-core Intel Xeon (N=2048, V=32000, D=512, fp32, forward+backward, interleaved, one reused
    tile buffer) all rows by 1024 columns took 0.95x F.linear + selected_logprobs' time, by 2048 (the
    CPU default, 16 MiB) 0.94x, by 4096 1.02x, by 8192 1.06x."""
    cols = min(vocab, VOCAB_TILE, max(MIN_TILE_COLS, chunk_bytes // (4 * max(n_rows, 1))))
    return max(1, chunk_bytes // (4 * cols)), cols


def _logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ weight.T + bias in hidden's dtype; hidden [R, D], weight [C, D] -> [R, C], written
    into out (contiguous [R, C], hidden's dtype) when given.

    On CPU, 16-bit inputs are multiplied in float32 and the result rounded once, as a 16-bit GEMM
    with float32 accumulation gives it: this machine's CPU (AVX2, no AVX-512) ran a bf16 GEMM of
    [2048, 32000] x [32000, 512] in 115 s, the float32 one in 0.7 s.
    """
    if hidden.device.type == "cpu" and hidden.dtype in (torch.bfloat16, torch.float16):
        wide = _logits_tile(hidden.float(), weight.float(), None if bias is None else bias.float())
        return wide.to(hidden.dtype) if out is None else out.copy_(wide)
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


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
    z = z.to(working_dtype(z.dtype))
    if scale != 1.0:
        z = z * scale  # the caller's tile stays as it was
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


def _softmax_terms(z: torch.Tensor, shift: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """exp(scale * z - shift[:, None]) in z's dtype for a logits tile z [R, C] (the walk's own: the torch
    backend works on a float32 tile in place), shift [R] in the working dtype."""
    if backend == "triton":
        from atpo_fast.kernels.selected_logprobs import softmax_terms

        return softmax_terms(z, shift, scale)
    p = z.to(shift.dtype)
    if scale != 1.0:
        p.mul_(scale)
    return p.sub_(shift[:, None]).exp_().to(z.dtype)


def _walk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, scale: float,
          chunk_bytes: int, backend: str, with_hidden_grad: bool):
    """The forward's walk over the vocabulary: (logprob [N], lse [N], d logp_r / d hidden_r [N, D] or None).

    with_hidden_grad also accumulates sum_v p_rv W_v online: each tile's exp(scale * z - lse so far)
    times its weight slice, the sum rescaled by exp(old lse - new lse) as the row's lse grows.
    """
    n_rows, work = hidden.shape[0], working_dtype(hidden.dtype)
    rows, cols = _tile_shape(n_rows, weight.shape[0], chunk_bytes)
    lse = torch.full((n_rows,), float("-inf"), dtype=work, device=hidden.device)
    target_logit = torch.zeros(n_rows, dtype=work, device=hidden.device)
    expected_row = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if with_hidden_grad else None
    tile = scratch_tiles(min(rows, n_rows), cols, hidden.dtype, hidden.device)  # each tile GEMM writes here
    for v0, v1, w, b in _vocab_slices(weight, bias, hidden.dtype, cols):
        inside, local = _local_targets(targets, v0, v1, outside=IGNORE_INDEX)
        for r0 in range(0, n_rows, rows):
            part = slice(r0, min(r0 + rows, n_rows))
            z = _logits_tile(hidden[part], w, b, out=tile(part.stop - r0, v1 - v0))
            tile_lse, picked = _tile_lse(z, local[part], scale, backend)
            new_lse = torch.logaddexp(lse[part], tile_lse.to(work))
            if with_hidden_grad:
                shift = torch.where(new_lse == float("-inf"), 0.0, new_lse)  # a row of only -inf so far
                expected_row[part] *= torch.exp(lse[part] - shift)[:, None]
                _accumulate(expected_row[part], _softmax_terms(z, shift, scale, backend), w)
            lse[part] = new_lse
            target_logit[part] += torch.where(inside[part], picked.to(work), 0.0)
    ignored = targets == IGNORE_INDEX
    logprob = torch.where(ignored, 0.0, target_logit - lse)
    if not with_hidden_grad:
        return logprob, lse, None
    hidden_grad = expected_row  # scale * (W[target] - expected_row), in place, a few rows' weights at a time
    for r0 in range(0, n_rows, GATHER_ROWS):
        part = slice(r0, r0 + GATHER_ROWS)
        target_row = weight[targets[part].clamp_min(0)].to(hidden.dtype)
        hidden_grad[part].sub_(target_row.to(work)).mul_(-scale)
    return logprob, lse, hidden_grad.masked_fill_(ignored[:, None], 0.0)


@torch.library.custom_op("atpo_fast::fused_linear_logprobs", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             scale: float, chunk_bytes: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    logprob, lse, _ = _walk(hidden, weight, bias, targets, scale, chunk_bytes, backend, with_hidden_grad=False)
    return logprob, lse


@_forward.register_fake
def _(hidden, weight, bias, targets, scale, chunk_bytes, backend):
    dtype = working_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=dtype)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the product kept in acc's (wider) dtype, never rounded to a's dtype first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_addmm_accumulates_in_float32():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # cuBLAS adds the fp32 product into acc itself
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # bf16/fp16 GEMM with an fp32 result, then one add
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # exact upcast; CPU GEMMs have no out_dtype


@functools.lru_cache(maxsize=None)
def _cuda_addmm_accumulates_in_float32() -> bool:
    """Whether this torch's CUDA addmm takes bf16 factors, a float32 addend and out_dtype=float32 (the
    first builds with out_dtype wanted the addend in the factors' dtype): probed once on a 16 x 16 GEMM."""
    factor = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
    acc = torch.ones(16, 16, dtype=torch.float32, device="cuda")
    try:
        torch.addmm(acc, factor, factor, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 17.0).all())


@torch.library.custom_op("atpo_fast::fused_linear_logprobs_backward", mutates_args=())
def _backward(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              targets: torch.Tensor, lse: torch.Tensor, scale: float, chunk_bytes: int, backend: str,
              need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, work = hidden.shape[0], working_dtype(hidden.dtype)
    rows, cols = _tile_shape(n_rows, weight.shape[0], chunk_bytes)
    grad_hidden = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    tile = scratch_tiles(min(rows, n_rows), cols, hidden.dtype, hidden.device)  # each tile GEMM writes here
    for v0, v1, w, b in _vocab_slices(weight, bias, hidden.dtype, cols):
        _, local = _local_targets(targets, v0, v1, outside=NO_ONE_HOT)
        acc_weight = None
        if need_weight:  # the slice's own rows of grad_weight when it is already the accumulation dtype
            acc_weight = (grad_weight[v0:v1] if weight.dtype == work else
                          torch.empty(v1 - v0, weight.shape[1], dtype=work, device=weight.device)).zero_()
        acc_bias = torch.zeros(v1 - v0, dtype=work, device=weight.device) if need_bias else None
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            z = _logits_tile(hidden[r0:r1], w, b, out=tile(r1 - r0, v1 - v0))
            grad_z = _tile_grad(z, local[r0:r1], lse[r0:r1], grad_out[r0:r1], scale, backend)
            if need_bias:
                acc_bias += grad_z.sum(0, dtype=work)
            if need_hidden:
                _accumulate(grad_hidden[r0:r1], grad_z, w)
            if need_weight:
                _accumulate(acc_weight, grad_z.t(), hidden[r0:r1])
        if need_weight and weight.dtype != work:
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


@torch.library.custom_op("atpo_fast::fused_linear_logprobs_frozen_head", mutates_args=())
def _forward_frozen_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, scale: float, chunk_bytes: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] (the same values as _forward's) and d logp_r / d hidden_r [N, D] (float32,
    float64 for float64; zero rows at ignored targets): the route for a head that needs no gradient."""
    logprob, _, hidden_grad = _walk(hidden, weight, bias, targets, scale, chunk_bytes, backend, with_hidden_grad=True)
    return logprob, hidden_grad


@_forward_frozen_head.register_fake
def _(hidden, weight, bias, targets, scale, chunk_bytes, backend):
    work = working_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=work), hidden.new_empty(hidden.shape, dtype=work)


def _setup_frozen_head(ctx, inputs, output):
    ctx.hidden_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _grad_frozen_head(ctx, grad_logprob, _grad_unit):
    (hidden_grad,) = ctx.saved_tensors  # d logp_r / d hidden_r
    grad_hidden = (grad_logprob.to(hidden_grad.dtype)[:, None] * hidden_grad).to(ctx.hidden_dtype)
    return grad_hidden, None, None, None, None, None, None


torch.library.register_autograd("atpo_fast::fused_linear_logprobs_frozen_head", _grad_frozen_head,
                                setup_context=_setup_frozen_head)


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
    of logits takes at most chunk_bytes in float32 (default 256 MiB on CUDA, 16 MiB on CPU).
    backend: the one-pass tile ops, "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch";
    float64 inputs (gradcheck) need "torch" or "auto". When only hidden needs a gradient (a frozen
    head, as under LoRA), the forward also computes it and the backward recomputes nothing.
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
    frozen_head = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                   and (bias is None or not bias.requires_grad))
    if frozen_head:  # the hidden states' gradient from the forward's own walk: no recomputation
        logprob, _ = _forward_frozen_head(hidden, weight, bias, targets, 1.0 / temperature, chunk_bytes, backend)
    else:
        logprob, _ = _forward(hidden, weight, bias, targets, 1.0 / temperature, chunk_bytes, backend)
    return logprob
