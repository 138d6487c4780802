"""The dLLM sampler: LLaDA-style semi-autoregressive block unmasking that records the trajectory.

At every denoising step: one model forward, the LM head applied to the masked positions of the
current block only ([MASK] itself excluded from the vocabulary), one token_stats pass over those
rows (entropy, margin, argmax or a sampled token and its probability), then the commit. The
per-step confusion signals come out of that same pass; nothing of size V outlives a step.
"""

from __future__ import annotations

import dataclasses

import torch

from atpo_fast._checks import check_seed, check_temperature
from atpo_fast.choices import CACHE_MODES, REMASKING_RULES
from atpo_fast.distributed import all_reduce
from atpo_fast.models.base import DiffusionLM
from atpo_fast.models.kv_cache import BlockCache
from atpo_fast.ops.step_stats import step_stats
from atpo_fast.ops.token_stats import token_stats
from atpo_fast.trace import Rollout, Trace


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of `steps` steps [B, steps]: even split, earlier steps take the remainder."""
    base, remainder = masked_count // steps, masked_count % steps
    return base[:, None] + (torch.arange(steps, device=masked_count.device)[None, :] < remainder[:, None]).long()


def _check_args(model, prompt_ids, attention_mask, gen_length, block_length, steps, remasking, threshold, seed):
    if not isinstance(model, DiffusionLM):
        raise ValueError(f"model must be an atpo_fast DiffusionLM, got {type(model).__name__}")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.int64:
        raise ValueError("prompt_ids must be an int64 tensor of shape [B, Lp]")
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    if steps % (gen_length // block_length):
        raise ValueError(f"steps ({steps}) must be divisible by the number of blocks ({gen_length // block_length})")
    if prompt_ids.numel():
        lowest, highest = torch.stack(torch.aminmax(prompt_ids)).tolist()  # one reduction, one host sync
        if lowest < 0 or highest >= model.vocab_size:
            raise ValueError(f"prompt_ids must lie in [0, {model.vocab_size}) (the model's vocabulary), found "
                             f"{lowest} .. {highest}")
    if prompt_ids.shape[1] + gen_length > model.max_length:
        raise ValueError(f"prompt_ids length {prompt_ids.shape[1]} plus gen_length {gen_length} exceeds the "
                         f"model's context of {model.max_length} tokens")
    if remasking not in REMASKING_RULES:
        raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {remasking!r}")
    if threshold is not None:
        if remasking not in ("low_confidence", "margin"):
            raise ValueError(f"threshold works with remasking 'low_confidence' or 'margin', got {remasking!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if attention_mask is not None:
        _check_left_padding(attention_mask, prompt_ids)
    check_seed(seed)


def _check_left_padding(attention_mask: torch.Tensor, prompt_ids: torch.Tensor) -> None:
    """attention_mask [B, Lp]: 0 then 1 along each row (left padding), at least one 1 per row."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt_ids.shape \
            or attention_mask.device != prompt_ids.device:
        raise ValueError(f"attention_mask must be a tensor of prompt_ids' shape {tuple(prompt_ids.shape)} on its "
                         f"device")
    if not attention_mask.numel():
        return
    mask = attention_mask.long()
    # one host sync for the three checks; right padding would put padding between a prompt and its response,
    # where a model whose position i predicts token i + 1 (Dream) would read the response's first token off it
    not_binary, right_padded, empty = torch.stack([
        ((mask != 0) & (mask != 1)).any() | (mask != attention_mask).any(),
        (mask[:, 1:] < mask[:, :-1]).any(), (mask[:, -1] == 0).any()]).tolist()
    if not_binary:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    if right_padded:
        raise ValueError("attention_mask must be left-padded (each row's 0s before its 1s); tokenize with "
                         "padding_side='left'")
    if empty:
        raise ValueError("attention_mask has a row without a real token; every prompt needs at least one")


def _scatter(values: torch.Tensor, b_idx, p_idx, shape, fill: float) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[b_idx, p_idx] = values
    return out


@dataclasses.dataclass
class StepDecision:
    """What one denoising step decided for the active block, each [B, block_length]."""

    commit: torch.Tensor  # bool: positions committed at this step
    tokens: torch.Tensor  # int64: the predicted token at each candidate (mask_id elsewhere)
    entropy: torch.Tensor  # per-candidate statistics (NaN off the candidates)
    margin: torch.Tensor
    logprob: torch.Tensor  # log p of the predicted token under the untempered softmax (NaN off the candidates)


def denoise_step(model: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None, window: slice,
                 k: torch.Tensor | None, *, threshold: float | None, temperature: float, remasking: str,
                 seed: int | None, generator: torch.Generator | None, backend: str,
                 block_cache: BlockCache | None = None) -> StepDecision:
    """One step on the block tokens[:, window]: forward, stats of its masked positions, commit decision.

    k [B]: how many to commit per sequence (schedule mode); with threshold, every candidate whose
    confidence is >= threshold and at least the best one. The LM head runs on the candidates only.
    block_cache: the block's KV cache (generate's cache="prefix" / "dual"), or None for a full forward.
    """
    candidates = tokens[:, window] == model.mask_id
    b_idx, p_idx = candidates.nonzero(as_tuple=True)
    if block_cache is not None:
        logits = block_cache.logits_at(tokens, b_idx, p_idx + window.start)
    else:
        logits = model.logits_at(tokens, attention_mask, b_idx, p_idx + window.start)
    logits[:, model.mask_id] = float("-inf")  # [MASK] is never a prediction
    stats = token_stats(logits, temperature=temperature, seed=seed, backend=backend)  # NaN rows: sampled -1
    score = {
        "low_confidence": lambda: stats.sampled_prob, "margin": lambda: stats.margin, "entropy": lambda: -stats.entropy,
        "random": lambda: torch.rand(stats.entropy.shape, generator=generator, device=tokens.device),
    }[remasking]().float()
    shape = candidates.shape
    confidence = _scatter(score, b_idx, p_idx, shape, float("-inf"))
    if threshold is None:
        rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
        commit = rank < k[:, None]
    else:
        best = torch.zeros_like(candidates).scatter_(1, confidence.argmax(dim=1, keepdim=True), True)
        commit = (confidence >= threshold) | (best & candidates)
    return StepDecision(commit, _scatter(stats.sampled, b_idx, p_idx, shape, model.mask_id),
                        _scatter(stats.entropy, b_idx, p_idx, shape, float("nan")),
                        _scatter(stats.margin, b_idx, p_idx, shape, float("nan")),
                        _scatter(stats.sampled_prob.log(), b_idx, p_idx, shape, float("nan")))


class _TraceRecorder:
    """Collects the per-step signals into a Trace."""

    FIELDS = ("entropy", "margin", "roec", "surprisal", "candidate_entropy", "candidate_margin", "count", "filled")

    def __init__(self):
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.FIELDS}
        self.blocks: list[int] = []
        self.prev_entropy = None

    def add(self, decision: StepDecision, candidates: torch.Tensor, filled: torch.Tensor, block: int):
        pair = (decision.entropy, decision.margin)
        committed = step_stats(pair, decision.commit, prev_entropy=self.prev_entropy)
        candidate = step_stats(pair, candidates)
        self.prev_entropy = committed.entropy
        surprisal = torch.where(decision.commit, -decision.logprob, 0.0).sum(1) / committed.count  # NaN at count 0
        values = dict(entropy=committed.entropy, margin=committed.margin, roec=committed.roec, surprisal=surprisal,
                      candidate_entropy=candidate.entropy, candidate_margin=candidate.margin, count=committed.count,
                      filled=filled)
        for name, value in values.items():
            self.rows[name].append(value)
        self.blocks.append(block)

    def trace(self, batch: int, device) -> Trace:
        stacked = {name: torch.stack(v, 1) if v else torch.empty(batch, 0, device=device)
                   for name, v in self.rows.items()}
        return Trace(**stacked, block=torch.tensor(self.blocks, dtype=torch.int64))


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    eos_fill: bool = False,
    record: bool = True,
    backend: str = "auto",
    process_group=None,
    cache: str = "none",
    cache_refresh: int | None = None,
) -> Rollout:
    """Unmask a response of gen_length tokens after prompt_ids [B, Lp] (left-padded, with attention_mask
    [B, Lp] of 0s then 1s, as DiffusionLM.encode_prompts makes them; right padding is refused).

    Blocks of block_length are completed left to right, each over steps / num_blocks steps, the
    block's masked count spread evenly (earlier steps take the remainder). remasking picks which
    candidates to commit: "low_confidence" (highest probability of the sampled token, untempered),
    "margin" (highest p1 - p2), "entropy" (lowest entropy) or "random". With threshold=x every
    candidate whose confidence is >= x is committed instead, at least one per step, until the block
    is done. A scheduled step at which no sequence would commit anything (more steps than masked
    tokens, or a block already filled) is skipped: no forward, no trace column. temperature 0 is
    greedy. eos_fill: once a response holds an EOS, its later masked positions are committed as EOS
    at that step. seed makes sampling and random remasking repeatable. record=False skips the trace
    (Rollout.trace is None). process_group (torch.distributed): a step is skipped only where it
    would commit nothing on every rank, so all ranks run the same forwards (FSDP needs that) and
    record the same steps. cache: "none" (a full forward per step, exact), "prefix" or "dual" (block
    KV caches, models/kv_cache.py: a full forward when a block starts, then the block's queries only);
    cache_refresh=n makes that full forward again every n steps of a block (n = 1: the exact sampler).
    """
    _check_args(model, prompt_ids, attention_mask, gen_length, block_length, steps, remasking, threshold, seed)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache_refresh is not None and (isinstance(cache_refresh, bool) or not isinstance(cache_refresh, int)
                                      or cache_refresh < 1):
        raise ValueError(f"cache_refresh must be a positive int or None, got {cache_refresh!r}")
    temperature = check_temperature(temperature, allow_zero=True)
    if eos_fill and model.eos_id is None:
        raise ValueError("eos_fill needs a model with an eos_id")
    device = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    tokens = torch.full((batch, prompt_len + gen_length), model.mask_id, dtype=torch.int64, device=device)
    tokens[:, :prompt_len] = prompt_ids
    full_mask = torch.ones_like(tokens)
    if attention_mask is not None:
        full_mask[:, :prompt_len] = attention_mask
    model_mask = full_mask if attention_mask is not None else None  # no mask at all when nothing is padded
    step_map = torch.full((batch, prompt_len + gen_length), -1, dtype=torch.int64, device=device)
    commit_logprob = torch.full(step_map.shape, float("nan"), device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    recorder = _TraceRecorder() if record else None
    no_fill = torch.zeros(batch, dtype=torch.int64, device=device)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    step = 0
    with model.prepacked_weights():  # the linear layers laid out once for the rollout (CPU float32)
        for block in range(num_blocks):
            window = slice(prompt_len + block * block_length, prompt_len + (block + 1) * block_length)
            schedule = transfer_schedule((tokens[:, window] == model.mask_id).sum(1), steps_per_block)
            block_cache, cached_steps = None, 0  # the cache is made at the block's first step that runs
            # which scheduled steps commit anything anywhere, read once per block (eos_fill can empty a block
            # early, so then each step asks)
            step_runs = None
            if threshold is None and not eos_fill:
                step_runs = _on_any_rank_each((schedule > 0).any(0), process_group)
            invalid = torch.zeros((), dtype=torch.bool, device=device)
            for i in range(block_length if threshold is not None else steps_per_block):
                candidates = tokens[:, window] == model.mask_id
                k = None
                if threshold is None:
                    k = torch.minimum(schedule[:, i], candidates.sum(1))
                    runs = step_runs[i] if step_runs is not None else _on_any_rank(bool((k > 0).any()), device,
                                                                                   process_group)
                    if not runs:
                        continue  # a step that would commit nothing anywhere is skipped, not recorded
                elif not _on_any_rank(bool(candidates.any()), device, process_group):
                    break
                step_seed = None if seed is None else (seed * 1_000_003 + step) % 2**62
                if cache != "none" and (block_cache is None or cached_steps == cache_refresh):
                    block_cache, cached_steps = BlockCache(model, tokens, model_mask, window, cache), 0
                cached_steps += 1
                decision = denoise_step(model, tokens, model_mask, window, k, threshold=threshold,
                                        temperature=temperature, remasking=remasking, seed=step_seed,
                                        generator=generator, backend=backend, block_cache=block_cache)
                commit = decision.commit & (decision.tokens >= 0)  # a NaN row's token (-1) never enters the sequence
                invalid |= (commit != decision.commit).any()
                tokens[:, window] = torch.where(commit, decision.tokens, tokens[:, window])
                step_map[:, window] = torch.where(commit, step, step_map[:, window])
                commit_logprob[:, window] = torch.where(commit, decision.logprob, commit_logprob[:, window])
                filled = _fill_after_eos(tokens, step_map, prompt_len, model, step) if eos_fill else no_fill
                if recorder is not None:
                    recorder.add(decision, candidates, filled, block)
                step += 1
            if bool(invalid):  # one check per block
                raise RuntimeError("the model produced NaN or infinite logits")
    trace = recorder.trace(batch, device) if recorder is not None else None
    return Rollout(tokens, step_map, trace, prompt_len, full_mask, commit_logprob)


def _on_any_rank_each(flags: torch.Tensor, process_group) -> list[bool]:
    """flags [n] (bool) or-ed over the ranks, as Python bools (one host sync)."""
    return [bool(f) for f in all_reduce(flags.to(torch.int32), "max", process_group).tolist()]


def _on_any_rank(flag: bool, device, process_group) -> bool:
    if process_group is None:
        return flag
    return _on_any_rank_each(torch.tensor([flag], device=device), process_group)[0]


def _fill_after_eos(tokens, step_map, prompt_len: int, model: DiffusionLM, step: int) -> torch.Tensor:
    """Commit every still-masked position after a response's first committed EOS as EOS; returns counts [B]."""
    response, response_steps = tokens[:, prompt_len:], step_map[:, prompt_len:]
    eos = (response == model.eos_id) & (response_steps >= 0)
    first = torch.where(eos.any(1), eos.long().argmax(1), response.shape[1])
    after = torch.arange(response.shape[1], device=tokens.device)[None, :] > first[:, None]
    fill = after & (response == model.mask_id)
    response.copy_(torch.where(fill, model.eos_id, response))
    response_steps.copy_(torch.where(fill, step, response_steps))
    return fill.sum(1)
