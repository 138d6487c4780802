"""LLaDA and Dream checkpoints on transformers' own Llama / Qwen2 stacks, bidirectional, no remote code.

LLaDA-8B is a Llama block stack (RMSNorm, half-split RoPE, SwiGLU, no biases); Dream-7B is Qwen2
(q/k/v biases) whose position i predicts token i + 1. Both attend bidirectionally. The folder's
config.json is translated into a LlamaConfig / Qwen2Config; a field the translation does not
implement is refused by name. The weights are read tensor by tensor from the safetensors shards
(memory-mapped, through model.safetensors.index.json when there is one), cast straight to the
target dtype on the target device, and assigned into a model built on the meta device, so no
full-precision copy of the model ever exists.

Left padding: positions count from each row's first real token and padded keys are masked, so a
padded prompt predicts what it predicts alone (LLaDA's own file numbers positions from the left
edge instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from atpo_fast.io import open_safetensors, read_json
from atpo_fast.models.base import (DiffusionLM, bidirectional, bidirectional_hidden_states, decode_until_eos,
                                   encode_with_chat_template)

# LLaDA config.json fields and the value the native path implements (anything else is refused)
LLADA_FIXED = {"weight_tying": False, "include_bias": False, "include_qkv_bias": False, "alibi": False,
               "rope": True, "scale_logits": False, "block_type": "llama", "activation_type": "silu",
               "layer_norm_type": "rms", "attention_layer_norm": False, "input_emb_norm": False}
DREAM_FIXED = {"tie_word_embeddings": False, "use_sliding_window": False, "rope_scaling": None}


def _refuse_unsupported(config: dict, fixed: dict, family: str) -> None:
    for field, supported in fixed.items():
        value = config.get(field, supported)
        if value != supported:
            raise ValueError(f"the native {family} loader does not implement config.json {field}={value!r} "
                             f"(it implements {supported!r}); load it with implementation='remote'")


def _require(config: dict, fields: tuple[str, ...], family: str) -> None:
    missing = [f for f in fields if config.get(f) is None]
    if missing:
        raise ValueError(f"{family} config.json lacks {missing}")


def llada_backbone_config(config: dict):
    """transformers' LlamaConfig for a LLaDA config.json."""
    from transformers import LlamaConfig

    _refuse_unsupported(config, LLADA_FIXED, "llada")
    _require(config, ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size"), "llada")
    return LlamaConfig(
        vocab_size=config.get("embedding_size") or config["vocab_size"], hidden_size=config["d_model"],
        num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
        num_key_value_heads=config.get("n_kv_heads") or config["n_heads"], intermediate_size=config["mlp_hidden_size"],
        max_position_embeddings=config.get("max_sequence_length", 4096), rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", 10000.0), attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        pad_token_id=config.get("pad_token_id"), eos_token_id=config.get("eos_token_id"))


def dream_backbone_config(config: dict):
    """transformers' Qwen2Config for a Dream config.json (Dream's fields are Qwen2's)."""
    from transformers import Qwen2Config

    _refuse_unsupported(config, DREAM_FIXED, "dream")
    _require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
             "dream")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "pad_token_id",
              "eos_token_id")
    return Qwen2Config(**{f: config[f] for f in fields if config.get(f) is not None}, tie_word_embeddings=False,
                       use_sliding_window=False)


_LLADA_BLOCK = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


def llada_name(name: str) -> str | None:
    """Our name ("backbone.*" or "head.*") of a LLaDA checkpoint tensor; None if it is not one of ours."""
    parts = name.split(".")
    if parts[:2] != ["model", "transformer"]:
        return None
    rest = parts[2:]
    if rest[0] == "wte":
        return "backbone.embed_tokens." + ".".join(rest[1:])
    if rest[0] == "ln_f":
        return "backbone.norm." + ".".join(rest[1:])
    if rest[0] == "ff_out":
        return "head." + ".".join(rest[1:])
    if rest[0] == "blocks" and len(rest) >= 4 and rest[2] in _LLADA_BLOCK:
        return f"backbone.layers.{rest[1]}.{_LLADA_BLOCK[rest[2]]}." + ".".join(rest[3:])
    return None


def dream_name(name: str) -> str | None:
    if name.startswith("model."):
        return "backbone." + name[len("model."):]
    if name.startswith("lm_head."):
        return "head." + name[len("lm_head."):]
    return None


NATIVE = {  # family -> (backbone config from config.json, checkpoint name -> ours, backbone class name)
    "llada": (llada_backbone_config, llada_name, "LlamaModel"),
    "dream": (dream_backbone_config, dream_name, "Qwen2Model"),
}


class NativeDiffusionLM(DiffusionLM):
    """A transformers Llama / Qwen2 stack with bidirectional attention, a separate LM head and the
    checkpoint folder's tokenizer, behind the DiffusionLM interface."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, family, tokenizer, max_length: int):
        super().__init__()
        self.backbone, self.head, self.family, self.tokenizer = bidirectional(backbone), head, family, tokenizer
        self.mask_id, self.shift = family.mask_id, family.shift
        self.vocab_size, self.max_length = head.out_features, max_length
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    @property
    def lm_head(self) -> nn.Linear:
        return self.head

    def encode_prompt(self, text: str) -> list[int]:
        return encode_with_chat_template(self.tokenizer, text)

    def decode(self, ids: torch.Tensor) -> str:
        return decode_until_eos(self.tokenizer, ids, self.eos_id)

    def _hidden_states(self, input_ids, attention_mask):
        return bidirectional_hidden_states(self.backbone, input_ids, attention_mask)


def checkpoint_tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (through the index when the folder is sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} holds no weight_map")
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise ValueError(f"model path {str(folder)!r} lacks {', '.join(missing)}, named by {index.name}")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"model path {str(folder)!r} holds neither model.safetensors.index.json nor "
                         f"model.safetensors")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _read_weights(files: dict[str, Path], rename: Callable[[str], str | None], dtype: torch.dtype,
                  device: str) -> dict[str, torch.Tensor]:
    """Our state dict, one tensor at a time from memory-mapped shards, each cast to dtype on device."""
    state = {}
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:
            for name in f.keys():
                ours = rename(name)
                if ours is not None and files.get(name) == file:
                    state[ours] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state


def _tokenizer(folder: Path):
    """The folder's tokenizer and chat template, without its remote code (Dream names a tokenizer class
    of its own; its vocabulary is Qwen2's byte-level BPE)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2TokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def load_native(folder: Path, family, config: dict, dtype: torch.dtype, device: str,
                attn_implementation: str | None) -> NativeDiffusionLM:
    """The checkpoint in `folder` as a NativeDiffusionLM (see the module docstring)."""
    import transformers

    backbone_config, rename, backbone_class = NATIVE[family.name]
    hf_config = backbone_config(config)
    hf_config._attn_implementation = attn_implementation or "sdpa"
    with torch.device("meta"):
        backbone = getattr(transformers, backbone_class)(hf_config)
        head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
    model = NativeDiffusionLM(backbone, head, family, _tokenizer(folder), hf_config.max_position_embeddings)
    state = _read_weights(checkpoint_tensors(folder), rename, dtype, device)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the {family.name} checkpoint in {str(folder)!r} does not match its config.json: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (the rotary frequencies) were made on the meta device: make them again
    with torch.device(device):
        backbone.rotary_emb = type(backbone.rotary_emb)(config=hf_config)
    return model.to(device)
