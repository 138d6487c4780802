"""Model adapters: the DiffusionLM interface, the tiny CPU model, and LLaDA / Dream loaders."""

from atpo_fast.models.base import DiffusionLM
from atpo_fast.models.hf import FAMILIES, HFDiffusionLM, load_hf_diffusion_lm
from atpo_fast.models.tiny import CharTokenizer, TinyConfig, TinyDiffusionLM

__all__ = ["FAMILIES", "CharTokenizer", "DiffusionLM", "HFDiffusionLM", "TinyConfig", "TinyDiffusionLM",
           "load_hf_diffusion_lm"]
