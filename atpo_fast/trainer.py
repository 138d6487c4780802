"""The ATPO trainer: one iteration is collect -> select -> update, read top to bottom.

    collect  sample this iteration's prompts; roll out group_size responses per prompt (policy in
             eval mode, no grad) while the sampler records each step's confusion signals; score the
             responses; z-score rewards within each prompt's group (groups with no reward spread
             carry no signal and are dropped).
    select   pick steps (ATPO's hybrid rule, or a baseline) at a budget of k rows per response and
             build the rows with build_step_rows.
    update   the old log-probs once, then the clipped surrogate (+ k3-KL) over the rows in
             micro-batches with gradient accumulation, AdamW and gradient clipping. Log-probs come
             from the hidden states at the target positions only, through fused_linear_logprobs.
Then the iteration's metrics are reduced over the ranks in one go. The run around it (folders,
warm start, resume, logging, plots, summary) is run.py; checkpoints are checkpoint.py.

Randomness is derived from (seed, iteration), so a resumed run repeats an uninterrupted one.

Under torchrun each rank rolls out its share of the prompts (a prompt's group stays on one rank),
selects steps with the batch-average signals of every rank, and trains its own rows; the model is
replicated (DDP) or sharded (FSDP2) as distributed.strategy says, gradients are summed over ranks.
Sampling noise is keyed by a prompt's index in the whole batch, so with sampler.prompts_per_call
fixed the run does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import resource
import time

import torch

from atpo_fast import distributed
from atpo_fast.common import derive_seed, linear_warmup
from atpo_fast.config import TrainConfig, check_values
from atpo_fast.loss import clipped_policy_loss, group_advantages
from atpo_fast.models import DiffusionLM, TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.models.lora import add_lora, enable_activation_checkpointing, trainable_parameters
from atpo_fast.ops.step_rows import StepRows, build_step_rows
from atpo_fast.sampler import generate
from atpo_fast.selection import hybrid_score, reached_sum, select_steps, step_signals
from atpo_fast.tasks import TASKS, Example, Task, get_task
from atpo_fast.trace import Rollout, Trace, concat_rollouts


def resolve_device(config: TrainConfig, d: distributed.Dist) -> torch.device:
    """config.device, with auto resolved and each rank of a CUDA run on its own GPU."""
    device = distributed.device_type(config.device)
    return torch.device(f"cuda:{d.local_rank}" if device == "cuda" and d.world > 1 else device)


def build_model(config: TrainConfig, device: torch.device) -> DiffusionLM:
    m = config.model
    if m.kind == "tiny":
        if m.path:
            return TinyDiffusionLM.from_pretrained(m.path, device=device)
        torch.manual_seed(derive_seed(config.warmstart.seed, "init"))
        return TinyDiffusionLM(m.tiny).to(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.dtype]
    return load_hf_diffusion_lm(m.path, m.kind, dtype=dtype, device=str(device), implementation=m.implementation,
                                attn_implementation=m.attn_implementation)


def build_task(config: TrainConfig) -> Task:
    options = dict(config.task.options)
    if config.task.data is not None:
        parameters = inspect.signature(TASKS[config.task.name]).parameters
        if "data" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            raise ValueError(f"config key 'task.data' expects null for task.name={config.task.name!r} (that task "
                             f"reads no file), got {config.task.data!r}")
        options["data"] = config.task.data
    return get_task(config.task.name, **options)


def check_task(config: TrainConfig, model: DiffusionLM, task: Task) -> None:
    """What the run will draw from the task, checked before any work rather than where it is drawn: enough
    training prompts for an iteration and a warm-start batch, and every prompt, encoded, holding a token
    and fitting the model's context with a response of sampler.gen_length."""
    train_size, o, w = len(task.train), config.optim, config.warmstart
    if train_size < o.prompts_per_iter:
        raise ValueError(f"config key 'optim.prompts_per_iter' expects at most the task's {train_size} training "
                         f"prompts, got {o.prompts_per_iter}")
    if w.steps and train_size < w.batch_size:
        raise ValueError(f"config key 'warmstart.batch_size' expects at most the task's {train_size} training "
                         f"prompts, got {w.batch_size}")
    lengths = [len(model.encode_prompt(example.prompt)) for example in task.train + task.test]
    if min(lengths) == 0:
        raise ValueError(f"task prompt {lengths.index(0)} (of train, then test) encodes to no token; every "
                         f"prompt needs at least one")
    gen_length = config.sampler.gen_length
    if max(lengths) + gen_length > model.max_length:
        where = " (model.tiny.max_length)" if isinstance(model, TinyDiffusionLM) else ""
        raise ValueError(f"the task's longest prompt ({max(lengths)} tokens) plus sampler.gen_length "
                         f"({gen_length}) exceeds the model's context of {model.max_length} tokens{where}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclasses.dataclass
class Collected:
    """collect(): this rank's share of an iteration's prompts, its rollouts and their scores."""

    examples: list[Example]
    first_prompt: int  # index of examples[0] in the whole batch (over all ranks)
    rollout: Rollout  # group_size responses per example, consecutive
    rewards: torch.Tensor  # [B] float32
    correct: torch.Tensor  # [B] bool
    advantages: torch.Tensor  # [B] float32: rewards z-scored within each prompt's group
    informative: torch.Tensor  # [B] bool: the response's group has a reward spread
    rollout_time: float  # seconds


@dataclasses.dataclass
class Selected:
    """select(): the selected steps of each response and the training rows built from them."""

    rollout: Rollout
    trace: Trace  # the rollout's trace, widened to the longest of any rank
    starts: torch.Tensor  # [B, budget] int64: first step of each selected interval (-1: unused)
    rows: StepRows  # rows with at least one target
    total_rows: int  # rows over all ranks (the loss is a mean over them)
    attention: torch.Tensor  # [R, L]: each row's attention mask
    token_advantage: torch.Tensor  # [P]: the advantage of each target token's response


@dataclasses.dataclass
class Updated:
    """update(): what the optimizer steps did (sums over this rank's targets, averaged over passes)."""

    loss: float  # this rank's share of the loss (the loss summed over ranks)
    clip_weighted: float  # clip fraction times this rank's targets
    kl_weighted: float  # mean k3 KL times this rank's targets
    grad_norm: float
    update_time: float
    # off-policy gap: sum and count over this rank's targets of |log p at rollout - old log p| (a cached
    # rollout sees a stale context; an exact one differs by rounding only)
    gap_sum: float = 0.0
    gap_count: int = 0
    skipped: str | None = None


class Trainer:
    """model and task default to the ones the config describes; pass them to train something else."""

    step_rows_backend = "auto"  # build_step_rows' backend: the extension when it is built
    single_pass_update = True  # False: old log-probs from a no-grad pass even with updates_per_batch = 1

    def __init__(self, config: TrainConfig, model: DiffusionLM | None = None, task: Task | None = None):
        check_values(config)  # a config built in code, not loaded, is checked too
        self.config = config
        self.dist = distributed.setup(config.distributed.backend, config.device)
        self.device = resolve_device(config, self.dist)
        self.task = task if task is not None else build_task(config)
        self.model = model.to(self.device) if model is not None else build_model(config, self.device)
        check_task(config, self.model, self.task)
        # LoRA: adapters injected in place, everything else frozen; self.peft writes peft's adapter format
        self.peft = (add_lora(self.model, config.model.lora, derive_seed(config.seed, "lora"))
                     if config.model.lora.rank else None)
        if config.model.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.policy = distributed.wrap(self.model, config.distributed.strategy, self.dist)  # what forward runs on
        o = config.optim
        # fused on CUDA: one kernel per step and no temporary copy of the moments (foreach would hold one)
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay, fused=self.device.type == "cuda" or None)
        self.scheduler = linear_warmup(self.optimizer, o.warmup_iters)
        self.iteration = 0
        self.bad_iters = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())

    # ------------------------------------------------------------------ one ATPO iteration

    def train_iteration(self) -> dict:
        """collect -> select -> update, then the iteration's metrics (reduced over the ranks)."""
        seed = derive_seed(self.config.seed, "iteration", self.iteration)
        collected = self.collect(seed)
        selected = self.select(collected, seed)
        updated = self.update(selected) if selected.total_rows else None
        return self.metrics(collected, selected, updated)

    def collect(self, seed: int) -> Collected:
        o = self.config.optim
        examples, first = self.share(random.Random(seed).sample(self.task.train, o.prompts_per_iter))
        start = self.clock()
        rollout = self.rollout(examples, o.group_size, self.config.sampler.temperature, seed, first)
        rollout_time = self.clock() - start
        rewards, correct = self.score(examples, o.group_size, rollout)
        advantages, informative = group_advantages(rewards, o.group_size)
        return Collected(examples, first, rollout, rewards, correct, advantages, informative, rollout_time)

    def select(self, collected: Collected, seed: int) -> Selected:
        sel, o, d = self.config.selection, self.config.optim, self.dist
        rollout = collected.rollout
        # step t must mean the same on every rank: widen the trace to the longest one
        trace = rollout.trace.padded(int(d.reduce({"T": rollout.trace.num_steps}, "max", self.device)["T"]))
        starts, ends = select_steps(trace, sel.budget, sel.rule, sel.mode, sel.alpha, sel.per, seed=seed,
                                    token_set=sel.token_set, tau=sel.tau, group=d.group,
                                    row_offset=collected.first_prompt * o.group_size)
        starts[~collected.informative], ends[~collected.informative] = -1, -1
        rows = build_step_rows(rollout.tokens, rollout.step_map, starts.to(self.device), ends.to(self.device),
                               self.model.mask_id, backend=self.step_rows_backend)
        rows = rows_with_targets(rows)
        total_rows = int(d.reduce({"rows": rows.input_ids.shape[0]}, "sum", self.device)["rows"])
        token_advantage = collected.advantages.to(self.device)[rows.seq_index[rows.target_row]]
        return Selected(rollout, trace, starts, rows, total_rows, rollout.attention_mask[rows.seq_index],
                        token_advantage)

    def update(self, selected: Selected) -> Updated:
        o, d = self.config.optim, self.dist
        start = self.clock()
        rows, n_rows = selected.rows, selected.total_rows
        batches = list(self.micro_batches(rows))
        # every rank runs as many micro-batches as the busiest one (FSDP's forwards are collective);
        # the extra ones (None) are an idle forward on one position that trains nothing
        batches += [None] * (int(d.reduce({"n": len(batches)}, "max", self.device)["n"]) - len(batches))
        # the old log-probs: with one optimizer step per batch the policy has not moved when the update's
        # forward runs, so they are that forward's own, detached (filled in below); else a no-grad pass
        single_pass = o.updates_per_batch == 1 and self.single_pass_update
        old = torch.zeros(rows.target_row.numel(), device=self.device)
        if not single_pass:
            self.policy.eval()
            with torch.no_grad():  # idle batches (None) forward too: FSDP's forwards are collective
                passes = [(self.row_logprobs(selected, b), b) for b in batches]
            old = torch.cat([lp for lp, b in passes if b] + [old[:0]])

        sums = {"loss": 0.0, "clip_weighted": 0.0, "kl_weighted": 0.0}
        self.policy.train()  # adapter dropout and activation checkpointing act in training mode only
        for _ in range(o.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            for i, b in enumerate(batches):
                with distributed.gradient_sync(self.policy, i == len(batches) - 1):
                    logprob = self.row_logprobs(selected, b)
                    if b is None:
                        (logprob.sum() * 0.0).backward()
                        continue
                    r0, _, t0, t1 = b
                    if single_pass:
                        old[t0:t1] = logprob.detach()
                    loss, stats = clipped_policy_loss(logprob, old[t0:t1], selected.token_advantage[t0:t1],
                                                      rows.target_row[t0:t1] - r0, n_rows, o.clip_eps, o.kl_beta)
                    (loss * d.world).backward()  # DDP and FSDP average gradients over ranks: this makes it a sum
                sums["loss"] += loss.item() / o.updates_per_batch
                sums["clip_weighted"] += stats["clip_fraction"].item() * (t1 - t0) / o.updates_per_batch
                sums["kl_weighted"] += stats["kl"].item() * (t1 - t0) / o.updates_per_batch
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), o.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):  # the same on every rank: gradients are synchronised
                self.optimizer.zero_grad(set_to_none=True)
                return Updated(**sums, **self.rollout_gap(selected, old), grad_norm=grad_norm,
                               update_time=self.clock() - start, skipped="non-finite loss or gradient")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # no gradient outlives the step (the rollout needs the memory)
        self.scheduler.step()
        return Updated(**sums, **self.rollout_gap(selected, old), grad_norm=grad_norm, update_time=self.clock() - start)

    @staticmethod
    def rollout_gap(selected: Selected, old: torch.Tensor) -> dict:
        """Sum and count over the targets of |log p at rollout - old log p| (a cached rollout sees a
        stale context; an exact one differs by rounding only)."""
        commit_logprob, rows = selected.rollout.commit_logprob, selected.rows
        if commit_logprob is None:
            return {}
        at_rollout = commit_logprob[rows.seq_index[rows.target_row], rows.target_pos]
        known = ~at_rollout.isnan()  # positions committed in bulk (eos_fill) have none
        return {"gap_sum": (old - at_rollout)[known].abs().sum().item(), "gap_count": int(known.sum())}

    def metrics(self, collected: Collected, selected: Selected, updated: Updated | None) -> dict:
        """The iteration's record for metrics.jsonl: everything summed or maximised over the ranks at once."""
        d, sel, trace = self.dist, self.config.selection, selected.trace
        signals = step_signals(trace, sel.token_set)
        reached = signals["reached"]
        used = selected.starts[selected.starts >= 0]
        sums = {"responses": len(collected.rewards), "reward": collected.rewards.float().sum().item(),
                "accuracy": collected.correct.float().sum().item(),
                "informative_fraction": collected.informative.float().sum().item(),
                "response_tokens": collected.rollout.response.numel(), "targets": selected.rows.target_row.numel(),
                "reached": reached.sum(0), "step_entropy": reached_sum(signals["entropy"], reached),
                "step_uncertainty": reached_sum(signals["uncertainty"], reached),
                "step_roec": reached_sum(signals["roec"], reached),
                "step_surprisal": reached_sum(signals["surprisal"], reached),
                "selected_step_counts": torch.bincount(used.cpu(), minlength=trace.num_steps)}
        maxes = {"rollout_time": collected.rollout_time, "peak_memory_mb": peak_memory_mb(self.device)}
        if updated is not None:
            sums.update(loss=updated.loss, clip_fraction=updated.clip_weighted, kl=updated.kl_weighted,
                        gap_sum=updated.gap_sum, gap_count=updated.gap_count)
            maxes["update_time"] = updated.update_time
        sums, maxes = d.reduce_metrics(sums, maxes, self.device)

        responses, targets, reached_count = sums.pop("responses"), int(sums["targets"]), sums.pop("reached")
        averages = {name: sums.pop(name) / reached_count
                    for name in ("step_entropy", "step_uncertainty", "step_roec", "step_surprisal")}
        metrics = {"iteration": self.iteration, **{k: sums[k] / responses
                                                   for k in ("reward", "accuracy", "informative_fraction")},
                   "rollout_time": maxes["rollout_time"],
                   "tokens_per_second": sums["response_tokens"] / maxes["rollout_time"]}
        averages["step_hybrid_score"] = hybrid_score(averages["step_roec"], averages["step_uncertainty"], sel.alpha)
        metrics.update({name: [None if math.isnan(v) else round(v, 6) for v in values.tolist()]
                        for name, values in averages.items()})
        metrics["selected_step_counts"] = [int(c) for c in torch.as_tensor(sums["selected_step_counts"]).tolist()]
        metrics.update(rows=selected.total_rows, targets=targets)
        if updated is None:
            metrics.update(skipped="no informative rows", update_time=0.0)
            return metrics
        metrics.update(loss=sums["loss"], clip_fraction=sums["clip_fraction"] / targets, kl=sums["kl"] / targets,
                       grad_norm=updated.grad_norm, update_time=maxes["update_time"],
                       rollout_logprob_gap=sums["gap_sum"] / max(sums["gap_count"], 1))
        if updated.skipped:
            metrics["skipped"] = updated.skipped
            return metrics
        metrics.update(lr=self.scheduler.get_last_lr()[0], peak_memory_mb=maxes["peak_memory_mb"])
        return metrics

    # ------------------------------------------------------------------ rollouts and rewards

    def share(self, items: list) -> tuple[list, int]:
        """This rank's contiguous share of items, and the index of its first item."""
        per_rank = -(-len(items) // self.dist.world)
        first = min(self.dist.rank * per_rank, len(items))
        return items[first:first + per_rank], first

    def rollout(self, examples: list[Example], repeats: int, temperature: float, seed: int,
                first_prompt: int = 0) -> Rollout:
        """repeats responses per example, generated sampler.prompts_per_call prompts at a time; a call
        whose first prompt has global index i (first_prompt + its offset here) samples with seed + i."""
        s = self.config.sampler
        per_call = s.prompts_per_call or len(examples)
        self.model.eval()
        parts = []
        with self.autocast, distributed.gathered(self.model):
            for i in range(0, len(examples), per_call):
                prompts = [ex.prompt for ex in examples[i:i + per_call] for _ in range(repeats)]
                ids, mask = self.model.encode_prompts(prompts, self.device)
                parts.append(generate(self.model, ids, gen_length=s.gen_length, block_length=s.block_length,
                                      steps=s.steps, temperature=temperature, remasking=s.remasking,
                                      threshold=s.threshold, attention_mask=mask, seed=seed + first_prompt + i,
                                      eos_fill=s.eos_fill, backend=self.config.backend,
                                      process_group=self.dist.group, cache=s.cache,
                                      cache_refresh=s.cache_refresh))
        return concat_rollouts(parts, self.model.pad_id)

    def score(self, examples: list[Example], repeats: int, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards and correctness [len(examples) * repeats] of the rollout's responses."""
        rewards, correct = [], []
        for i, response in enumerate(rollout.response):
            example, text = examples[i // repeats], self.model.decode(response)
            rewards.append(self.task.reward(example, text))
            correct.append(self.task.correct(example, text))
        return torch.tensor(rewards), torch.tensor(correct)

    # ------------------------------------------------------------------ log-probs of training rows

    def micro_batches(self, rows: StepRows):
        """(r0, r1, t0, t1) slices of at most micro_batch_rows rows and their targets."""
        size = self.config.optim.micro_batch_rows
        n_rows = rows.input_ids.shape[0]
        row_starts = torch.arange(0, n_rows + size, size, device=rows.target_row.device)
        bounds = torch.searchsorted(rows.target_row, row_starts)
        for r0, t0, t1 in zip(range(0, n_rows, size), bounds[:-1].tolist(), bounds[1:].tolist()):
            yield r0, min(r0 + size, n_rows), t0, t1

    def row_logprobs(self, selected: Selected, batch: tuple[int, int, int, int] | None) -> torch.Tensor:
        """log p(target) [t1 - t0] for the targets of rows r0..r1 (targets t0..t1), from hidden states;
        for batch None, a forward on one real position (a rank with fewer micro-batches than the others)."""
        rows, rollout = selected.rows, selected.rollout
        if batch is None:  # this rank may have no rows at all: the first response position of the rollout
            first = torch.zeros(1, dtype=torch.int64, device=self.device)
            with self.autocast:
                return self.policy(rollout.tokens[:1], rollout.attention_mask[:1], first,
                                   first + rollout.prompt_length, rollout.tokens[:1, rollout.prompt_length])
        r0, r1, t0, t1 = batch
        with self.autocast:
            return self.policy(rows.input_ids[r0:r1], selected.attention[r0:r1], rows.target_row[t0:t1] - r0,
                               rows.target_pos[t0:t1], rows.target_token[t0:t1])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, size: int | None = None) -> tuple[dict, dict]:
        """Held-out greedy accuracy and pass@k (each rank rolls out its share of the problems); also
        this rank's greedy traces for the plots."""
        e, d = self.config.eval, self.dist
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None (eval.size), got {size!r}")
        problems = self.task.test[:size or e.size]
        if len(problems) < d.world:
            raise ValueError(f"evaluation needs at least one held-out problem per rank: {len(problems)} problems, "
                             f"{d.world} ranks (eval.size, or the task's test set, is too small)")
        examples, first = self.share(problems)
        greedy = self.rollout(examples, 1, 0.0, derive_seed(self.config.seed, "eval"), first)
        rewards, correct = self.score(examples, 1, greedy)
        sums = {"accuracy": correct.sum().item(), "reward": rewards.sum().item()}
        if e.pass_k > 0:
            sampled = self.rollout(examples, e.pass_k, e.pass_temperature, derive_seed(self.config.seed, "pass@k"),
                                   first)
            _, hits = self.score(examples, e.pass_k, sampled)
            sums[f"pass@{e.pass_k}"] = hits.view(-1, e.pass_k).any(1).sum().item()
        result = {k: v / len(problems) for k, v in d.reduce(sums, "sum", self.device).items()}
        curves = {"entropy": greedy.trace.entropy.cpu(), "margin": greedy.trace.margin.cpu(),
                  "roec": greedy.trace.roec.cpu(), "correct": correct}
        return result, curves

    # ------------------------------------------------------------------ helpers

    def clock(self) -> float:
        """Wall time in seconds, after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def rows_with_targets(rows: StepRows) -> StepRows:
    """The rows that have at least one target (an interval can select steps a response never reached)."""
    has_targets = torch.bincount(rows.target_row, minlength=rows.input_ids.shape[0]) > 0
    new_index = has_targets.long().cumsum(0) - 1
    return StepRows(rows.input_ids[has_targets], rows.target_mask[has_targets], rows.seq_index[has_targets],
                    rows.step_start[has_targets], new_index[rows.target_row], rows.target_pos, rows.target_token)
