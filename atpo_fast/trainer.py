"""The ATPO trainer, short enough to read top to bottom.

One iteration: sample prompts; roll out group_size responses per prompt with the sampler (policy
in eval mode, no grad) while it records each step's confusion signals; score the responses; z-score
rewards within each prompt's group (groups with no reward spread carry no signal and are dropped);
select steps (ATPO's hybrid rule, or a baseline) at a budget of k rows per response; build the rows
with build_step_rows; compute the old log-probs once; then the clipped surrogate (+ k3-KL) over the
rows in micro-batches with gradient accumulation, AdamW and gradient clipping. Log-probs come from
the hidden states at the target positions only, through fused_linear_logprobs.

Randomness is derived from (seed, iteration), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from atpo_fast.config import TrainConfig, save_config
from atpo_fast.io import atomic_write
from atpo_fast.loss import clipped_policy_loss, group_advantages
from atpo_fast.models import DiffusionLM, TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from atpo_fast.ops.step_rows import StepRows, build_step_rows
from atpo_fast.sampler import Rollout, generate
from atpo_fast.selection import batch_average, select_steps, step_scores, step_signals
from atpo_fast.tasks import Example, Task, get_task

CHECKPOINT = "checkpoint.pt"
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

    def __init__(self, config: TrainConfig, run_dir: Path, model: DiffusionLM | None = None, task: Task | None = None):
        self.config = config
        self.run_dir = run_dir
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if config.device == "auto" else config.device)
        self.task = task if task is not None else build_task(config)
        self.model = model.to(self.device) if model is not None else build_model(config, self.device)
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        warmup = max(o.warmup_iters, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: min(1.0, (it + 1) / warmup) if warmup else 1.0)
        self.iteration = 0
        self.bad_iters = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())

    def clock(self) -> float:
        """Wall time in seconds, after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ rollouts and rewards

    def rollout(self, examples: list[Example], repeats: int, temperature: float, seed: int) -> Rollout:
        s = self.config.sampler
        prompts = [ex.prompt for ex in examples for _ in range(repeats)]
        ids, mask = encode_batch(self.model, prompts, self.device)
        self.model.eval()
        with self.autocast:
            return generate(self.model, ids, gen_length=s.gen_length, block_length=s.block_length, steps=s.steps,
                            temperature=temperature, remasking=s.remasking, threshold=s.threshold, attention_mask=mask,
                            seed=seed, eos_fill=s.eos_fill, backend=self.config.backend)

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
            hidden = self.model.hidden_states(rows.input_ids[r0:r1], attention_mask[r0:r1])
        picked = hidden[rows.target_row[t0:t1] - r0, rows.target_pos[t0:t1]]
        head = self.model.lm_head
        return fused_linear_logprobs(picked, head.weight, rows.target_token[t0:t1], bias=head.bias)

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
        c, o = self.config, self.config.optim
        seed = derive_seed(c.seed, "iteration", self.iteration)
        examples = random.Random(seed).sample(self.task.train, o.prompts_per_iter)
        start = self.clock()
        rollout = self.rollout(examples, o.group_size, c.sampler.temperature, seed)
        rollout_time = self.clock() - start
        rewards, correct = self.score(examples, o.group_size, rollout)
        advantages, informative = group_advantages(rewards, o.group_size)

        sel = c.selection
        starts, ends = select_steps(rollout.trace, sel.budget, sel.rule, sel.mode, sel.alpha, sel.per,
                                    seed=seed, token_set=sel.token_set)
        starts[~informative], ends[~informative] = -1, -1
        metrics = {"iteration": self.iteration, "reward": rewards.mean().item(),
                   "accuracy": correct.float().mean().item(),
                   "informative_fraction": informative.float().mean().item(), "rollout_time": rollout_time,
                   "tokens_per_second": rollout.step_map.numel() / rollout_time,
                   **self.selection_metrics(rollout, starts)}

        start = self.clock()
        rows = self.training_rows(rollout, starts.to(self.device), ends.to(self.device))
        n_rows = rows.input_ids.shape[0]
        metrics.update(rows=n_rows, targets=rows.target_row.numel())
        if n_rows == 0:
            metrics.update(skipped="no informative rows", update_time=0.0)
            return metrics
        attention = rollout.attention_mask[rows.seq_index]
        token_advantage = advantages.to(self.device)[rows.seq_index[rows.target_row]]
        self.model.eval()  # the same mode for old and new log-probs
        with torch.no_grad():
            old = torch.cat([self.row_logprobs(rows, attention, *b) for b in self.micro_batches(rows)])

        totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for _ in range(o.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, stats_sum = 0.0, {"clip_fraction": 0.0, "kl": 0.0}
            for r0, r1, t0, t1 in self.micro_batches(rows):
                logprob = self.row_logprobs(rows, attention, r0, r1, t0, t1)
                loss, stats = clipped_policy_loss(logprob, old[t0:t1], token_advantage[t0:t1],
                                                  rows.target_row[t0:t1] - r0, n_rows, o.clip_eps, o.kl_beta)
                loss.backward()
                loss_sum += loss.item()
                for name in stats_sum:
                    stats_sum[name] += stats[name].item() * (t1 - t0) / rows.target_row.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics.update(skipped="non-finite loss or gradient", loss=loss_sum, grad_norm=grad_norm,
                               update_time=self.clock() - start)
                return metrics
            self.optimizer.step()
            totals = {"loss": loss_sum, **stats_sum}
        self.scheduler.step()
        metrics.update(totals, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                       update_time=self.clock() - start, peak_memory_mb=peak_memory_mb(self.device))
        return metrics

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

    def selection_metrics(self, rollout: Rollout, starts: torch.Tensor) -> dict:
        """The batch-average step signals and how often each step index was selected."""
        trace, sel = rollout.trace, self.config.selection
        signals = step_signals(trace, sel.token_set)
        score = batch_average(step_scores(trace, "hybrid", sel.alpha, "batch", sel.token_set),
                              signals["reached"])
        used = starts[starts >= 0]
        counts = torch.bincount(used, minlength=trace.num_steps) if used.numel() else torch.zeros(trace.num_steps)

        def clean(values):
            return [None if math.isnan(v) else round(v, 6) for v in values.tolist()]

        return {"step_entropy": clean(batch_average(signals["entropy"], signals["reached"])),
                "step_uncertainty": clean(batch_average(signals["uncertainty"], signals["reached"])),
                "step_roec": clean(batch_average(signals["roec"], signals["reached"])),
                "step_hybrid_score": clean(score), "selected_step_counts": counts.tolist()}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, size: int | None = None) -> tuple[dict, dict]:
        """Held-out greedy accuracy and pass@k; also the greedy rollouts' traces for the plots."""
        e = self.config.eval
        examples = self.task.test[:size or e.size]
        greedy = self.rollout(examples, 1, 0.0, derive_seed(self.config.seed, "eval"))
        rewards, correct = self.score(examples, 1, greedy)
        result = {"accuracy": correct.float().mean().item(), "reward": rewards.mean().item()}
        if e.pass_k > 0:
            sampled = self.rollout(examples, e.pass_k, e.pass_temperature, derive_seed(self.config.seed, "pass@k"))
            _, hits = self.score(examples, e.pass_k, sampled)
            result[f"pass@{e.pass_k}"] = hits.view(-1, e.pass_k).any(1).float().mean().item()
        curves = {"entropy": greedy.trace.entropy.cpu(), "margin": greedy.trace.margin.cpu(),
                  "roec": greedy.trace.roec.cpu(), "correct": correct}
        return result, curves

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "bad_iters": self.bad_iters,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": self.config.to_dict()}
        atomic_write(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.bad_iters = state["iteration"], state["bad_iters"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def run_name(config: TrainConfig) -> str:
    return config.logging.name or f"{config.task.name}-{config.selection.rule}-seed{config.seed}"


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the summary. Everything lands in run_dir/<name>/."""
    from atpo_fast.plots import write_plots
    from atpo_fast.warmstart import warm_start

    run_dir = Path(config.logging.run_dir) / run_name(config)
    checkpoint = run_dir / CHECKPOINT
    metrics_path = run_dir / METRICS
    if resume and not checkpoint.exists():
        raise ValueError(f"cannot resume: {checkpoint} does not exist")
    if not resume and metrics_path.exists():
        raise ValueError(f"run folder {run_dir} already holds a run; pass --resume, or choose another "
                         f"logging.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    trainer = Trainer(config, run_dir)
    writer = _tensorboard(config, run_dir)

    if resume:
        trainer.load_checkpoint(checkpoint)
        kept = [m for m in _read_metrics(metrics_path) if m.get("phase") == "before"
                or ("phase" not in m and m["iteration"] < trainer.iteration)]
        atomic_write(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in kept)))
    else:
        warm = warm_start(trainer, progress=progress)
        before, _ = trainer.evaluate()
        _append_metrics(metrics_path, {"phase": "before", "iteration": 0, "warm_start": warm, "eval": before})
        trainer.save_checkpoint()

    o = config.optim
    bar = tqdm(total=o.iterations, initial=trainer.iteration, desc="ATPO", disable=not progress, dynamic_ncols=True)
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
        _append_metrics(metrics_path, metrics)
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
    _append_metrics(metrics_path, {"phase": "after", "iteration": trainer.iteration, "eval": after})
    history = _read_metrics(metrics_path)
    before = next(m["eval"] for m in history if m.get("phase") == "before")
    summary = {"run_dir": str(run_dir), "iterations": trainer.iteration, "before": before, "after": after,
               "stopped": stopped}
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

