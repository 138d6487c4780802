"""token_stats: entropy, top-1 probability, margin, argmax and a sampled token in one pass over logits."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from atpo_fast._checks import check_backend, check_logits, check_targets, check_temperature
from atpo_fast.ops.torch_stats import softmax_row_stats_torch

_FIELDS = ("entropy", "top1_prob", "margin", "argmax", "sampled", "sampled_prob")


class TokenStats(NamedTuple):
    """Per-token statistics, each of the logits' leading shape; float32 except the int64 indices.

    Rows holding NaN or +inf, or only -inf, give NaN values and index -1.
    """

    entropy: torch.Tensor  # -sum p log p (natural log)
    top1_prob: torch.Tensor  # p1
    margin: torch.Tensor  # p1 - p2
    argmax: torch.Tensor  # int64, first index on ties
    sampled: torch.Tensor  # int64, a draw from softmax(logits / temperature) (argmax when temperature is 0)
    sampled_prob: torch.Tensor  # probability of `sampled` under the untempered softmax
    target_logprob: Optional[torch.Tensor] = None  # log p(target), when targets are given


def _draw_seed() -> int:
    """A seed from torch's global CPU generator, so torch.manual_seed makes runs repeatable."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _token_stats_impl(
    logits: torch.Tensor, temperature: float, seed: Optional[int], targets: Optional[torch.Tensor], backend: str
) -> list[torch.Tensor]:
    if backend == "triton":
        from atpo_fast.kernels.token_stats import softmax_row_stats

        out = softmax_row_stats(logits, temperature=temperature, seed=_draw_seed() if seed is None else seed,
                                targets=targets)
    else:
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=logits.device).manual_seed(seed)
        out = softmax_row_stats_torch(logits, temperature=temperature, generator=generator, targets=targets)
    target_logprob = out.get("target_logprob", logits.new_empty(0, dtype=torch.float32))
    return [out[name] for name in _FIELDS] + [target_logprob]


# The registered op is what torch.compile traces; eager calls skip the dispatcher (tens of microseconds
# of host time, as much as the kernels themselves take on a few hundred rows).
_token_stats_op = torch.library.custom_op("atpo_fast::token_stats", mutates_args=())(_token_stats_impl)


@_token_stats_op.register_fake
def _(logits, temperature, seed, targets, backend):
    n = logits.numel() // logits.shape[-1]
    f32 = [logits.new_empty(n, dtype=torch.float32) for _ in range(3)]
    idx = [logits.new_empty(n, dtype=torch.int64) for _ in range(2)]
    return f32 + idx + [logits.new_empty(n, dtype=torch.float32),
                        logits.new_empty(n if targets is not None else 0, dtype=torch.float32)]


def token_stats(
    logits: torch.Tensor,
    *,
    temperature: float | None = None,
    targets: torch.Tensor | None = None,
    seed: int | None = None,
    backend: str = "auto",
) -> TokenStats:
    """Softmax statistics of logits [..., V] (float32, bfloat16 or float16; unit-stride last dim).

    Each logit is read once; nothing of size [..., V] is allocated. temperature (>= 0; None or 0
    means greedy) only affects `sampled`. targets: optional int64 [...] in [0, V) for
    target_logprob. seed makes sampling repeatable (the Triton and torch backends draw different
    streams); without it, torch's global generator decides. backend: "auto" (Triton on CUDA,
    chunked torch elsewhere), "triton" or "torch".
    """
    backend = check_backend(backend, logits, "logits")
    vocab = check_logits(logits, backend)
    temperature = check_temperature(temperature, allow_zero=True)
    if targets is not None:
        check_targets(targets, logits.shape[:-1], vocab, logits.device, allow_ignore=False)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    op = _token_stats_op if torch.compiler.is_compiling() else _token_stats_impl
    outs = op(logits, temperature, seed, targets, backend)
    shape = logits.shape[:-1]
    fields = [o.view(shape) for o in outs[:-1]]
    target_logprob = outs[-1].view(shape) if targets is not None else None
    return TokenStats(*fields, target_logprob)
