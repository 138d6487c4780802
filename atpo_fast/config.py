"""Run configuration: one dataclass tree, loaded from YAML and overridden by `section.key=value` pairs.

Unknown keys and values of the wrong type raise a ValueError that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from atpo_fast.models.tiny import TinyConfig


@dataclasses.dataclass
class ModelConfig:
    kind: str = "tiny"  # tiny | llada | dream
    path: Optional[str] = None  # local folder of weights (required for llada / dream; optional for tiny)
    dtype: str = "float32"  # float32 | bfloat16: parameter dtype (CUDA runs use bf16 autocast either way)
    attn_implementation: Optional[str] = None  # llada / dream: e.g. flash_attention_2, when installed
    tiny: TinyConfig = dataclasses.field(default_factory=TinyConfig)  # the tiny model's shape


@dataclasses.dataclass
class TaskConfig:
    name: str = "sudoku4"
    data: Optional[str] = None  # the jsonl task's file
    options: dict = dataclasses.field(default_factory=dict)  # extra keyword arguments of the task


@dataclasses.dataclass
class SamplerConfig:
    gen_length: int = 16
    block_length: int = 16
    steps: int = 16
    temperature: float = 1.0
    remasking: str = "low_confidence"
    threshold: Optional[float] = None
    eos_fill: bool = False
    prompts_per_call: Optional[int] = None  # prompts per generate call (None: a rank's whole share at once)


@dataclasses.dataclass
class SelectionConfig:
    rule: str = "hybrid"  # uniform | random | entropy | margin | roec | hybrid
    mode: str = "select"  # select | partition
    budget: int = 4  # rows per response
    alpha: float = 0.5
    per: str = "batch"  # batch | trajectory
    token_set: str = "committed"  # committed | masked


@dataclasses.dataclass
class OptimConfig:
    iterations: int = 80
    prompts_per_iter: int = 16
    group_size: int = 8  # responses per prompt
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_iters: int = 0
    micro_batch_rows: int = 256
    updates_per_batch: int = 1
    clip_eps: float = 0.2
    kl_beta: float = 0.01


@dataclasses.dataclass
class WarmStartConfig:
    steps: int = 400  # supervised masked-diffusion steps before RL (0: none)
    seed: int = 0  # model init and supervised data: runs that differ only in `seed` share one warm start
    batch_size: int = 64
    lr: float = 1e-3
    cache_dir: str = ".cache/warmstart"


@dataclasses.dataclass
class EvalConfig:
    every: int = 20  # iterations between held-out evaluations
    size: int = 200  # held-out problems
    pass_k: int = 4
    pass_temperature: float = 1.0


@dataclasses.dataclass
class LoggingConfig:
    run_dir: str = "runs"
    name: Optional[str] = None  # default: <task>-<rule>-seed<seed>
    checkpoint_every: int = 20
    tensorboard: bool = False
    max_bad_iters: int = 3  # consecutive NaN / inf losses before the run stops


@dataclasses.dataclass
class DistributedConfig:  # used when torchrun starts more than one process
    strategy: str = "ddp"  # ddp (a model replica per GPU) | fsdp (FSDP2: parameters sharded over the ranks)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # kernels: auto | triton | torch
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    warmstart: WarmStartConfig = dataclasses.field(default_factory=WarmStartConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint, key: str) -> Any:
    """value as the annotated type (int, float, str, bool, dict, Optional[...]); else a ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner[0], key)
    expected = hint.__name__ if isinstance(hint, type) else str(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint in (int, float):
        exact = (int, float) if hint is float else int  # an int is a valid float, not the other way round
        if isinstance(value, exact) and not isinstance(value, bool):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict:
        if isinstance(value, dict):
            return value
    raise ValueError(f"config key {key!r} expects {expected}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, prefix + name)
    return cls(**values)


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """A TrainConfig from defaults, then the YAML file (or `base`), then `key=value` overrides."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return _build(TrainConfig, data)


def save_config(config: TrainConfig, path: str | Path) -> None:
    from atpo_fast.io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))
