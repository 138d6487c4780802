"""Pretrained dLLMs from a local folder, LLaDA and Dream: the loader, and the adapter of the remote
path (the folder's own modeling file through AutoModel; the native path is models/native.py).

Hidden states are taken by running the model with its LM head swapped for an identity, so the
[B, L, V] logits are never computed; the sampler and the trainer apply the head where needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from atpo_fast.choices import IMPLEMENTATIONS
from atpo_fast.io import read_json
from atpo_fast.models.base import DiffusionLM, decode_until_eos, encode_with_chat_template, positions_from_mask


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values that belong to the family
    mask_id: int
    shift: bool  # the model predicts token i+1 at position i
    four_d_mask: bool  # padded batches take a [B, 1, L, L] bool mask plus position ids (Dream's convention)


FAMILIES = {
    "llada": ModelFamily("llada", ("llada",), mask_id=126336, shift=False, four_d_mask=False),
    "dream": ModelFamily("dream", ("Dream", "dream"), mask_id=151666, shift=True, four_d_mask=True),
}


@contextlib.contextmanager
def _head_as_identity(model: nn.Module):
    """Run `model` with its output embedding replaced by nn.Identity (restored afterwards)."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


class HFDiffusionLM(DiffusionLM):
    """A transformers dLLM (AutoModel with trust_remote_code) behind the DiffusionLM interface."""

    def __init__(self, model: nn.Module, family: ModelFamily, tokenizer=None, max_length: int | None = None):
        super().__init__()
        self.model, self.family, self.tokenizer = model, family, tokenizer
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the {family.name} model's output embedding must be an nn.Linear, got "
                             f"{type(head).__name__} (tied input/output embeddings are not supported)")
        if getattr(model.config, "scale_logits", False):
            raise ValueError(f"the {family.name} model scales its logits (config.scale_logits); not supported")
        self.mask_id, self.shift = family.mask_id, family.shift
        self.vocab_size = head.out_features
        config = model.config
        self.max_length = max_length or getattr(config, "max_sequence_length", None) or config.max_position_embeddings
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def encode_prompt(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"the {self.family.name} model was loaded without a tokenizer")
        return encode_with_chat_template(self.tokenizer, text)

    def decode(self, ids: torch.Tensor) -> str:
        return decode_until_eos(self.tokenizer, ids, self.eos_id)

    def _hidden_states(self, input_ids, attention_mask):
        kwargs = {}
        if attention_mask is not None and self.family.four_d_mask:
            real = attention_mask.bool()
            kwargs["attention_mask"] = real[:, None, :, None] & real[:, None, None, :]
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        elif attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        head = self.lm_head
        with _head_as_identity(self.model):
            hidden = self.model(input_ids=input_ids, **kwargs).logits
        if hidden.shape[-1] != head.in_features:
            raise RuntimeError(f"the {self.family.name} model did not return hidden states of size "
                               f"{head.in_features} with its LM head removed; got {tuple(hidden.shape)}")
        return hidden


def load_hf_diffusion_lm(path: str, family: str, *, dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cuda",
                         implementation: str = "native", attn_implementation: str | None = None) -> DiffusionLM:
    """Load a LLaDA or Dream checkpoint from the local folder `path` (no download).

    implementation "native" (the default): transformers' own Llama / Qwen2 stack with bidirectional
    attention, built from config.json and the safetensors shards (models/native.py; no remote code).
    "remote": AutoModel with trust_remote_code, running the modeling file shipped in the folder.
    attn_implementation: transformers' attention kernel (sdpa by default; flash_attention_2 when installed).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is CUDA, and this machine has no CUDA GPU (or torch is a CPU build); use device='cpu'")
    fam = FAMILIES[family]
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model path {str(path)!r} does not exist or is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model path {str(path)!r} holds no config.json: not a transformers checkpoint")
    config = read_json(config_file)
    model_type = config.get("model_type")
    if model_type not in fam.model_types:
        raise ValueError(f"model path {str(path)!r} is not a {family} model: config.json model_type is "
                         f"{model_type!r}, expected one of {list(fam.model_types)}")
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:
            raise ValueError("attn_implementation='flash_attention_2' needs the optional flash-attn package") from err
    if implementation == "native":
        from atpo_fast.models.native import load_native

        return load_native(folder, fam, config, dtype, device, attn_implementation)
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"trust_remote_code": True, "dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(str(folder), **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    return HFDiffusionLM(model, fam, tokenizer)
