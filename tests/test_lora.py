"""LoRA (peft), activation checkpointing, the single-pass update and atpo-export, on CPU."""

import copy
import importlib
from unittest import mock
from pathlib import Path

import peft
import pytest
import torch

from atpo_fast import checkpoint
from atpo_fast.cli import export_main
from atpo_fast.config import LoraConfig, ModelConfig, load_config
from atpo_fast.export import write_family_layout
from atpo_fast.models import TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.models.lora import add_lora, enable_activation_checkpointing
from atpo_fast.models.synthetic import write_checkpoint
from atpo_fast.run import train
from atpo_fast.trainer import Trainer, build_task
from atpo_fast.warmstart import warm_start
from test_native import batch
from test_trainer import SMALL, assert_resume_equals_uninterrupted_run, small_config

fused_module = importlib.import_module("atpo_fast.ops.fused_linear_logprobs")

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


def warm_model(config) -> TinyDiffusionLM:
    model = TinyDiffusionLM(config.model.tiny)
    warm_start(model, build_task(config), config, torch.device("cpu"), progress=False)
    return model


def trained_iteration(trainer: Trainer):
    """collect and select until an iteration has rows to train (ties in every group carry none)."""
    for attempt in range(5):
        seed = 1000 + attempt
        selected = trainer.select(trainer.collect(seed), seed)
        if selected.total_rows:
            return selected
    raise AssertionError("five iterations without an informative group")


def random_rows(model, gen, rows=6, length=20):
    ids = torch.randint(4, model.vocab_size, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batch_index = torch.arange(rows).repeat_interleave(3)
    positions = torch.randint(5, length, (rows * 3,), generator=gen)
    targets = torch.randint(4, model.vocab_size, (rows * 3,), generator=gen)
    return ids, mask, batch_index, positions, targets


# ----------------------------------------------------------------------------- the single-pass update


@pytest.mark.parametrize("lora", [False, True])
def test_single_pass_update_equals_the_two_pass_path(tmp_path, lora):
    """updates_per_batch = 1: the old log-probs are the update forward's own, detached; loss, gradient,
    metrics and the parameters after the step equal those of a separate no-grad pass."""
    config = small_config(tmp_path, *(LORA if lora else []))
    base = warm_model(config)
    one, two = Trainer(config, copy.deepcopy(base)), Trainer(config, copy.deepcopy(base))
    for name, p in one.model.named_parameters():
        if "lora_B" in name:  # the adapters start at B = 0: give them a value so that the check covers them
            p.data.normal_(0, 0.05)
    two.model.load_state_dict(one.model.state_dict())
    two.single_pass_update = False
    selected = trained_iteration(one)
    a, b = one.update(selected), two.update(selected)
    for field in ("loss", "clip_weighted", "kl_weighted", "grad_norm", "gap_sum", "gap_count"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6, abs=1e-9), field
    assert a.skipped is None and b.skipped is None
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_the_adapters_only_and_the_head_gets_no_weight_gradient(tmp_path, monkeypatch):
    config = small_config(tmp_path, *LORA)
    trainer = Trainer(config, warm_model(config))
    model = trainer.model
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in adapters)
    assert not model.lm_head.weight.requires_grad
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in adapters}

    calls = []

    def spy(name):
        real = getattr(fused_module, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("_forward_frozen_head", "_backward"):
        monkeypatch.setattr(fused_module, name, spy(name))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    updated = trainer.update(trained_iteration(trainer))
    # the frozen LM head computes no weight gradient: its route, whose backward recomputes nothing
    assert updated.skipped is None and "_forward_frozen_head" in calls and "_backward" not in calls, calls
    assert all(p.grad is None for p in model.parameters()), "no gradient outlives the optimizer step"
    for name, p in model.named_parameters():
        assert name in adapters or torch.equal(p, before[name]), f"frozen {name} moved"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_resume_equals_uninterrupted_run_and_checkpoints_hold_the_adapters_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    run = assert_resume_equals_uninterrupted_run(tmp_path, *LORA)
    stored = dcp.FileSystemReader(str(run / "checkpoint")).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]
    assert (run / checkpoint.BASE / "model.safetensors").is_file()
    trainer = checkpoint.load_run(run)
    assert trainer.iteration == 4 and trainer.peft is not None


def test_export_writes_peft_adapters_and_a_merged_tiny_model(tmp_path, gen):
    summary = train(small_config(tmp_path, *LORA, "optim.iterations=2", "logging.name=lora"), progress=False)
    run = Path(summary["run_dir"])
    trained = checkpoint.load_run(run).model.eval().cpu()  # beside the CPU models below, on a GPU machine too
    ids, mask, *_ = random_rows(trained, gen, length=12)
    with torch.no_grad():
        want = trained.logits(ids, mask)
        base_logits = TinyDiffusionLM.from_pretrained(run / checkpoint.BASE).eval().logits(ids, mask)
    assert (want - base_logits).abs().max() > 1e-4, "the adapters trained"

    assert export_main([str(run), str(tmp_path / "adapters")]) == 0
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    base = TinyDiffusionLM.from_pretrained(run / checkpoint.BASE)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).base_model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids, mask), want, rtol=0, atol=1e-6)

    assert export_main([str(run), str(tmp_path / "merged"), "--merge"]) == 0
    merged = TinyDiffusionLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.logits(ids, mask), want, rtol=0, atol=1e-5)
    assert export_main([str(run), str(tmp_path / "merged")]) == 2, "a non-empty folder is refused"
    # the export runs on the CPU: a run trained on a GPU machine (device cuda, Triton kernels) exports on one
    # without; it was refused by the config check of the run's device
    saved = run / "config.yaml"
    text = saved.read_text()
    saved.write_text(text.replace("\ndevice: auto\n", "\ndevice: cuda\n").replace("\nbackend: auto\n", "\nbackend: triton\n"))
    assert "device: cuda" in saved.read_text() and "backend: triton" in saved.read_text()
    assert export_main([str(run), str(tmp_path / "from_gpu"), "--merge", "eval.size=3"]) == 0
    from_gpu = TinyDiffusionLM.from_pretrained(tmp_path / "from_gpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_gpu.logits(ids, mask), want, rtol=0, atol=1e-5)
    # overrides after the folders reach the run's config (a base folder that moved: model.path=...)
    assert export_main([str(run), str(tmp_path / "bad_override"), "optim.lr=0"]) == 2
    saved.write_text(text)
    assert export_main([str(run), str(tmp_path / "merged" / "config.json")]) == 2, "so is a file"
    assert export_main([str(run), str(tmp_path / "merged" / "config.json" / "out")]) == 2, "and a path under one"
    # an export that fails midway (a full disk) leaves nothing behind that would make the next try refuse the folder
    (tmp_path / "empty").mkdir()
    save = TinyDiffusionLM.save_pretrained

    def disk_full(model, path):
        save(model, path)
        raise OSError(28, "No space left on device")

    with mock.patch.object(TinyDiffusionLM, "save_pretrained", disk_full):
        for out in ("empty", "new"):
            assert export_main([str(run), str(tmp_path / out), "--merge"]) == 1
    assert not list((tmp_path / "empty").iterdir()) and not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".*tmp*")), "no partial export left beside them"
    assert export_main([str(run), str(tmp_path / "empty"), "--merge"]) == 0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_merged_export_in_the_family_layout_loads_back(tmp_path, gen, family):
    write_checkpoint(tmp_path / "base", family, gen)
    model = load_hf_diffusion_lm(str(tmp_path / "base"), family, dtype=torch.float32, device="cpu")
    wrapped = add_lora(model, LoraConfig(rank=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    ids, mask = batch(gen)
    with torch.no_grad():
        want = model.logits(ids, mask)
    wrapped.save_pretrained(str(tmp_path / "adapters"))
    fresh = load_hf_diffusion_lm(str(tmp_path / "base"), family, dtype=torch.float32, device="cpu")
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapters")).base_model.model.eval()
    write_family_layout(wrapped.merge_and_unload(), ModelConfig(kind=family, path=str(tmp_path / "base")),
                        tmp_path / "merged")
    merged = load_hf_diffusion_lm(str(tmp_path / "merged"), family, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids, mask), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged.logits(ids, mask), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "config.json").is_file()


def test_lora_config_errors_name_the_key(tmp_path):
    for override, key in (("model.lora.rank=-1", "model.lora.rank"), ("model.lora.dropout=1", "model.lora.dropout"),
                          ("model.lora.alpha=0", "model.lora.alpha"),
                          ("model.lora.target_modules=3", "model.lora.target_modules")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            small_config(tmp_path, override)
    config = small_config(tmp_path, "model.lora.rank=2", "model.lora.target_modules=q_proj, v_proj")
    assert config.model.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        Trainer(small_config(tmp_path, "model.lora.rank=2", "model.lora.target_modules=[nothing_like_this]"))


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_equal_gradients(gen, lora):
    config = load_config(None, SMALL).model.tiny
    plain = TinyDiffusionLM(config)
    if lora:
        add_lora(plain, LoraConfig(rank=4, alpha=8))
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05, generator=gen)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    rows = random_rows(plain, gen)
    grads, mlp_calls = [], []
    for model in (plain, checkpointed):
        calls, mlp = [], model.backbone.layers[0].mlp
        mlp.forward = lambda *args, _forward=mlp.forward, **kwargs: calls.append(1) or _forward(*args, **kwargs)
        model.train()
        model(*rows).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        mlp_calls.append(len(calls))
    assert mlp_calls == [1, 2], "checkpointing recomputes each block once in backward"
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_warm_start_cache_ignores_how_the_rl_phase_trains(tmp_path):
    from atpo_fast.warmstart import cache_folder

    plain = small_config(tmp_path)
    assert cache_folder(plain) == cache_folder(small_config(tmp_path, *LORA, "model.activation_checkpointing=true"))
    assert cache_folder(plain) != cache_folder(small_config(tmp_path, "warmstart.steps=21"))


def test_default_targets_of_llada_remote_names_leave_its_lm_head_alone():
    """LLaDA's own modeling file names the MLP down projection and the LM head both ff_out: the default
    targets adapt the blocks' projections only."""
    from torch import nn

    from atpo_fast.models.lora import LLADA_REMOTE_PROJECTIONS, default_target_modules

    names = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    block = nn.Module()
    for name in names:
        setattr(block, name, nn.Linear(8, 8, bias=False))
    transformer = nn.Module()
    transformer.blocks, transformer.ff_out = nn.ModuleList([block]), nn.Linear(8, 16, bias=False)
    model = nn.Module()
    model.model = nn.Module()
    model.model.transformer = transformer
    assert default_target_modules(model) == LLADA_REMOTE_PROJECTIONS
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=LLADA_REMOTE_PROJECTIONS))
    adapted = sorted(n.rsplit(".", 3)[0] for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight"))
    assert adapted == sorted(f"model.transformer.blocks.0.{name}" for name in names)
