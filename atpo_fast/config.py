"""Run configuration: one dataclass tree, loaded from YAML and overridden by `section.key=value` pairs.

Everything is checked when it is loaded, before any model is built: unknown keys, values of the
wrong type, choices outside their set, numbers out of range and combinations that cannot run all
raise a ValueError of one line that names the key, the value and what is allowed. This module
imports neither torch nor the models, so `atpo-train` rejects a bad value within a second or two.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from atpo_fast.choices import (Backend, Cache, Device, DistBackend, Implementation, Mode, ModelDtype, ModelKind,
                               Per, Remasking, RULES, Strategy, TokenSet)

DEFAULT_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"  # the tiny model's alphabet


@dataclasses.dataclass
class TinyConfig:
    """Shape of the tiny bidirectional model (atpo_fast.models.TinyDiffusionLM)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # must divide hidden_size
    intermediate_size: int = 384
    max_length: int = 160  # context in tokens: prompt plus response
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    chars: str = DEFAULT_CHARS  # the tokenizer's alphabet
    vocab_size: Optional[int] = None  # a larger embedding and LM head than the alphabet needs (benchmarks)


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters through peft (pip install atpo_fast[lora]); rank 0 trains every weight instead.

    With rank > 0 the base weights and the LM head are frozen (in model.dtype) and only the adapters
    train, in float32; checkpoints hold the adapters and their optimizer state only.
    """

    rank: int = 0  # adapter rank r (0: full fine-tuning)
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.0  # dropout on the adapters' input, in the update's forward only
    # names of the modules to adapt (a module matches when its name ends with one); null: the attention
    # and MLP projections of every block
    target_modules: Optional[list] = None


@dataclasses.dataclass
class ModelConfig:
    kind: ModelKind = "tiny"  # the built-in tiny model, or a pretrained LLaDA / Dream from model.path
    path: Optional[str] = None  # local folder of weights (required for llada / dream; optional for tiny)
    dtype: ModelDtype = "float32"  # llada / dream parameter dtype (CUDA runs use bf16 autocast either way)
    implementation: Implementation = "native"  # llada / dream: transformers' Llama / Qwen2, or the folder's code
    attn_implementation: Optional[str] = None  # llada / dream: e.g. flash_attention_2, when installed
    tiny: TinyConfig = dataclasses.field(default_factory=TinyConfig)  # the tiny model's shape
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # adapters instead of full fine-tuning
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)


@dataclasses.dataclass
class TaskConfig:
    name: str = "sudoku4"  # a registered task (atpo_fast.tasks.TASKS)
    data: Optional[str] = None  # the jsonl task's file
    options: dict = dataclasses.field(default_factory=dict)  # extra keyword arguments of the task


@dataclasses.dataclass
class SamplerConfig:
    gen_length: int = 16  # response tokens
    block_length: int = 16  # semi-autoregressive blocks of this many tokens; divides gen_length
    steps: int = 16  # denoising steps in all, spread evenly over the blocks
    temperature: float = 1.0  # rollout sampling temperature (0: greedy)
    remasking: Remasking = "low_confidence"  # which masked tokens a step commits
    threshold: Optional[float] = None  # commit every token above this confidence (low_confidence / margin)
    eos_fill: bool = False  # once EOS is committed, fill the rest of the response with EOS in bulk
    prompts_per_call: Optional[int] = None  # prompts per generate call (None: a rank's whole share at once)
    cache: Cache = "none"  # block KV cache: none (exact), prefix or dual (Fast-dLLM's; faster, approximate)
    cache_refresh: Optional[int] = None  # remake the cache every n steps of a block (None: once per block)


@dataclasses.dataclass
class SelectionConfig:
    rule: str = "hybrid"  # which steps become training rows: a built-in or registered rule (atpo_fast.selection)
    mode: Mode = "select"  # select: row [t, t + 1) per selected step; partition: selected steps start rows
    budget: int = 4  # rows per response
    alpha: float = 0.5  # hybrid rule: weight of RoEC against (1 - margin)
    tau: float = 1.0  # surprisal rule (Drift): softmax temperature of the step draw (0: top-k by surprisal)
    per: Per = "batch"  # rank steps by batch-averaged signals or per trajectory
    token_set: TokenSet = "committed"  # signals over the tokens committed at a step, or every masked candidate


@dataclasses.dataclass
class OptimConfig:
    iterations: int = 80  # ATPO iterations
    prompts_per_iter: int = 16  # prompts per iteration (over all ranks; a multiple of their number)
    group_size: int = 8  # responses per prompt
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # gradient norm clip
    warmup_iters: int = 0  # linear learning-rate warm-up over this many iterations
    micro_batch_rows: int = 256  # training rows per forward (gradient accumulation over micro-batches)
    # optimizer steps on each iteration's rows (PPO epochs); with 1 the old log-probs are the update's
    # own, detached (the policy has not moved yet), so no separate pass computes them
    updates_per_batch: int = 1
    clip_eps: float = 0.2  # PPO ratio clip
    kl_beta: float = 0.01  # weight of the k3 KL estimate against the rollout policy


@dataclasses.dataclass
class WarmStartConfig:
    steps: int = 400  # supervised masked-diffusion steps before RL (0: none; tiny model only)
    seed: int = 0  # model init and supervised data: runs that differ only in `seed` share one warm start
    batch_size: int = 64
    lr: float = 1e-3
    cache_dir: str = ".cache/warmstart"  # finished warm starts, keyed by everything that changes them


@dataclasses.dataclass
class EvalConfig:
    every: int = 20  # iterations between held-out evaluations
    size: int = 200  # held-out problems
    pass_k: int = 4  # samples per problem for pass@k (0: greedy accuracy only)
    pass_temperature: float = 1.0  # sampling temperature of the pass@k samples


@dataclasses.dataclass
class LoggingConfig:
    run_dir: str = "runs"  # runs land in run_dir/<name>/
    name: Optional[str] = None  # default: <task>-<rule>-seed<seed>
    checkpoint_every: int = 20  # iterations between checkpoints (and one at the end)
    tensorboard: bool = False  # also log scalars to run_dir/<name>/tensorboard (needs tensorboard)
    max_bad_iters: int = 3  # consecutive NaN / inf losses before the run stops


@dataclasses.dataclass
class DistributedConfig:  # used when torchrun starts more than one process
    strategy: Strategy = "ddp"  # ddp (a model replica per GPU) | fsdp (FSDP2: parameters sharded over the ranks)
    backend: DistBackend = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0  # rollouts, selection and evaluation draw from (seed, iteration)
    device: Device = "auto"  # auto: CUDA when there is a GPU
    backend: Backend = "auto"  # kernels: Triton on CUDA tensors (auto), or the torch path
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

    def run_folder(self) -> Path:
        """Where the run lands: logging.run_dir / (logging.name, or <task>-<rule>-seed<seed>)."""
        name = self.logging.name or f"{self.task.name}-{self.selection.rule}-seed{self.seed}"
        return Path(self.logging.run_dir) / name


CONFIG = "config.yaml"  # the run's resolved config inside its run folder
# what a resumed run may change: how long it trains, how it logs and evaluates, where and on how many ranks, and
# where its files are (a run moved to another machine finds its base model and data at other paths)
RESUMABLE = ("optim.iterations", "logging.", "eval.", "device", "backend", "distributed.", "warmstart.cache_dir",
             "model.path", "task.data")


def check_resumable(saved: TrainConfig, config: TrainConfig) -> None:
    """A ValueError naming every key outside RESUMABLE whose value differs from the run's saved config."""
    def flat(data: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    old, new = flat(saved.to_dict()), flat(config.to_dict())
    changed = [f"{key} ({old.get(key)!r} in the run, {new.get(key)!r} here)" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not key.startswith(RESUMABLE)]
    if changed:
        raise ValueError(f"a resumed run keeps its config, and these config keys differ from its {CONFIG}: "
                         f"{'; '.join(changed)}. Resume without them (atpo-train --resume starts from the run's "
                         f"own config), or start a new run; only {', '.join(RESUMABLE)} may change")


def check_values(config: TrainConfig) -> None:
    """Ranges and cross-field rules of a typed config; a ValueError naming the key(s) otherwise."""
    def value_at(key: str):
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"config key {key!r} expects {expected}, got {value_at(key)!r}")

    m, s, sel, o, w, e = config.model, config.sampler, config.selection, config.optim, config.warmstart, config.eval
    positive = "an int >= 1"
    for key in ("model.tiny.hidden_size", "model.tiny.num_layers", "model.tiny.num_heads",
                "model.tiny.intermediate_size", "model.tiny.max_length", "sampler.gen_length",
                "sampler.block_length", "sampler.steps", "selection.budget", "optim.iterations",
                "optim.prompts_per_iter", "optim.micro_batch_rows", "optim.updates_per_batch", "warmstart.batch_size",
                "eval.every", "eval.size", "logging.checkpoint_every", "logging.max_bad_iters"):
        need(value_at(key) >= 1, key, positive)
    for key, value in (("warmstart.steps", w.steps), ("optim.warmup_iters", o.warmup_iters),
                       ("eval.pass_k", e.pass_k)):
        need(value >= 0, key, "an int >= 0")
    for key, value in (("optim.lr", o.lr), ("warmstart.lr", w.lr), ("optim.grad_clip", o.grad_clip),
                       ("optim.clip_eps", o.clip_eps)):
        need(math.isfinite(value) and value > 0, key, "a finite number > 0")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.kl_beta", o.kl_beta),
                       ("sampler.temperature", s.temperature)):
        need(math.isfinite(value) and value >= 0, key, "a finite number >= 0")
    for key, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        need(0 <= value < 1, key, "a number in [0, 1)")
    need(0 <= sel.alpha <= 1, "selection.alpha", "a number in [0, 1]")
    need(math.isfinite(sel.tau) and sel.tau >= 0, "selection.tau", "a finite number >= 0")
    # the built-in rules, and those registered before the config loads (registering imports selection; the
    # config itself loads without torch)
    rules = sys.modules["atpo_fast.selection"].rule_names() if "atpo_fast.selection" in sys.modules else RULES
    need(sel.rule in rules, "selection.rule", f"one of {', '.join(map(repr, rules))}")
    name = config.logging.name  # one folder inside logging.run_dir
    need(name is None or (name not in ("", ".", "..") and not set("/\\") & set(name)), "logging.name",
         "null or a folder name (no '/' or '\\', not '.' or '..')")
    need(o.group_size >= 2, "optim.group_size", "an int >= 2 (advantages compare responses to one prompt)")
    need(e.pass_k == 0 or e.pass_temperature > 0, "eval.pass_temperature", "a number > 0 when eval.pass_k > 0")
    need(s.prompts_per_call is None or s.prompts_per_call >= 1, "sampler.prompts_per_call", "an int >= 1 or null")
    need(s.cache_refresh is None or s.cache_refresh >= 1, "sampler.cache_refresh", "an int >= 1 or null")
    need(m.tiny.vocab_size is None or m.tiny.vocab_size >= 4 + len(m.tiny.chars), "model.tiny.vocab_size",
         f"null or an int >= {4 + len(m.tiny.chars)} (the alphabet and four special tokens)")
    need(len(set(m.tiny.chars)) == len(m.tiny.chars) > 0, "model.tiny.chars", "characters none of which repeats")
    need(m.kind != "tiny" or m.attn_implementation is None, "model.attn_implementation",
         "null for model.kind='tiny' (its own is model.tiny.attn_implementation)")
    need(m.lora.rank > 0 or m.lora.target_modules is None, "model.lora.target_modules",
         "null when model.lora.rank is 0 (no adapters)")
    need(m.tiny.hidden_size % m.tiny.num_heads == 0, "model.tiny.hidden_size",
         f"a multiple of model.tiny.num_heads ({m.tiny.num_heads})")
    need(s.gen_length % s.block_length == 0, "sampler.gen_length",
         f"a multiple of sampler.block_length ({s.block_length})")
    need(s.steps % (s.gen_length // s.block_length) == 0, "sampler.steps",
         f"a multiple of the number of blocks, sampler.gen_length / sampler.block_length "
         f"({s.gen_length // s.block_length})")
    if s.threshold is not None:
        need(0 < s.threshold <= 1, "sampler.threshold", "null or a number in (0, 1]")
        need(s.remasking in ("low_confidence", "margin"), "sampler.remasking",
             "'low_confidence' or 'margin' when sampler.threshold is set")
    need(m.lora.rank >= 0, "model.lora.rank", "an int >= 0 (0: full fine-tuning)")
    need(math.isfinite(m.lora.alpha) and m.lora.alpha > 0, "model.lora.alpha", "a finite number > 0")
    need(0 <= m.lora.dropout < 1, "model.lora.dropout", "a number in [0, 1)")
    if m.lora.rank:
        import importlib.util

        need(importlib.util.find_spec("peft") is not None, "model.lora.rank",
             "0 where peft is not installed (pip install 'atpo_fast[lora]')")
    need(s.cache == "none" or m.kind == "tiny" or m.implementation == "native", "sampler.cache",
         "'none' with model.implementation='remote' (a KV cache needs the native model)")
    if s.cache != "none" and s.gen_length == s.block_length:
        warnings.warn(f"sampler.cache={s.cache!r} with one block (sampler.gen_length == sampler.block_length): the "
                      f"cache keeps only the prompt's keys and values, computed while the whole response is masked, "
                      f"so every later step sees a stale prompt. On the default job this made the update far "
                      f"off-policy (rollout_logprob_gap 1.28 against 2e-7 without a cache; README, Accuracy); use "
                      f"sampler.cache='none' or several blocks", stacklevel=2)
    if m.kind == "tiny":
        need(m.dtype == "float32", "model.dtype", "'float32' for the tiny model (it trains in float32)")
    else:
        need(bool(m.path), "model.path", f"a local folder of weights for model.kind={m.kind!r}")
        need(Path(m.path).is_dir(), "model.path", "an existing folder")
        need(w.steps == 0, "warmstart.steps", f"0 for model.kind={m.kind!r} (the warm start is for the tiny model)")
    from atpo_fast.tasks import TASKS  # the registry (plain Python, no torch)

    need(config.task.name in TASKS, "task.name", f"one of {sorted(TASKS)}")
    need(config.task.name != "jsonl" or bool(config.task.data), "task.data", "a JSONL file for task.name='jsonl'")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's ranks
    need(o.prompts_per_iter % world == 0, "optim.prompts_per_iter", f"a multiple of the number of ranks ({world})")
    need(e.size >= world, "eval.size", f"at least one held-out problem per rank ({world})")
    need(not (config.device == "cpu" and config.distributed.backend == "nccl"), "distributed.backend",
         "'auto' or 'gloo' with device='cpu' (NCCL runs on GPUs only)")
    if config.device == "cuda" or config.backend == "triton":
        import torch

        from atpo_fast.kernels import interpreter_enabled

        need(config.device != "cuda" or torch.cuda.is_available(), "device",
             "'auto' or 'cpu' on a machine without a CUDA GPU")
        on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        # checked here, not at the first rollout: after the warm start's minutes of work
        need(not on_cpu or interpreter_enabled(), "backend",
             "'auto' or 'torch' on a CPU run, or TRITON_INTERPRET=1 in the environment (backend='triton' "
             "on a CPU runs Triton's interpreter)")


def _coerce(value: Any, hint, key: str) -> Any:
    """value as the annotated type (int, float, str, bool, dict, Optional[...]); else a ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ValueError(f"config key {key!r} expects one of {', '.join(map(repr, choices))}, got {value!r}")
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
    elif hint is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        expected = "a list of strings"
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


def _parsed(text: str, where: str):
    """YAML text's value; a ValueError naming `where` and the first problem when it is not valid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML: {getattr(error, 'problem', None) or error}{at}") from None


def read_yaml(path: Path, depth: int = 0) -> dict:
    """A YAML config file's mapping; `extends: other.yaml` (beside it) is read first and then overridden."""
    data = _parsed(path.read_text(), f"config file {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if depth >= 8 or not (path.parent / parent).is_file():
        raise ValueError(f"config file {str(path)!r}: extends {parent!r} names no config file beside it (or loops)")
    return _merged(read_yaml(path.parent / parent, depth + 1), data)


def _merged(base: dict, top: dict) -> dict:
    """base with top's keys over it, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """A TrainConfig from defaults, then the YAML file (or `base`), then `key=value` overrides."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = read_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), _parsed(raw, f"override {item!r}") if raw.strip() else None)
    config = _build(TrainConfig, data)
    check_values(config)
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    from atpo_fast.io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))
