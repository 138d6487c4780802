"""torch.distributed for atpo-train under torchrun: the process group, DDP / FSDP2, reductions.

Launched by torchrun (WORLD_SIZE > 1 in the environment), `setup` joins the process group (NCCL on
CUDA, gloo on CPU) and `wrap` shards the model with FSDP2 (`fully_shard` on every block of the
model's layer list, then on the root) or replicates it with DDP. In one process every helper here
is a no-op. Checkpoints (DCP folders that resume on any number of ranks) are in checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from atpo_fast.choices import DIST_BACKENDS, STRATEGIES

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

    def reduce(self, values: dict, op: str, device) -> dict:
        """The same reduction (sum | max | min over the ranks) of several numbers and 1-d tensors at
        once, packed into one float64 all_reduce. Numbers come back as floats, tensors as float64 on
        the CPU (in one process, unchanged)."""
        if self.world == 1 or not values:
            return values
        parts = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values.values()]
        reduced = self.all_reduce(torch.cat(parts).to(device), op).cpu().split([p.numel() for p in parts])
        return {key: (r if isinstance(v, torch.Tensor) else r.item()) for (key, v), r in zip(values.items(), reduced)}

    def reduce_metrics(self, sums: dict, maxes: dict, device) -> tuple[dict, dict]:
        """An iteration's metrics in one go: `sums` summed and `maxes` maximised over the ranks."""
        return self.reduce(sums, "sum", device), self.reduce(maxes, "max", device)


def device_type(device: str) -> str:
    """A config's device ("auto", "cpu" or "cuda") as "cpu" or "cuda": auto is CUDA when there is a GPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def setup(backend: str = "auto", device: str = "auto") -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process); else a one-process Dist.

    backend "auto" is NCCL for a CUDA run (`device` "cuda", or "auto" on a machine with a GPU) and gloo
    otherwise, so a CPU run under torchrun on a GPU machine neither claims a GPU nor needs one per rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if backend not in DIST_BACKENDS:
        raise ValueError(f"distributed.backend must be one of {DIST_BACKENDS}, got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device_type(device) == "cuda" else "gloo"
        if backend == "nccl":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"distributed.backend 'nccl' needs a GPU per rank on this machine: local rank "
                                 f"{local_rank}, {torch.cuda.device_count()} GPU(s) visible (start fewer processes "
                                 f"per node, or run on the CPU with device=cpu)")
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    # the mesh follows the model's device: FSDP's default mesh is CUDA whenever a GPU exists, and would
    # claim GPU `local_rank` for a CPU run under torchrun on a one-GPU machine
    mesh = init_device_mesh(device.type, (d.world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP sets up its root on the first forward through the root; run one (a single token) before the
    # sampler calls the blocks on their own, which would make each block a root of its own
    token = torch.zeros(1, dtype=torch.int64, device=device)
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
