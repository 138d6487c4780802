"""torch.distributed for atpo-train under torchrun: the process group, DDP / FSDP2, reductions, DCP checkpoints.

Launched by torchrun (WORLD_SIZE > 1 in the environment), `setup` joins the process group (NCCL on
CUDA, gloo on CPU) and `wrap` shards the model with FSDP2 (`fully_shard` on every block of the
model's layer list, then on the root) or replicates it with DDP. In one process every helper here
is a no-op. Checkpoints are always torch.distributed.checkpoint folders, so a run resumes on any
number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce tensor in place over the ranks of group (op: sum | max | min) and return it; a no-op
    when group is None (one process)."""
    if group is not None:
        dist.all_reduce(tensor, _OPS[op], group=group)
    return tensor


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and local rank (0, 1, 0 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group to reduce over, or None in a one-process run."""
        return dist.group.WORLD if self.world > 1 else None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place over every rank (op: sum | max | min) and return the tensor."""
        return all_reduce(tensor, op, self.group)

    def reduce_values(self, values: dict[str, float], op: str, device) -> dict[str, float]:
        """The same reduction of several Python numbers at once."""
        if self.world == 1 or not values:
            return values
        reduced = self.all_reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=device), op)
        return dict(zip(values, reduced.tolist()))


def setup(backend: str = "auto") -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process); else a one-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"distributed.backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the model's largest ModuleList (empty if it has none)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """The module whose forward the trainer calls: the model itself in one process or under FSDP2
    (which shards it in place), a DistributedDataParallel around it under DDP."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if d.world == 1:
        return model
    if strategy == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    # FSDP sets up its root on the first forward through the root; run one (a single token) before the
    # sampler calls the blocks on their own, which would make each block a root of its own
    token = torch.zeros(1, dtype=torch.int64, device=next(model.parameters()).device)
    with torch.no_grad():
        model(token[None], None, token, token, token)
    model.reshard()  # the root keeps its parameters gathered after a forward; the optimizer wants the shards
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under FSDP2, hold the root's own parameters (embeddings, norm, LM head) unsharded for calls
    that do not go through forward (the sampler's); the blocks gather theirs in their forward."""
    if not hasattr(model, "unshard"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def gradient_sync(policy: nn.Module, enabled: bool):
    """A context in which backward all-reduces (DDP) or reduce-scatters (FSDP2) gradients only if enabled,
    so that micro-batches accumulate locally and synchronise once."""
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else policy.no_sync()
    if hasattr(policy, "set_requires_gradient_sync"):
        policy.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, d: Dist) -> None:
    """Write model, optimizer and `extra` (numbers and strings) as a DCP folder at path, atomically:
    every rank writes into path.tmp, then rank 0 swaps it in (the previous one survives as path.old
    until the swap is done, and load_checkpoint falls back on it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if hasattr(model, "reshard"):
        model.reshard()  # FSDP2 state dicts are built from the shards
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
    # an optimizer that has not stepped yet is left out: asking DCP for its state would initialise it
    # with a zero-gradient step, and AdamW's bias correction would then count one step too many
    state = {"model": get_model_state_dict(model), "extra": {**extra, "has_optimizer_state": bool(optimizer.state)}}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with _single_process_quiet(d):
        dcp.save(state, checkpoint_id=str(tmp))
    d.barrier()
    if d.main:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def checkpoint_path(path: Path) -> Path | None:
    """The complete checkpoint folder at path (or its .old copy, if a swap was interrupted), else None."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / ".metadata").is_file():
            return candidate
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, d: Dist) -> dict:
    """Load a checkpoint written by save_checkpoint with any number of ranks; `extra` gives the keys
    (and placeholder values) to read back. Returns extra with the saved values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    found = checkpoint_path(path)
    if found is None:
        raise ValueError(f"no checkpoint at {path}")
    state = {"extra": {**extra, "has_optimizer_state": False}}
    with _single_process_quiet(d):
        dcp.load(state, checkpoint_id=str(found))
        state["model"] = get_model_state_dict(model)
        if state["extra"]["has_optimizer_state"]:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        dcp.load({k: v for k, v in state.items() if k != "extra"}, checkpoint_id=str(found))
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return {k: v for k, v in state["extra"].items() if k in extra}


@contextlib.contextmanager
def _single_process_quiet(d: Dist):
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        if d.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
