"""A training run around the trainer: the run folder, warm start, resume, logging, plots and summary.

    runs/<name>/config.yaml     the resolved config
    runs/<name>/metrics.jsonl   one record per iteration, plus the held-out evaluations before and after
    runs/<name>/checkpoint/     the last checkpoint (checkpoint.py), every logging.checkpoint_every iterations
    runs/<name>/base/           a LoRA run of the tiny model: the frozen base its adapters apply to
    runs/<name>/summary.json    held-out results before and after, and why the run stopped early, if it did
    runs/<name>/*.png           the plots (plots.py)

Under torchrun every rank calls `train`; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from atpo_fast import checkpoint, distributed
from atpo_fast.checkpoint import CHECKPOINT
from atpo_fast.config import CONFIG, TrainConfig, check_resumable, load_config, save_config
from atpo_fast.io import atomic_write
from atpo_fast.trainer import Trainer, build_model, build_task, check_task, resolve_device
from atpo_fast.warmstart import warm_start

METRICS = "metrics.jsonl"
SCALARS = ("reward", "accuracy", "loss", "kl", "clip_fraction", "grad_norm")  # what TensorBoard gets


def make_run_folder(run_dir: Path) -> None:
    """Make run_dir (and its parents) before the warm start, so that a logging.run_dir this process cannot
    write to fails at once, naming the key, instead of after minutes of work with an OSError."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror
    else:
        if os.access(run_dir, os.W_OK | os.X_OK):
            return
        reason = "no permission to write there"
    raise ValueError(f"config key 'logging.run_dir' expects a folder this process can write, got "
                     f"{str(run_dir.parent)!r} (making {run_dir}: {reason})")


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl. A last line without its newline is a record whose write was cut (the
    process killed, the disk full): it is dropped when it does not parse, as its iteration runs again on
    resume. A bad line anywhere else is an error naming the file and line."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{number} is not a JSON record") from None
    return records


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the summary. Everything lands in run_dir/<name>/."""
    from atpo_fast.plots import write_plots

    run_dir = config.run_folder()
    checkpoint_dir, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    if resume:
        if checkpoint.find(checkpoint_dir) is None:
            raise ValueError(f"cannot resume: {checkpoint_dir} does not exist")
        # the saved config read with this resume's paths, which may have moved (checked where they are now)
        moved = [f"model.path={json.dumps(config.model.path)}", f"task.data={json.dumps(config.task.data)}"]
        check_resumable(load_config(run_dir / CONFIG, moved), config)
    elif metrics_path.exists():
        raise ValueError(f"run folder {run_dir} already holds a run; pass --resume, or choose another "
                         f"logging.name")

    # the model, warm-started before it is wrapped for data parallelism (a resumed run loads its checkpoint)
    dist = distributed.setup(config.distributed.backend, config.device)
    device = resolve_device(config, dist)
    if dist.main:
        make_run_folder(run_dir)
    task = build_task(config)
    if resume:
        model, warm_info = checkpoint.run_model(config, run_dir, device), None
    else:
        model = build_model(config, device)
        if config.warmstart.steps:  # before the warm start's minutes of work (Trainer checks it again after)
            check_task(config, model, task)
        warm_info = warm_start_on_every_rank(model, task, config, device, dist, progress)
        if dist.main:
            checkpoint.keep_base(model, config, run_dir)
    trainer = Trainer(config, model, task)
    main = dist.main
    dist.barrier()  # every rank has passed the checks above before rank 0 writes a file
    if main:
        save_config(config, run_dir / CONFIG)
    writer = tensorboard_writer(config, run_dir) if main else None

    def log(record: dict) -> None:
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if writer is not None and "phase" not in record:
            for key in SCALARS:
                if key in record:
                    writer.add_scalar(f"train/{key}", record[key], record["iteration"] + 1)

    if resume:
        checkpoint.load(trainer, checkpoint_dir)
        if main:  # drop the records of iterations after the checkpoint: they are run again
            kept = [m for m in read_metrics(metrics_path) if m.get("phase") == "before"
                    or ("phase" not in m and m["iteration"] < trainer.iteration)]
            atomic_write(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in kept)))
    else:
        before, _ = trainer.evaluate()
        log({"phase": "before", "iteration": 0, "warm_start": warm_info, "eval": before})
        checkpoint.save(trainer, checkpoint_dir)

    o, every = config.optim, config.logging
    bar = tqdm(total=o.iterations, initial=trainer.iteration, desc="ATPO", disable=not (progress and main),
               dynamic_ncols=True)
    stopped = None
    while trainer.iteration < o.iterations:
        metrics = trainer.train_iteration()
        trainer.iteration += 1
        trainer.bad_iters = trainer.bad_iters + 1 if metrics.get("skipped", "").startswith("non-finite") else 0
        if trainer.bad_iters >= every.max_bad_iters:
            stopped = f"stopped after {trainer.bad_iters} consecutive non-finite losses"
        if trainer.iteration % config.eval.every == 0 and trainer.iteration < o.iterations:
            metrics["eval"], _ = trainer.evaluate()  # the last iteration is evaluated below, once
        log(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        if stopped:
            break
        if trainer.iteration % every.checkpoint_every == 0 or trainer.iteration == o.iterations:
            checkpoint.save(trainer, checkpoint_dir)
    bar.close()

    after, curves = trainer.evaluate()
    log({"phase": "after", "iteration": trainer.iteration, "eval": after})
    dist.barrier()  # the metrics file is complete before any rank reads it
    history = read_metrics(metrics_path)
    before = next(m["eval"] for m in history if m.get("phase") == "before")
    summary = {"run_dir": str(run_dir), "iterations": trainer.iteration, "before": before, "after": after,
               "stopped": stopped}
    if main:
        write_plots(run_dir, history, curves)
        atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    if writer is not None:
        writer.close()
    return summary


def warm_start_on_every_rank(model, task, config: TrainConfig, device, dist: distributed.Dist,
                             progress: bool) -> dict:
    """Rank 0 trains (or loads) the warm start first; the other ranks then load its cached copy."""
    info = warm_start(model, task, config, device, progress=progress) if dist.main else None
    dist.barrier()
    return info if dist.main else warm_start(model, task, config, device, progress=False)


def tensorboard_writer(config: TrainConfig, run_dir: Path):
    if not config.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        tqdm.write("logging.tensorboard is on but tensorboard is not installed; skipping it")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
