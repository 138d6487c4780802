"""The named choices of the public API and the run config, defined once (imported by both)."""

from typing import Literal, get_args

Backend = Literal["auto", "triton", "torch"]  # kernels: Triton on CUDA tensors (auto), or the torch path
Device = Literal["auto", "cpu", "cuda"]
ModelKind = Literal["tiny", "llada", "dream"]
ModelDtype = Literal["float32", "bfloat16"]
Implementation = Literal["native", "remote"]  # how a LLaDA / Dream checkpoint is run (models/hf.py)
Cache = Literal["none", "prefix", "dual"]  # the sampler's block KV cache (models/kv_cache.py)
Remasking = Literal["low_confidence", "margin", "entropy", "random"]
# the built-in selection rules (atpo_fast.selection defines them; register_rule adds more)
RULES = ("uniform", "random", "entropy", "margin", "roec", "hybrid", "surprisal")
Mode = Literal["select", "partition"]
Per = Literal["batch", "trajectory"]
TokenSet = Literal["committed", "masked"]
Strategy = Literal["ddp", "fsdp"]
DistBackend = Literal["auto", "nccl", "gloo"]

BACKENDS = get_args(Backend)
IMPLEMENTATIONS = get_args(Implementation)
REMASKING_RULES = get_args(Remasking)
CACHE_MODES = get_args(Cache)
MODES = get_args(Mode)
PERS = get_args(Per)
TOKEN_SETS = get_args(TokenSet)
STRATEGIES = get_args(Strategy)
DIST_BACKENDS = get_args(DistBackend)
