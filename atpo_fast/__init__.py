"""atpo_fast: fast ATPO (adaptive trajectory policy optimisation) for masked-diffusion LLMs.

The public names below are imported on first use, so that `import atpo_fast.config` (what the CLI
needs to check a run config) does not pay for torch, Triton and transformers.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "StepRows": "atpo_fast.ops", "StepStats": "atpo_fast.ops", "TokenStats": "atpo_fast.ops",
    "build_step_rows": "atpo_fast.ops", "fused_linear_logprobs": "atpo_fast.ops", "selected_logprobs": "atpo_fast.ops",
    "step_stats": "atpo_fast.ops", "token_stats": "atpo_fast.ops",
    "Rollout": "atpo_fast.trace", "Trace": "atpo_fast.trace", "generate": "atpo_fast.sampler",
    "register_rule": "atpo_fast.selection", "select_steps": "atpo_fast.selection",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'atpo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
