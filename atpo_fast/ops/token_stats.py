"""token_stats: entropy, top-1 probability, margin, argmax and a sampled token in one pass over logits.

The Triton path is kernels/token_stats.py. The torch path (softmax_row_stats_torch, below) follows
the same state and merge rules on [rows, cols] chunks of at most `chunk_elems` elements, so no
[N, V] float32 temporary exists. It samples as the kernel does, by inverse CDF: one uniform per row
(from a torch.Generator) picks a chunk by the chunks' tempered sums, and a rescan of that chunk
alone picks the column. selected_logprobs and fused_linear_logprobs use the same machinery for
their forward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from atpo_fast._checks import (IGNORE_INDEX, check_backend, check_logits, check_seed, check_targets,
                               check_temperature)
from atpo_fast.kernels.outputs import row_stat_outputs

DEFAULT_CHUNK_ELEMS = 1 << 20
VOCAB_CHUNK = 32768
BLOCK = 256  # columns per first-level max block; VOCAB_CHUNK is a multiple of it


class _State(NamedTuple):
    m: torch.Tensor  # [R] running max of the scaled logits; NaN or +inf marks an invalid row
    d: torch.Tensor  # [R] sum exp(z - m)
    t: torch.Tensor  # [R] sum (z - m) exp(z - m)
    top1_idx: torch.Tensor  # [R]
    top2: torch.Tensor  # [R]


def _reference_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def scratch_tiles(rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    """One reusable buffer for a loop over tiles: tile(r, c) views its first r * c elements (r <= rows,
    c <= cols) as a contiguous [r, c] tensor. On CPU a fresh tensor of a few MiB per tile can come back
    from the kernel as new pages, zeroed on first touch, at every tile (glibc hands freed memory back
    once the top of its heap holds more than its trim threshold, which moves with the process's past
    allocations); one buffer per call faults in once. On a 2-core Intel Xeon: fused_linear_logprobs
    (N=2048, V=32000, D=512) 74k -> 23k page faults per forward+backward; the torch token_stats at
    V = 126464 4.1-7.3k -> 2.0k per call on 128 rows, 0.90-0.91x the time (greedy and T = 1), and up to
    24k faults per call (2.2x the time) in a process whose earlier allocations left the threshold low."""
    flat = torch.empty(rows * cols, dtype=dtype, device=device)
    return lambda r, c: flat[: r * c].view(r, c)


def _chunk_state(z: torch.Tensor, col0: int, inv_temperature: float | None, e: torch.Tensor,
                 w: torch.Tensor | None) -> tuple[_State, torch.Tensor | None]:
    """State of one chunk z [R, C] (float32, scaled, C a multiple of BLOCK; modified in place), and when
    sampling (inv_temperature set) the chunk's tempered sum, sum exp((z - m) * inv_temperature) [R]; e and w
    are scratch tensors of z's shape (overwritten; w only for a temperature other than 1).

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
    z.sub_(_reference_max(m)[:, None])  # z - m; -inf stays -inf
    e = torch.exp(z, out=e)
    d = e.sum(dim=1)
    tempered = None
    if inv_temperature == 1.0:
        tempered = d
    elif inv_temperature is not None:
        tempered = torch.exp(torch.mul(z, inv_temperature, out=w), out=w).sum(dim=1)
    t = torch.nansum(z.mul_(e), dim=1)  # -inf * 0 gives NaN: exactly the terms that are 0
    return _State(m, d, t, first_block * BLOCK + within + col0, top2), tempered


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
    return _State(
        m, da + db, ta + tb,
        torch.where(b.m > a.m, b.top1_idx, a.top1_idx),
        torch.maximum(torch.maximum(a.top2, b.top2), torch.minimum(a.m, b.m)),
    )


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are worked on in float64 (for gradcheck), everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _padded(cols: int) -> int:
    """cols rounded up to a multiple of BLOCK (a chunk's width, its tail -inf)."""
    return -(-cols // BLOCK) * BLOCK


def _load_chunk(x: torch.Tensor, scale: float, tile) -> torch.Tensor:
    """x [R, C] copied into tile(R, _padded(C)) (a scratch_tiles view in the working dtype), padded with
    -inf, times scale."""
    rows, cols = x.shape
    z = tile(rows, _padded(cols))
    z[:, :cols] = x
    z[:, cols:] = float("-inf")
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
    x = x.reshape(-1, vocab).detach()  # statistics carry no gradient, as on the Triton path
    n_rows = x.shape[0]
    out = row_stat_outputs(n_rows, x.device, entropy=entropy, lse=lse, targets=targets is not None, top2=top2,
                           dtype=working_dtype(x.dtype))
    cols = max(2, min(vocab, vocab_chunk))
    rows = max(1, chunk_elems // cols)
    inv_temperature = 1.0 / temperature if (top2 and temperature > 0) else None
    targets = targets.reshape(-1) if targets is not None else None

    # one uniform per row, drawn up front: a row's token does not depend on how the rows are chunked
    uniforms = (torch.rand(n_rows, generator=generator, dtype=torch.float64, device=x.device)
                if inv_temperature is not None else None)
    tiles = lambda: scratch_tiles(min(rows, n_rows), _padded(cols), working_dtype(x.dtype), x.device)  # noqa: E731
    z_tile, e_tile = tiles(), tiles()
    w_tile = tiles() if inv_temperature not in (None, 1.0) else None  # the tempered weights' scratch
    for r0 in range(0, n_rows, rows):
        state, chunk_max, chunk_tempered = None, [], []
        for c0 in range(0, vocab, cols):
            z = _load_chunk(x[r0:r0 + rows, c0:c0 + cols], scale, z_tile)
            chunk, tempered = _chunk_state(z, c0, inv_temperature, e_tile(*z.shape), w_tile and w_tile(*z.shape))
            state = chunk if state is None else _merge(state, chunk)
            chunk_max.append(chunk.m)
            chunk_tempered.append(tempered)
        sampled = None
        if inv_temperature is not None:
            sampled = _inverse_cdf_draw(x[r0:r0 + rows], scale, inv_temperature, cols, state.m,
                                        torch.stack(chunk_max), torch.stack(chunk_tempered),
                                        uniforms[r0:r0 + rows], z_tile)
        row_targets = targets[r0:r0 + rows] if targets is not None else None
        for name, value in _finish(state, x[r0:r0 + rows], scale, row_targets, sampled).items():
            if name in out:
                out[name][r0:r0 + rows] = value
    return out


def _inverse_cdf_draw(x: torch.Tensor, scale: float, inv_temperature: float, cols: int, m: torch.Tensor,
                      chunk_max: torch.Tensor, chunk_tempered: torch.Tensor, uniforms: torch.Tensor,
                      tile) -> torch.Tensor:
    """A column of each row x [R, V] drawn from softmax(x * scale * inv_temperature): the uniform times
    the row's tempered total picks the chunk (of `cols` columns) where the cumulative sum passes it, a
    rescan of that chunk the column. m [R]: the row max; chunk_max, chunk_tempered [n_chunks, R]: each
    chunk's max and tempered sum (_chunk_state); uniforms [R] float64 in [0, 1). Rows that are invalid
    (NaN, +inf, only -inf) get some in-range index, which _finish replaces with -1."""
    m_ref = _reference_max(m).double()
    # each chunk's share, on the row's scale: sum over the chunk of exp((z - m) * inv_temperature)
    weights = chunk_tempered.double() * torch.exp((chunk_max.double() - m_ref) * inv_temperature).nan_to_num(0.0)
    cumulative = weights.cumsum(0)
    target = uniforms * cumulative[-1]
    chunk = (cumulative <= target).sum(0).clamp(max=len(weights) - 1)  # the first chunk whose sum passes it
    residual = target - torch.where(chunk > 0, cumulative.gather(0, (chunk - 1).clamp(min=0)[None])[0], 0.0)
    sampled = torch.zeros_like(chunk)
    for c in chunk.unique().tolist():
        picked = (chunk == c).nonzero().squeeze(1)
        c0 = c * cols
        z = _load_chunk(x[picked, c0:c0 + cols], scale, tile)
        w = torch.exp((z - m_ref[picked, None].to(z.dtype)) * inv_temperature)  # -inf columns weigh 0
        column = torch.searchsorted(w.cumsum(1, dtype=torch.float64), residual[picked, None], right=True)[:, 0]
        # rounding can leave the residual at or past the chunk's own sum: its last column of positive weight
        last = torch.where(w > 0, torch.arange(w.shape[1], device=w.device), 0).amax(1)
        sampled[picked] = torch.minimum(column, last) + c0
    return sampled


def _finish(s: _State, x: torch.Tensor, scale: float, targets: torch.Tensor | None,
            sampled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Final statistics of rows x [R, V] from their merged state and drawn columns (None: greedy); NaN / -1
    for invalid rows."""
    m_ref = _reference_max(s.m)
    log_d = torch.log(s.d)
    invalid = ~torch.isfinite(s.m)  # NaN, +inf, or a row of -inf only

    def checked(v: torch.Tensor) -> torch.Tensor:
        return v.masked_fill(invalid, float("nan"))

    top1_prob = 1.0 / s.d
    argmax = s.top1_idx.masked_fill(invalid, -1)
    out = {
        "entropy": checked(log_d - s.t / s.d),
        "lse": m_ref + log_d,  # -inf for a row of only -inf (log 0), NaN for NaN or +inf (as the kernel)
        "top1_prob": checked(top1_prob),
        "margin": checked(-torch.expm1(s.top2 - m_ref) / s.d),
        "argmax": argmax,
        "sampled": argmax if sampled is None else sampled.masked_fill(invalid, -1),
        "sampled_prob": checked(top1_prob if sampled is None else
                                torch.exp(x.gather(1, sampled[:, None])[:, 0].to(m_ref.dtype) * scale - m_ref) / s.d),
    }
    if targets is not None:
        ignored = targets == IGNORE_INDEX
        x_t = x.gather(1, targets.masked_fill(ignored, 0)[:, None]).squeeze(1).to(m_ref.dtype) * scale
        out["target_logprob"] = checked(x_t - m_ref - log_d).masked_fill(ignored, 0.0)
    return out


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
    check_seed(seed)
    op = _token_stats_op if torch.compiler.is_compiling() else _token_stats_impl
    outs = op(logits, temperature, seed, targets, backend)
    shape = logits.shape[:-1]
    fields = [o.view(shape) for o in outs[:-1]]
    target_logprob = outs[-1].view(shape) if targets is not None else None
    return TokenStats(*fields, target_logprob)
