"""The ATPO trainer, short enough to read top to bottom.

One iteration: sample prompts; roll out group_size responses per prompt with the sampler (policy
in eval mode, no grad) while it records each step's confusion signals; score the responses; z-score
rewards within each prompt's group (groups with no reward spread carry no signal and are dropped);
select steps (ATPO's hybrid rule, or a baseline) at a budget of k rows per response; build the rows
with build_step_rows; compute the old log-probs once; then the clipped surrogate (+ k3-KL) over the
rows in micro-batches with gradient accumulation, AdamW and gradient clipping. Log-probs come from
the hidden states at the target positions only, through fused_linear_logprobs.

Randomness is derived from (seed, iteration), so a resumed run repeats an uninterrupted one.

Under torchrun each rank rolls out its share of the prompts (a prompt's group stays on one rank),
selects steps with the batch-average signals of every rank, and trains its own rows; the model is
replicated (DDP) or sharded (FSDP2) as distributed.strategy says, gradients are summed over ranks,
and rank 0 alone writes metrics, plots and the summary. Sampling noise is keyed by a prompt's
index in the whole batch, so with sampler.prompts_per_call fixed the run does not depend on the
number of ranks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from atpo_fast import distributed
from atpo_fast.config import TrainConfig, save_config
from atpo_fast.io import atomic_write
from atpo_fast.loss import clipped_policy_loss, group_advantages
from atpo_fast.models import DiffusionLM, TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.ops.step_rows import StepRows, build_step_rows
from atpo_fast.sampler import Rollout, concat_rollouts, generate
from atpo_fast.selection import batch_average, select_steps, step_scores, step_signals
from atpo_fast.tasks import Example, Task, get_task

CHECKPOINT = "checkpoint"  # a torch.distributed.checkpoint folder
METRICS = "metrics.jsonl"


def derive_seed(*parts) -> int:
    """A 62-bit seed from any values (stable across runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def build_model(config: TrainConfig, device: torch.device) -> DiffusionLM:
    m = config.model
    if m.kind == "tiny":
        if m.path:
            return TinyDiffusionLM.from_pretrained(m.path, device=device)
        torch.manual_seed(derive_seed(config.warmstart.seed, "init"))
        return TinyDiffusionLM(m.tiny).to(device)
    if m.kind in ("llada", "dream"):
        if not m.path:
            raise ValueError(f"model.kind={m.kind!r} needs model.path, a local folder of its weights")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.dtype]
        return load_hf_diffusion_lm(m.path, m.kind, dtype=dtype, device=str(device),
                                    attn_implementation=m.attn_implementation)
    raise ValueError(f"model.kind must be 'tiny', 'llada' or 'dream', got {m.kind!r}")


def build_task(config: TrainConfig) -> Task:
    options = dict(config.task.options)
    if config.task.data is not None:
        options["data"] = config.task.data
    return get_task(config.task.name, **options)


def encode_batch(model: DiffusionLM, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, Lp] and their attention mask."""
    ids = [model.encode_prompt(p) for p in prompts]
    width = max(map(len, ids))
    tokens = torch.tensor([[model.pad_id] * (width - len(i)) + i for i in ids], dtype=torch.int64, device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], dtype=torch.int64, device=device)
    return tokens, mask


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """model and task default to the ones the config describes; pass them to train something else."""

    step_rows_backend = "auto"  # build_step_rows' backend: the extension when it is built

    def __init__(self, config: TrainConfig, run_dir: Path, model: DiffusionLM | None = None, task: Task | None = None,
                 warm_start: bool = False, progress: bool = False):
        """warm_start: run (or load the cached) supervised warm start before the model is wrapped for
        data parallelism; its summary lands in self.warm_start_info."""
        self.config = config
        self.run_dir = run_dir
        self.dist = distributed.setup(config.distributed.backend)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if device == "cuda" and self.dist.world > 1
                                   else device)
        self.task = task if task is not None else build_task(config)
        self.model = model.to(self.device) if model is not None else build_model(config, self.device)
        self.warm_start_info = self._warm_start(progress) if warm_start else None
        self.policy = distributed.wrap(self.model, config.distributed.strategy, self.dist)  # what forward runs on
        o = config.optim
        if o.prompts_per_iter % self.dist.world:
            raise ValueError(f"optim.prompts_per_iter ({o.prompts_per_iter}) must be a multiple of the number of "
                             f"ranks ({self.dist.world})")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        warmup = max(o.warmup_iters, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: min(1.0, (it + 1) / warmup) if warmup else 1.0)
        self.iteration = 0
        self.bad_iters = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())

    def _warm_start(self, progress: bool) -> dict:
        """Rank 0 trains (or loads) the warm start first; the other ranks then load its cached copy."""
        from atpo_fast.warmstart import warm_start

        info = warm_start(self, progress=progress) if self.dist.main else None
        self.dist.barrier()
        return info if self.dist.main else warm_start(self, progress=False)

    def share(self, items: list) -> tuple[list, int]:
        """This rank's contiguous share of items, and the index of its first item."""
        per_rank = -(-len(items) // self.dist.world)
        first = min(self.dist.rank * per_rank, len(items))
        return items[first:first + per_rank], first

    def clock(self) -> float:
        """Wall time in seconds, after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ rollouts and rewards

    def rollout(self, examples: list[Example], repeats: int, temperature: float, seed: int,
                first_prompt: int = 0) -> Rollout:
        """repeats responses per example, generated sampler.prompts_per_call prompts at a time; a call
        whose first prompt has global index i (first_prompt + its offset here) samples with seed + i."""
        s = self.config.sampler
        per_call = s.prompts_per_call or len(examples)
        if per_call < 1:
            raise ValueError(f"sampler.prompts_per_call must be positive or None, got {per_call}")
        self.model.eval()
        parts = []
        with self.autocast, distributed.gathered(self.model):
            for i in range(0, len(examples), per_call):
                prompts = [ex.prompt for ex in examples[i:i + per_call] for _ in range(repeats)]
                ids, mask = encode_batch(self.model, prompts, self.device)
                parts.append(generate(self.model, ids, gen_length=s.gen_length, block_length=s.block_length,
                                      steps=s.steps, temperature=temperature, remasking=s.remasking,
                                      threshold=s.threshold, attention_mask=mask, seed=seed + first_prompt + i,
                                      eos_fill=s.eos_fill, backend=self.config.backend,
                                      process_group=self.dist.group))
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

    def row_logprobs(self, rows: StepRows, attention_mask: torch.Tensor, r0: int, r1: int, t0: int,
                     t1: int) -> torch.Tensor:
        """log p(target) [t1 - t0] for the targets of rows r0..r1 (targets t0..t1), from hidden states."""
        with self.autocast:
            return self.policy(rows.input_ids[r0:r1], attention_mask[r0:r1], rows.target_row[t0:t1] - r0,
                               rows.target_pos[t0:t1], rows.target_token[t0:t1])

    def micro_batches(self, rows: StepRows):
        """(r0, r1, t0, t1) slices of at most micro_batch_rows rows and their targets."""
        size = self.config.optim.micro_batch_rows
        n_rows = rows.input_ids.shape[0]
        row_starts = torch.arange(0, n_rows + size, size, device=rows.target_row.device)
        bounds = torch.searchsorted(rows.target_row, row_starts)
        for r0, t0, t1 in zip(range(0, n_rows, size), bounds[:-1].tolist(), bounds[1:].tolist()):
            yield r0, min(r0 + size, n_rows), t0, t1

    # ------------------------------------------------------------------ one ATPO iteration

    def train_iteration(self) -> dict:
        c, o, d = self.config, self.config.optim, self.dist
        seed = derive_seed(c.seed, "iteration", self.iteration)
        examples, first = self.share(random.Random(seed).sample(self.task.train, o.prompts_per_iter))
        start = self.clock()
        rollout = self.rollout(examples, o.group_size, c.sampler.temperature, seed, first)
        rollout_time = self.clock() - start
        rewards, correct = self.score(examples, o.group_size, rollout)
        advantages, informative = group_advantages(rewards, o.group_size)

        sel, trace = c.selection, self.common_steps(rollout.trace)
        starts, ends = select_steps(trace, sel.budget, sel.rule, sel.mode, sel.alpha, sel.per, seed=seed,
                                    token_set=sel.token_set, group=d.group, row_offset=first * o.group_size)
        starts[~informative], ends[~informative] = -1, -1
        means = d.reduce_values({"reward": rewards.float().mean().item(), "accuracy": correct.float().mean().item(),
                                 "informative_fraction": informative.float().mean().item()}, "sum", self.device)
        metrics = {"iteration": self.iteration, **{k: v / d.world for k, v in means.items()}}  # equal shares
        metrics["rollout_time"] = d.reduce_values({"t": rollout_time}, "max", self.device)["t"]
        metrics["tokens_per_second"] = rollout.step_map.numel() * d.world / metrics["rollout_time"]
        metrics.update(self.selection_metrics(trace, starts))

        start = self.clock()
        rows = self.training_rows(rollout, starts.to(self.device), ends.to(self.device))
        local = d.reduce_values({"rows": rows.input_ids.shape[0], "targets": rows.target_row.numel()}, "sum",
                                self.device)
        n_rows, n_targets = int(local["rows"]), int(local["targets"])
        metrics.update(rows=n_rows, targets=n_targets)
        if n_rows == 0:
            metrics.update(skipped="no informative rows", update_time=0.0)
            return metrics
        attention = rollout.attention_mask[rows.seq_index]
        token_advantage = advantages.to(self.device)[rows.seq_index[rows.target_row]]
        batches = list(self.micro_batches(rows))
        # every rank runs as many micro-batches as the busiest one (FSDP's forwards are collective);
        # the extra ones (None) train on nothing
        batches += [None] * (int(d.reduce_values({"n": len(batches)}, "max", self.device)["n"]) - len(batches))
        self.policy.eval()  # the same mode for old and new log-probs
        with torch.no_grad():
            old = [self.row_logprobs(rows, attention, *b) if b else self.idle_logprobs(rollout) for b in batches]
        old = torch.cat([lp for lp, b in zip(old, batches) if b] + [torch.zeros(0, device=self.device)])

        totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for _ in range(o.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
            for i, b in enumerate(batches):
                with distributed.gradient_sync(self.policy, i == len(batches) - 1):
                    if b is None:
                        (self.idle_logprobs(rollout).sum() * 0.0).backward()
                        continue
                    r0, r1, t0, t1 = b
                    logprob = self.row_logprobs(rows, attention, r0, r1, t0, t1)
                    loss, stats = clipped_policy_loss(logprob, old[t0:t1], token_advantage[t0:t1],
                                                      rows.target_row[t0:t1] - r0, n_rows, o.clip_eps, o.kl_beta)
                    (loss * d.world).backward()  # DDP and FSDP average gradients over ranks: this makes it a sum
                sums["loss"] += loss.item()
                for name in ("clip_fraction", "kl"):
                    sums[name] += stats[name].item() * (t1 - t0) / n_targets
            sums = d.reduce_values(sums, "sum", self.device)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics.update(skipped="non-finite loss or gradient", loss=sums["loss"], grad_norm=grad_norm,
                               update_time=self.clock() - start)
                return metrics
            self.optimizer.step()
            totals = sums
        self.scheduler.step()
        metrics.update(totals, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                       **d.reduce_values({"update_time": self.clock() - start,
                                          "peak_memory_mb": peak_memory_mb(self.device)}, "max", self.device))
        return metrics

    def idle_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """A forward on one real position, for a rank with fewer micro-batches than the others."""
        first = torch.zeros(1, dtype=torch.int64, device=self.device)
        position = first + rollout.prompt_length
        with self.autocast:
            return self.policy(rollout.tokens[:1], rollout.attention_mask[:1], first, position,
                               rollout.tokens[:1, rollout.prompt_length])

    def common_steps(self, trace):
        """The trace widened to the longest one of any rank, so that step t means the same on every rank."""
        steps = int(self.dist.reduce_values({"T": trace.num_steps}, "max", self.device)["T"])
        if steps == trace.num_steps:
            return trace
        block = torch.cat([trace.block, trace.block.new_full((steps - trace.num_steps,), -1)])
        return trace.padded(steps, block)

    def training_rows(self, rollout: Rollout, starts: torch.Tensor, ends: torch.Tensor) -> StepRows:
        """Rows of the selected intervals, keeping only rows that have at least one target."""
        prompt_steps = torch.full((rollout.tokens.shape[0], rollout.prompt_length), -1, dtype=torch.int64,
                                  device=self.device)
        step_map = torch.cat([prompt_steps, rollout.step_map], dim=1)
        rows = build_step_rows(rollout.tokens, step_map, starts, ends, self.model.mask_id,
                               backend=self.step_rows_backend)
        has_targets = torch.bincount(rows.target_row, minlength=rows.input_ids.shape[0]) > 0
        new_index = has_targets.long().cumsum(0) - 1
        return StepRows(rows.input_ids[has_targets], rows.target_mask[has_targets], rows.seq_index[has_targets],
                        rows.step_start[has_targets], new_index[rows.target_row], rows.target_pos, rows.target_token)

    def selection_metrics(self, trace, starts: torch.Tensor) -> dict:
        """The batch-average step signals and how often each step index was selected (over all ranks)."""
        sel, group = self.config.selection, self.dist.group
        signals = step_signals(trace, sel.token_set)
        score = batch_average(step_scores(trace, "hybrid", sel.alpha, "batch", sel.token_set, group),
                              signals["reached"], group)
        used = starts[starts >= 0]
        counts = torch.bincount(used, minlength=trace.num_steps).to(self.device)
        counts = self.dist.all_reduce(counts).cpu()

        def average(values):
            return batch_average(values, signals["reached"], group)

        def clean(values):
            return [None if math.isnan(v) else round(v, 6) for v in values.tolist()]

        return {"step_entropy": clean(average(signals["entropy"])),
                "step_uncertainty": clean(average(signals["uncertainty"])),
                "step_roec": clean(average(signals["roec"])),
                "step_hybrid_score": clean(score), "selected_step_counts": counts.tolist()}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, size: int | None = None) -> tuple[dict, dict]:
        """Held-out greedy accuracy and pass@k (each rank rolls out its share of the problems); also
        this rank's greedy traces for the plots."""
        e, d = self.config.eval, self.dist
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
        result = {k: v / len(problems) for k, v in d.reduce_values(sums, "sum", self.device).items()}
        curves = {"entropy": greedy.trace.entropy.cpu(), "margin": greedy.trace.margin.cpu(),
                  "roec": greedy.trace.roec.cpu(), "correct": correct}
        return result, curves

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Model, optimizer, scheduler, step counters and random generator states (rank 0's) as a
        torch.distributed.checkpoint folder (see distributed.py). The trainer's own randomness is
        derived from (seed, iteration); the generator states are restored for code that draws from them."""
        extra = {"iteration": self.iteration, "bad_iters": self.bad_iters,
                 "scheduler": json.dumps(self.scheduler.state_dict()), "rng": _encode_rng_states()}
        distributed.save_checkpoint(self.run_dir / CHECKPOINT, self.model, self.optimizer, extra, self.dist)

    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint written with any number of ranks."""
        extra = distributed.load_checkpoint(path, self.model, self.optimizer,
                                            {"iteration": 0, "bad_iters": 0, "scheduler": "", "rng": ""}, self.dist)
        self.iteration, self.bad_iters = int(extra["iteration"]), int(extra["bad_iters"])
        self.scheduler.load_state_dict(json.loads(extra["scheduler"]))
        _restore_rng_states(extra["rng"])


def _encode_rng_states() -> str:
    """torch's CPU and CUDA generators and Python's random, as one string (a checkpoint's extra value)."""
    buffer = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _restore_rng_states(encoded: str) -> None:
    states = torch.load(io.BytesIO(base64.b64decode(encoded)), weights_only=True)
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def run_name(config: TrainConfig) -> str:
    return config.logging.name or f"{config.task.name}-{config.selection.rule}-seed{config.seed}"


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the summary. Everything lands in run_dir/<name>/.

    Under torchrun every rank calls this; rank 0 alone writes the config, metrics, plots and summary.
    """
    from atpo_fast.plots import write_plots

    run_dir = Path(config.logging.run_dir) / run_name(config)
    checkpoint = run_dir / CHECKPOINT
    metrics_path = run_dir / METRICS
    if resume and distributed.checkpoint_path(checkpoint) is None:
        raise ValueError(f"cannot resume: {checkpoint} does not exist")
    if not resume and metrics_path.exists():
        raise ValueError(f"run folder {run_dir} already holds a run; pass --resume, or choose another "
                         f"logging.name")
    trainer = Trainer(config, run_dir, warm_start=not resume, progress=progress)
    main = trainer.dist.main
    trainer.dist.barrier()  # every rank has passed the checks above before rank 0 writes anything
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    writer = _tensorboard(config, run_dir) if main else None

    def log(record: dict) -> None:
        if main:
            _append_metrics(metrics_path, record)

    if resume:
        trainer.load_checkpoint(checkpoint)
        if main:
            kept = [m for m in _read_metrics(metrics_path) if m.get("phase") == "before"
                    or ("phase" not in m and m["iteration"] < trainer.iteration)]
            atomic_write(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in kept)))
    else:
        before, _ = trainer.evaluate()
        log({"phase": "before", "iteration": 0, "warm_start": trainer.warm_start_info, "eval": before})
        trainer.save_checkpoint()

    o = config.optim
    bar = tqdm(total=o.iterations, initial=trainer.iteration, desc="ATPO", disable=not (progress and main),
               dynamic_ncols=True)
    stopped = None
    while trainer.iteration < o.iterations:
        metrics = trainer.train_iteration()
        trainer.iteration += 1
        if "skipped" in metrics and metrics["skipped"].startswith("non-finite"):
            trainer.bad_iters += 1
            if trainer.bad_iters >= config.logging.max_bad_iters:
                stopped = f"stopped after {trainer.bad_iters} consecutive non-finite losses"
        else:
            trainer.bad_iters = 0
        if trainer.iteration % config.eval.every == 0 and trainer.iteration < o.iterations:
            metrics["eval"], _ = trainer.evaluate()  # the last iteration is evaluated below, once
        log(metrics)
        if writer is not None:
            for key in ("reward", "accuracy", "loss", "kl", "clip_fraction", "grad_norm"):
                if key in metrics:
                    writer.add_scalar(f"train/{key}", metrics[key], trainer.iteration)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        if stopped:
            break
        if trainer.iteration % config.logging.checkpoint_every == 0 or trainer.iteration == o.iterations:
            trainer.save_checkpoint()
    bar.close()

    after, curves = trainer.evaluate()
    log({"phase": "after", "iteration": trainer.iteration, "eval": after})
    trainer.dist.barrier()  # the metrics file is complete before any rank reads it
    history = _read_metrics(metrics_path)
    before = next(m["eval"] for m in history if m.get("phase") == "before")
    summary = {"run_dir": str(run_dir), "iterations": trainer.iteration, "before": before, "after": after,
               "stopped": stopped}
    if main:
        write_plots(run_dir, history, curves)
        atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    if writer is not None:
        writer.close()
    return summary


def _tensorboard(config: TrainConfig, run_dir: Path):
    if not config.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        tqdm.write("logging.tensorboard is on but tensorboard is not installed; skipping it")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))

