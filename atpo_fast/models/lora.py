"""Low-rank adapters (LoRA) on a DiffusionLM through peft, and activation checkpointing of its blocks.

`add_lora` injects peft's LoRA layers into the model in place (it stays the same DiffusionLM, so the
sampler and the trainer see no difference) and freezes everything else, the LM head included, so
fused_linear_logprobs computes no weight gradient. The adapters are float32 whatever the base
dtype (peft's autocast_adapter_dtype). The PeftModel it returns wraps the same modules; it is what
writes and reads peft's own adapter format (`save_pretrained`, `PeftModel.from_pretrained`).
"""

from __future__ import annotations

import torch
from torch import nn

from atpo_fast.config import LoraConfig
from atpo_fast.models.base import DiffusionLM

# transformers' Llama / Qwen2 block projections: the tiny model, native LLaDA and Dream, remote Dream
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LLaDA's own modeling file: the same projections under its names (its LM head is also called ff_out)
LLADA_REMOTE_PROJECTIONS = r".*blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"


def default_target_modules(model: DiffusionLM) -> list[str] | str:
    """The attention and MLP projections of every block, by the names this model's modules carry."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if set(PROJECTIONS) <= names:
        return PROJECTIONS
    if {"attn_out", "ff_proj", "ff_out"} <= names:
        return LLADA_REMOTE_PROJECTIONS
    raise ValueError(f"model.lora.target_modules: {type(model).__name__} has none of the known projection "
                     f"names; list the modules to adapt")


def add_lora(model: DiffusionLM, settings: LoraConfig, seed: int = 0):
    """Inject LoRA adapters (settings.rank > 0) into model in place; returns peft's PeftModel around it.
    The adapters' random init draws from `seed` alone (the same on every rank and in every run with it)."""
    try:
        import peft
    except ImportError as error:
        raise ValueError("model.lora.rank > 0 needs peft: pip install 'atpo_fast[lora]'") from error
    targets = settings.target_modules or default_target_modules(model)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, bias="none")
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as error:  # peft's "Target modules ... not found in the base model"
        raise ValueError(f"model.lora.target_modules {targets!r}: {error}") from error
    model.lm_head.requires_grad_(False)
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None  # a gradient left by earlier training (the warm start) is never used again
    return wrapped


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def enable_activation_checkpointing(model: DiffusionLM) -> None:
    """Recompute every transformer block's activations during backward (transformers' gradient
    checkpointing, non-reentrant, so it composes with DDP, FSDP2 and frozen weights). Active in
    training mode only, as transformers does it."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.activation_checkpointing: {type(model).__name__} has no transformers backbone that "
                         f"supports it (use the tiny model, or LLaDA / Dream with model.implementation='native')")
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
