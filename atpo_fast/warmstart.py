"""Supervised warm start of the tiny model (masked-diffusion SFT), cached on disk for the next run.

LLaDA's SFT objective: each response is completed to gen_length with EOS, every response token is
masked with probability t ~ U(0.02, 1) drawn per sequence, and the loss is the cross-entropy of the
masked tokens weighted by 1/t, summed and divided by the number of response tokens. Log-probs come
from the model's forward (fused_linear_logprobs at the masked positions only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from atpo_fast.common import derive_seed, linear_warmup
from atpo_fast.config import TrainConfig
from atpo_fast.models import TinyDiffusionLM
from atpo_fast.tasks import Example, Task

MIN_MASK_RATE = 0.02
# part of the cache key: bump it when the code changes what a warm start learns (2: [MASK] left out of
# the training softmax), so a cache made by older code is not reused
OBJECTIVE_VERSION = 2


def cache_folder(c: TrainConfig) -> Path:
    """Where this warm start is cached: keyed by everything that changes its result."""
    warm = {k: v for k, v in dataclasses.asdict(c.warmstart).items() if k != "cache_dir"}
    # how the RL phase trains (adapters, checkpointing) does not change the warm start
    model = {k: v for k, v in dataclasses.asdict(c.model).items() if k not in ("lora", "activation_checkpointing")}
    key = derive_seed(json.dumps([dataclasses.asdict(c.task), model, warm, c.sampler.gen_length, OBJECTIVE_VERSION],
                                 sort_keys=True))
    return Path(c.warmstart.cache_dir) / f"{c.task.name}-{key:016x}"


def supervised_batch(model: TinyDiffusionLM, examples: list[Example], gen_length: int, device,
                     generator: torch.Generator):
    """Masked sequences [B, Lp + gen] with their attention mask, masked positions and weights 1/t."""
    prompts, mask = model.encode_prompts([ex.prompt for ex in examples], device)
    tokenizer = model.tokenizer
    responses = torch.full((len(examples), gen_length), tokenizer.eos_id, dtype=torch.int64)
    for i, ex in enumerate(examples):
        target = tokenizer.encode(ex.target)[:gen_length]
        responses[i, :len(target)] = torch.tensor(target, dtype=torch.int64)
    responses = responses.to(device)
    rate = torch.rand(len(examples), 1, generator=generator).to(device) * (1 - MIN_MASK_RATE) + MIN_MASK_RATE
    masked = torch.rand(responses.shape, generator=generator).to(device) < rate
    noisy = torch.where(masked, model.mask_id, responses)
    tokens = torch.cat([prompts, noisy], dim=1)
    attention = torch.cat([mask, torch.ones_like(responses)], dim=1)
    rows, cols = masked.nonzero(as_tuple=True)
    return tokens, attention, rows, cols + prompts.shape[1], responses[rows, cols], 1.0 / rate[rows, 0]


def warm_start(model: TinyDiffusionLM, task: Task, c: TrainConfig, device, progress: bool = True) -> dict:
    """Train the tiny model in place on the task's targets (or load the cached result); returns a summary."""
    w = c.warmstart
    if w.steps <= 0:
        return {"steps": 0}
    if not isinstance(model, TinyDiffusionLM):
        raise ValueError("warmstart.steps > 0 is for the tiny model; set warmstart.steps=0 for pretrained models")
    folder = cache_folder(c)
    if (folder / "model.safetensors").exists():
        try:
            cached = TinyDiffusionLM.from_pretrained(folder, device=device)
        except ValueError as err:  # a damaged copy (one cut short while copied): trained again, and replaced
            tqdm.write(f"warm start: the cached copy cannot be read ({err}); training it again")
            shutil.rmtree(folder, ignore_errors=True)
        else:
            model.load_state_dict(cached.state_dict())
            return {"steps": w.steps, "cached": str(folder)}

    seed = derive_seed(w.seed, "warmstart")
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    scheduler = linear_warmup(optimizer, max(1, w.steps // 20))
    model.train()
    losses = []
    for _ in tqdm(range(w.steps), desc="warm start", disable=not progress, dynamic_ncols=True):
        examples = rng.sample(task.train, w.batch_size)
        tokens, attention, rows, cols, targets, weight = supervised_batch(model, examples, c.sampler.gen_length,
                                                                          device, generator)
        logprob = model(tokens, attention, rows, cols, targets)
        loss = -(logprob * weight).sum() / (w.batch_size * c.sampler.gen_length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: another run may have cached the same warm start meanwhile
    except OSError as err:  # that run's copy, or a full disk: the cache only saves the next run's time
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model.safetensors").exists():
            tqdm.write(f"warm start: not cached ({err}); the run goes on, and the next one trains it again")
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": w.steps, "cached": None, "final_loss": sum(tail) / len(tail)}
