"""atpo-train under torchrun on CPU (gloo, 2 processes) against the same run in one process.

Global batch 4 prompts x 4 responses, two prompts per generate call: the 2-rank runs (DDP and
FSDP2) must select the same steps and reach the same losses and parameters as the 1-rank run (also
with LoRA, and with activation checkpointing on), and a 2-rank checkpoint must resume on 1 rank
exactly as the 1-rank run continues.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atpo_fast import checkpoint
from atpo_fast.distributed import Dist, setup

SETTINGS = ["model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_length: 40}",
            "optim.prompts_per_iter=4", "optim.group_size=4", "optim.micro_batch_rows=5", "optim.lr=1e-3",
            "sampler.prompts_per_call=2", "warmstart.steps=20", "warmstart.batch_size=16", "eval.size=4",
            "eval.pass_k=2", "eval.every=1", "logging.checkpoint_every=1", "device=cpu",
            "task.options={train_size: 300, test_size: 20}"]
EXACT = ("rows", "targets", "selected_step_counts", "reward", "accuracy", "informative_fraction")
CLOSE = ("loss", "grad_norm", "kl", "clip_fraction")


def atpo_train(folder: Path, name: str, ranks: int, *extra: str) -> None:
    script = Path(sys.executable).with_name("atpo-train")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--no-python"]
    args = ["--quiet", "--name", name, *SETTINGS, f"logging.run_dir={folder}", f"warmstart.cache_dir={folder / 'warm'}",
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    done = subprocess.run((launcher if ranks > 1 else []) + [str(script), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def iterations(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "phase" not in m]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in checkpoint.load_run(run).model.state_dict().items()}


def assert_same_run(a: Path, b: Path) -> None:
    x, y = iterations(a), iterations(b)
    assert [m["iteration"] for m in x] == [m["iteration"] for m in y]
    for m, n in zip(x, y):
        for key in EXACT:
            assert m[key] == pytest.approx(n[key], rel=1e-6), (m["iteration"], key)
        for key in CLOSE:
            assert m[key] == pytest.approx(n[key], rel=1e-4, abs=1e-6), (m["iteration"], key)
        assert ("eval" in m) == ("eval" in n) and m.get("eval", {}) == pytest.approx(n.get("eval", {}))
    assert summary(a)["after"] == pytest.approx(summary(b)["after"])
    p, q = parameters(a), parameters(b)
    assert p.keys() == q.keys()
    # Adam turns float-rounding differences of near-zero gradients into steps of up to lr (1e-3) per
    # iteration: every element within 1% of one step per iteration, but for at most one element per
    # tensor (or 0.1% of it), which may move by up to a step (seen: 2.1e-5 after 2 iterations on one CPU)
    for key in p:
        diff = (p[key] - q[key]).abs()
        outliers = int((diff > 1e-5 * len(x)).sum())
        assert outliers <= max(1, diff.numel() // 1000) and diff.max() <= 1e-3 * len(x), (key, outliers, diff.max())


class Runs:
    """Two-iteration runs in one folder, each made once per module and never changed by a test."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, ranks: int, strategy: str, *extra: str, tag: str = "") -> Path:
        name = f"{strategy}-{ranks}{tag}"
        if not (self.folder / name / "summary.json").is_file():
            atpo_train(self.folder, name, ranks, "optim.iterations=2", f"distributed.strategy={strategy}", *extra)
        return self.folder / name

    def copy(self, run: Path, name: str) -> Path:
        shutil.copytree(run, self.folder / name)
        return self.folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one(runs, strategy):
    two = runs.get(2, strategy)
    assert_same_run(runs.get(1, "ddp"), two)
    selected = [sum(m["selected_step_counts"]) for m in iterations(two)]
    assert all(s > 0 for s in selected), "the comparison covers iterations that trained"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_with_activation_checkpointing_on_two_ranks_matches_one(runs, strategy):
    """LoRA adapters (frozen base) train alike under DDP and FSDP2, and activation checkpointing
    (on the 2-rank runs only) changes no gradient."""
    lora = ("model.lora.rank=4", "model.lora.alpha=8")
    one = runs.get(1, "ddp", *lora, tag="-lora")
    two = runs.get(2, strategy, *lora, "model.activation_checkpointing=true", tag="-lora-ac")
    assert_same_run(one, two)
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(two / "checkpoint")).read_metadata().state_dict_metadata
    assert all(".lora_" in key for key in stored if key.startswith("model.")), "the checkpoint holds adapters only"


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    two, one = runs.copy(runs.get(2, "fsdp"), "fsdp-resumed"), runs.copy(runs.get(1, "ddp"), "one-resumed")
    atpo_train(runs.folder, two.name, 1, "optim.iterations=3", "distributed.strategy=fsdp", "--resume")
    atpo_train(runs.folder, one.name, 1, "optim.iterations=3", "--resume")
    assert [m["iteration"] for m in iterations(two)] == [0, 1, 2]
    assert_same_run(one, two)


def test_checkpoint_swap_survives_an_interruption(tmp_path):
    """save_state swaps folders; a crash between its two renames leaves only checkpoint.old, which
    load_state must find. A missing checkpoint is a clear error."""
    one = Dist()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = tmp_path / "checkpoint"
    checkpoint.save_state(path, model, optimizer, {"iteration": 1}, one)  # before any step: no optimizer state
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    checkpoint.save_state(path, model, optimizer, {"iteration": 2}, one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    path.rename(tmp_path / "checkpoint.old")  # the state between "old <- current" and "current <- tmp"

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    extra = checkpoint.load_state(path, fresh, fresh_optimizer, {"iteration": 0}, one)
    assert extra == {"iteration": 2}
    assert torch.equal(fresh.weight, model.weight)
    assert int(fresh_optimizer.state_dict()["state"][0]["step"]) == 1, "one real step, not a DCP warm-up step more"
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load_state(tmp_path / "missing", fresh, fresh_optimizer, {"iteration": 0}, one)


def test_backend_auto_follows_the_run_device(monkeypatch):
    """On a one-GPU machine, a CPU run under torchrun joins with gloo and claims no GPU; a CUDA run with
    more ranks than GPUs is refused by name instead of failing inside CUDA."""
    joined, claimed = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", claimed.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", joined.append)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert setup("auto", "cpu") == Dist(1, 2, 1)
    assert joined == ["gloo"] and claimed == []
    for device in ("auto", "cuda"):
        with pytest.raises(ValueError, match="'nccl' needs a GPU per rank on this machine: local rank 1, 1 GPU"):
            setup("auto", device)
    assert joined == ["gloo"] and claimed == []
