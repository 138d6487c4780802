"""atpo-export: a run folder's trained model in a format other tools load.

    atpo-export RUN_DIR OUT            LoRA runs: the adapters in peft's own format (adapter_config.json,
                                       adapter_model.safetensors), for PeftModel.from_pretrained(base, OUT)
    atpo-export RUN_DIR OUT --merge    the full model, adapters merged into the base, in its family's own
                                       layout: load_hf_diffusion_lm(OUT, family) (or TinyDiffusionLM.from_pretrained)

A full fine-tuning run always writes the full model. LLaDA / Dream keep their checkpoint's tensor
names (in safetensors shards of up to 5 GB and their index, huggingface_hub's default) and the base folder's
other files (config.json, the tokenizer and its chat template).

The export runs on the CPU, so a run trained on a GPU machine exports on one without. Config overrides
(section.key=value, after the folders) point at what moved since the run: model.path=/new/base, task.data=...
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from atpo_fast.models import TinyDiffusionLM
from atpo_fast.models.native import NATIVE, checkpoint_tensors

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


# an export multiplies no matrix worth a GPU; where the run trained, and with which kernels, plays no part
ON_CPU = ("device=cpu", "backend=auto", "distributed.backend=auto")


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, overrides: list[str] = ()) -> str:
    """Write the run's last checkpoint to out (see the module docstring); returns what was written.
    overrides: config overrides (section.key=value) over the run's config.yaml, after ON_CPU."""
    from atpo_fast.checkpoint import load_run

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export folder {str(out)!r} exists and is not an empty folder")
    # written beside out and renamed at the end, so that an export that fails (a full disk) leaves nothing to clear
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:  # before the checkpoint loads: a folder that cannot be made fails at once
        tmp.mkdir(parents=True)
    except OSError as error:
        raise ValueError(f"export folder {str(out)!r} cannot be made: {error.strerror}") from None
    try:
        trainer = load_run(run_dir, [*ON_CPU, *overrides])
        if trainer.peft is not None and not merge:
            trainer.peft.save_pretrained(str(tmp))
            written = "adapters"
        else:
            model = trainer.peft.merge_and_unload() if trainer.peft is not None else trainer.model
            write_family_layout(model, trainer.config.model, tmp)
            written = "merged model" if trainer.peft is not None else "model"
        if out.exists():
            out.rmdir()  # empty, as checked
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def write_family_layout(model, model_config, out: Path) -> None:
    """model (a DiffusionLM without adapters) saved as its family stores it."""
    if isinstance(model, TinyDiffusionLM):
        model.save_pretrained(out)
        return
    if model_config.implementation != "native":
        raise ValueError("atpo-export writes LLaDA / Dream weights from model.implementation='native' runs; "
                         "export the adapters (without --merge) instead")
    from huggingface_hub import save_torch_state_dict

    base = Path(model_config.path)
    rename = NATIVE[model_config.kind][1]
    theirs = {rename(name): name for name in checkpoint_tensors(base) if rename(name) is not None}
    state = {theirs[ours]: tensor.detach().contiguous() for ours, tensor in model.state_dict().items()
             if ours in theirs}
    if len(state) != len(theirs):
        raise ValueError(f"the trained model's weights do not match the base checkpoint's in {str(base)!r}")
    out.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():  # config.json, tokenizer, chat template, modeling code: all but the weights
        if file.is_file() and not file.name.endswith(WEIGHT_FILES):
            shutil.copy2(file, out / file.name)
    save_torch_state_dict(state, out)
