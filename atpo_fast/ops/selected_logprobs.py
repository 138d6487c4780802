"""selected_logprobs: differentiable log p(target) from logits, without materialising the softmax.

Forward: one pass over the logits (the token_stats machinery with top-2 and sampling compiled out)
saves only the per-row log-sum-exp. Backward: one more pass writes grad * (onehot - softmax) / T
in the logits' dtype.
"""

from __future__ import annotations

import torch

from atpo_fast._checks import IGNORE_INDEX, check_backend, check_logits, check_targets, check_temperature
from atpo_fast.ops.token_stats import DEFAULT_CHUNK_ELEMS, scratch_tiles, softmax_row_stats_torch, working_dtype


def logprob_backward_torch(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, scale: float,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Torch twin of kernels.selected_logprobs.logprob_backward, chunked over rows (no [N, V] float32 temporary)."""
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab)
    targets, lse, grad_out = targets.reshape(-1), lse.reshape(-1), grad_out.reshape(-1)
    grad = torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
    rows = max(1, chunk_elems // vocab)
    tile = scratch_tiles(min(rows, x.shape[0]), vocab, working_dtype(x.dtype), x.device)
    for r0 in range(0, x.shape[0], rows):
        r1 = min(r0 + rows, x.shape[0])
        ignored = targets[r0:r1] == IGNORE_INDEX
        g = (grad_out[r0:r1].to(lse.dtype) * scale).masked_fill(ignored, 0.0)
        p = tile(r1 - r0, vocab).copy_(x[r0:r1]).mul_(scale).sub_(lse[r0:r1, None]).exp_()
        p.mul_(-g[:, None]).scatter_add_(1, targets[r0:r1].masked_fill(ignored, 0)[:, None], g[:, None])
        grad[r0:r1] = p.masked_fill_(ignored[:, None], 0.0)
    return grad.view(logits.shape)


@torch.library.custom_op("atpo_fast::selected_logprobs", mutates_args=())
def _forward(logits: torch.Tensor, targets: torch.Tensor, scale: float, with_entropy: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from atpo_fast.kernels.selected_logprobs import logprob_forward

        out = logprob_forward(logits, targets, scale, with_entropy)
    else:
        out = softmax_row_stats_torch(logits, scale=scale, targets=targets, top2=False, entropy=with_entropy, lse=True)
    entropy = out["entropy"] if with_entropy else out["lse"].new_empty(0)
    return out["target_logprob"], out["lse"], entropy


@_forward.register_fake
def _(logits, targets, scale, with_entropy, backend):
    n = logits.numel() // logits.shape[-1]
    dtype = working_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype),
            logits.new_empty(n if with_entropy else 0, dtype=dtype))


@torch.library.custom_op("atpo_fast::selected_logprobs_backward", mutates_args=())
def _backward(grad_out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: float,
              backend: str) -> torch.Tensor:
    if backend == "triton":
        from atpo_fast.kernels.selected_logprobs import logprob_backward

        return logprob_backward(logits, targets, lse, grad_out, scale)
    return logprob_backward_torch(logits, targets, lse, grad_out, scale)


@_backward.register_fake
def _(grad_out, logits, targets, lse, scale, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, scale, _, backend = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _grad(ctx, grad_logprob, _grad_lse, _grad_entropy):
    logits, targets, lse = ctx.saved_tensors
    return _backward(grad_logprob, logits, targets, lse, ctx.scale, ctx.backend), None, None, None, None


torch.library.register_autograd("atpo_fast::selected_logprobs", _grad, setup_context=_setup_context)


def selected_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log softmax(logits / temperature)[target].

    logits [..., V] float32/bfloat16/float16 (unit-stride last dim); targets int64 [...] in [0, V)
    or -100 (gives 0 and no gradient). Returns float32 log-probs [...], plus the entropy of the
    tempered distribution (no gradient) when return_entropy. The gradient reaches logits in their
    own dtype; nothing of size [N, V] is held in float32.
    """
    backend = check_backend(backend, logits, "logits")
    vocab = check_logits(logits, backend)
    check_targets(targets, logits.shape[:-1], vocab, logits.device, allow_ignore=True)
    temperature = check_temperature(temperature, allow_zero=False)
    logprob, _, entropy = _forward(logits, targets, 1.0 / temperature, return_entropy, backend)
    shape = logits.shape[:-1]
    if return_entropy:
        return logprob.view(shape), entropy.view(shape)
    return logprob.view(shape)

