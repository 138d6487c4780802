"""Checkpoints of a training run, and the one way to load a run folder back.

A checkpoint is a torch.distributed.checkpoint (DCP) folder: the model's trainable parameters (all
of them in full fine-tuning, the adapters alone with LoRA), the optimizer state and the trainer's
own state (iteration, bad-iteration count, scheduler, random generators) as DCP stores them, so a
run written by any number of ranks resumes on any other number. Writes are atomic: every rank
writes into path.tmp, then rank 0 swaps it in; the previous checkpoint survives as path.old until
the swap is done, and a reader falls back on it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from atpo_fast.config import CONFIG
from atpo_fast.distributed import Dist

if TYPE_CHECKING:
    from atpo_fast.trainer import Trainer

CHECKPOINT = "checkpoint"  # the checkpoint folder inside a run folder
BASE = "base"  # a LoRA run of the tiny model: its frozen base (the warm start), which no checkpoint holds


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, d: Dist) -> None:
    """Write model, optimizer and `extra` (numbers, strings, tensors, nested dicts of them) at path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _trainable_only()
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if hasattr(model, "reshard"):
        model.reshard()  # FSDP2 state dicts are built from the shards
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
    # an optimizer that has not stepped yet is left out: asking DCP for its state would initialise it
    # with a zero-gradient step, and AdamW's bias correction would then count one step too many
    state = {"model": get_model_state_dict(model, options=options),
             "extra": {**extra, "has_optimizer_state": bool(optimizer.state)}}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    try:
        with _single_process_quiet(d):
            dcp.save(state, checkpoint_id=str(tmp))
    except (OSError, RuntimeError, CheckpointException) as err:  # a full disk surfaced as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # what was written of it, to free the space
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = sum(f.stat().st_size for f in path.iterdir()) / 2**20 if path.is_dir() else 0.0
        raise OSError(f"writing the checkpoint {tmp} failed ({_cause(err)}; {free:.0f} MiB free there): the last "
                      f"complete one, {path} ({kept:.0f} MiB; a save needs about as much again beside it), "
                      f"is kept") from err
    d.barrier()
    if d.main:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _cause(err: BaseException) -> str:
    """The first line of what went wrong inside DCP: the rank's own exception when DCP wrapped it, without
    the C++ stack torch appends."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:  # DCP's wrapper of each rank's exception
        err = next(iter(err.failures.values()))[0]
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _trainable_only():
    """DCP options: the trainable parameters only; the frozen ones (a LoRA run's base) are rebuilt, not stored."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def find(path: Path) -> Path | None:
    """The complete checkpoint folder at path (or its .old copy, if a swap was interrupted), else None."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / ".metadata").is_file():
            return candidate
    return None


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict, d: Dist) -> dict:
    """Load what save_state wrote, with any number of ranks. `extra` is the template of the values to
    read back (its keys; tensors of the right shape; None for other objects); returns their saved values.
    optimizer None: the optimizer's state stays on disk (its moments take twice the weights' memory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    options = _trainable_only()
    found = find(path)
    if found is None:
        raise ValueError(f"no checkpoint at {path}")
    state = {"extra": {**extra, "has_optimizer_state": False}}
    try:
        with _single_process_quiet(d):
            dcp.load(state, checkpoint_id=str(found))
            state["model"] = get_model_state_dict(model, options=options)
            if optimizer is not None and state["extra"]["has_optimizer_state"]:
                state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
            dcp.load({k: v for k, v in state.items() if k != "extra"}, checkpoint_id=str(found))
    # what DCP raises for a file cut short (RuntimeError), a broken .metadata (AssertionError, pickle's errors),
    # a missing file (OSError), or a model other than the run's; on several ranks, wrapped in CheckpointException
    except (OSError, RuntimeError, AssertionError, EOFError, pickle.UnpicklingError, CheckpointException) as err:
        raise ValueError(f"the checkpoint {found} cannot be loaded ({_cause(err)}): a damaged or incomplete "
                         f"copy, or a model other than the run's") from err
    set_model_state_dict(model, state["model"], options=options)
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    return {k: v for k, v in state["extra"].items() if k in extra}


def save(trainer: Trainer, path: Path) -> None:
    """The trainer's model, optimizer, scheduler, counters and random generator states (rank 0's).
    The trainer's own randomness is derived from (seed, iteration); the generator states are restored
    for code that draws from them."""
    cuda = tuple(s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None
    extra = {"iteration": trainer.iteration, "bad_iters": trainer.bad_iters,
             "scheduler": trainer.scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}}
    save_state(path, trainer.model, trainer.optimizer, extra, trainer.dist)


def load(trainer: Trainer, path: Path, optimizer: bool = True) -> None:
    """Restore what `save` wrote (by any number of ranks) into the trainer; optimizer False leaves its
    moments out (a run to evaluate or export, not to train on)."""
    template = {"iteration": 0, "bad_iters": 0, "scheduler": trainer.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": None, "cuda": None}}
    extra = load_state(path, trainer.model, trainer.optimizer if optimizer else None, template, trainer.dist)
    trainer.iteration, trainer.bad_iters = int(extra["iteration"]), int(extra["bad_iters"])
    trainer.scheduler.load_state_dict(extra["scheduler"])
    rng = extra["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in rng["cuda"]])


def keep_base(model: nn.Module, config, run_dir: Path) -> None:
    """Write a tiny-model LoRA run's base model into the run folder (the adapters' checkpoints leave it
    out; a LLaDA / Dream base is model.path itself). Call before the adapters are added."""
    if config.model.lora.rank and config.model.kind == "tiny":
        model.save_pretrained(run_dir / BASE)


def run_model(config, run_dir: Path, device):
    """The model a run folder's checkpoint applies to: its kept base, else the one the config builds."""
    from atpo_fast.models import TinyDiffusionLM
    from atpo_fast.trainer import build_model

    if (run_dir / BASE / "config.json").is_file():
        return TinyDiffusionLM.from_pretrained(run_dir / BASE, device=device)
    return build_model(config, device)


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> Trainer:
    """A Trainer for a run folder, to evaluate or export: its config (with overrides) and its last checkpoint,
    without the optimizer's state (AdamW's moments: 32 GB more for a fully fine-tuned 8B model in bf16)."""
    from atpo_fast import distributed
    from atpo_fast.config import load_config
    from atpo_fast.trainer import Trainer, resolve_device

    run_dir = Path(run_dir)
    if find(run_dir / CHECKPOINT) is None:
        raise ValueError(f"{run_dir} holds no {CHECKPOINT}/ folder")
    config = load_config(run_dir / CONFIG, overrides)
    device = resolve_device(config, distributed.setup(config.distributed.backend, config.device))
    trainer = Trainer(config, run_model(config, run_dir, device))
    load(trainer, run_dir / CHECKPOINT, optimizer=False)
    return trainer


@contextlib.contextmanager
def _single_process_quiet(d: Dist):
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        if d.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
