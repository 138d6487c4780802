"""TinyDiffusionLM: a small bidirectional transformer (transformers' Llama, causal mask off) with a
character-level tokenizer of the project's own. The CPU default: any size from a TinyConfig."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from atpo_fast.config import DEFAULT_CHARS, TinyConfig
from atpo_fast.io import atomic_write, open_safetensors, read_json
from atpo_fast.models.base import DiffusionLM, bidirectional, bidirectional_hidden_states

SPECIAL_TOKENS = ("<pad>", "<mask>", "<eos>", "<bos>")
MODEL_TYPE = "atpo_tiny_dlm"


class CharTokenizer:
    """One token per character, after four special tokens: pad 0, mask 1, eos 2, bos 3."""

    pad_id, mask_id, eos_id, bos_id = range(len(SPECIAL_TOKENS))

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self._ids = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.vocab_size = len(SPECIAL_TOKENS) + len(chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise ValueError(f"text holds characters outside the tokenizer's alphabet: {unknown!r}")
        return [self._ids[c] for c in text]

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        """Text of the ids; special tokens are dropped, and everything after the first eos too."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eos_id and stop_at_eos:
                break
            if len(SPECIAL_TOKENS) <= i < self.vocab_size:  # ids beyond the alphabet are dropped
                out.append(self.chars[i - len(SPECIAL_TOKENS)])
        return "".join(out)


class TinyDiffusionLM(DiffusionLM):
    """Llama blocks with bidirectional attention, a separate LM head, and a CharTokenizer.

    Left-padded prompts are handled with a padding mask and positions counted from the first real
    token, so a padded prompt predicts exactly what the same prompt alone predicts.
    """

    def __init__(self, config: TinyConfig | None = None):
        super().__init__()
        self.config = config = config or TinyConfig()
        if config.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager' for the tiny model, "
                             f"got {config.attn_implementation!r}")
        self.tokenizer = CharTokenizer(config.chars)
        self.vocab_size = max(self.tokenizer.vocab_size, config.vocab_size or 0)
        self.mask_id, self.eos_id, self.pad_id = self.tokenizer.mask_id, self.tokenizer.eos_id, self.tokenizer.pad_id
        self.max_length = config.max_length
        llama = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_length,
            pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_id, eos_token_id=self.eos_id,
            tie_word_embeddings=False,
        )
        llama._attn_implementation = config.attn_implementation
        self.backbone = bidirectional(LlamaModel(llama))
        self.head = nn.Linear(config.hidden_size, self.vocab_size, bias=False)

    @property
    def lm_head(self) -> nn.Linear:
        return self.head

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids)

    def _hidden_states(self, input_ids, attention_mask):
        return bidirectional_hidden_states(self.backbone, input_ids, attention_mask)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors into the folder `path`, each atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)}
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TinyDiffusionLM":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"path {str(path)!r} holds no config.json: not a saved TinyDiffusionLM")
        config = read_json(config_file)
        if config.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"path {str(path)!r} is not a TinyDiffusionLM (model_type is not {MODEL_TYPE!r})")
        try:
            tiny = TinyConfig(**config)
        except TypeError as err:  # a field this version does not have
            raise ValueError(f"{config_file} does not describe a TinyDiffusionLM: {err}") from None
        model = cls(tiny)
        with open_safetensors(path / "model.safetensors") as f:
            model.load_state_dict({name: f.get_tensor(name) for name in f.keys()})
        return model.to(device)

