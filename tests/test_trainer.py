"""The trainer on CPU with a very small tiny model: one iteration, resume, NaN handling, the console scripts."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch

import atpo_fast.trainer as trainer_module
from atpo_fast import checkpoint
from atpo_fast.cli import eval_main, export_main, train_main
from atpo_fast.config import load_config
from atpo_fast.models import TinyDiffusionLM
from atpo_fast.models.synthetic import write_checkpoint
from atpo_fast.run import train
from atpo_fast.tasks import get_task
from atpo_fast.trainer import Trainer, build_model, build_task
from atpo_fast.warmstart import cache_folder, warm_start

SMALL = ["model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_length: 40}",
         "optim.prompts_per_iter=4", "optim.group_size=4", "optim.micro_batch_rows=5",
         "optim.lr=1e-3", "warmstart.steps=20", "warmstart.batch_size=16", "eval.size=8", "eval.pass_k=2",
         "eval.every=2", "logging.checkpoint_every=2", "task.options={train_size: 300, test_size: 20}"]

ITERATION_KEYS = {"iteration", "reward", "accuracy", "informative_fraction", "rollout_time", "tokens_per_second",
                  "rows", "targets", "loss", "kl", "clip_fraction", "grad_norm", "lr", "update_time", "peak_memory_mb",
                  "step_entropy", "step_uncertainty", "step_roec", "step_surprisal", "step_hybrid_score",
                  "selected_step_counts",
                  "rollout_logprob_gap"}
DETERMINISTIC = ("reward", "accuracy", "rows", "targets", "loss", "grad_norm", "selected_step_counts", "step_entropy")


def small_config(tmp_path, *extra):
    paths = [f"logging.run_dir={tmp_path / 'runs'}", f"warmstart.cache_dir={tmp_path / 'cache'}"]
    return load_config(None, SMALL + paths + list(extra))


def test_one_iteration_changes_parameters_and_logs_every_metric(tmp_path):
    trainer = Trainer(small_config(tmp_path))
    # the warm-started model answers with digits: rewards spread
    warm_start(trainer.model, trainer.task, trainer.config, trainer.device, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = {}
    for _ in range(3):  # an iteration whose groups all tie carries no signal; three make that vanishingly rare
        metrics = trainer.train_iteration()
        trainer.iteration += 1
        if "skipped" not in metrics:
            break
    assert "skipped" not in metrics, metrics.get("skipped")
    assert ITERATION_KEYS <= set(metrics), ITERATION_KEYS - set(metrics)
    assert metrics["rows"] > 5 and metrics["targets"] >= metrics["rows"]  # several micro-batches of 5 rows
    assert all(isinstance(metrics[k], float) and metrics[k] == metrics[k] for k in ("loss", "grad_norm", "kl"))
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the update changed no parameter"
    assert sum(metrics["selected_step_counts"]) == 4 * 16 * metrics["informative_fraction"]  # budget 4 per response
    # rows that train several steps' tokens from their interval's first state differ from the rollout
    assert 0 <= metrics["rollout_logprob_gap"] < 0.1, metrics["rollout_logprob_gap"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_resume_equals_uninterrupted_run(tmp_path, *extra: str) -> Path:
    """4 iterations in one go against 2 + 2 resumed, with the config overrides `extra`: the same
    metrics after the resume and the same final evaluation. Returns the resumed run's folder."""
    whole = train(small_config(tmp_path, *extra, "optim.iterations=4", "logging.name=whole"), progress=False)
    train(small_config(tmp_path, *extra, "optim.iterations=2", "logging.name=split"), progress=False)
    resumed = train(small_config(tmp_path, *extra, "optim.iterations=4", "logging.name=split"), resume=True,
                    progress=False)
    a, b = (read(Path(s["run_dir"]) / "metrics.jsonl") for s in (whole, resumed))
    iterations = lambda rows: [m for m in rows if "phase" not in m]  # noqa: E731
    assert [m["iteration"] for m in iterations(b)] == [0, 1, 2, 3]
    for x, y in zip(iterations(a)[2:], iterations(b)[2:]):
        for key in DETERMINISTIC:
            assert x.get(key) == y.get(key), (x["iteration"], key)
        assert x.get("eval") == y.get("eval")
    assert whole["after"] == resumed["after"]
    return Path(resumed["run_dir"])


def test_resume_equals_uninterrupted_run(tmp_path):
    run = assert_resume_equals_uninterrupted_run(tmp_path)
    for name in ("metrics.jsonl", "config.yaml", "summary.json", "training.png", "confusion_zones.png",
                 "selected_steps.png", "checkpoint/.metadata"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*tmp*")) and not list(run.glob("*.old")), "no temporary files left behind"
    assert read(run / "metrics.jsonl")[0]["warm_start"]["cached"], "the second run reused the cached warm start"


def test_nan_loss_skips_updates_and_stops(tmp_path, monkeypatch):
    real_loss = trainer_module.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats

    config = small_config(tmp_path, "optim.iterations=10", "logging.max_bad_iters=2", "logging.name=nan")
    monkeypatch.setattr(trainer_module, "clipped_policy_loss", nan_loss)
    summary = train(config, progress=False)
    assert summary["stopped"] and summary["iterations"] < 10
    rows = [m for m in read(Path(summary["run_dir"]) / "metrics.jsonl") if "phase" not in m]
    assert all(m["skipped"].startswith("non-finite") for m in rows if m["rows"] > 0)
    trainer = checkpoint.load_run(summary["run_dir"])
    assert trainer.iteration == 0, "the last good checkpoint (before the bad iterations) is kept"


def test_console_scripts(tmp_path, capsys):
    args = SMALL + [f"logging.run_dir={tmp_path}", f"warmstart.cache_dir={tmp_path / 'cache'}", "optim.iterations=1"]
    # overrides on either side of the options (argparse refused those after an option as unrecognized)
    assert train_main([*args[:2], "--quiet", *args[2:4], "--name", "cli", *args[4:]]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy): before" in out and "pass@2" in out
    assert eval_main([str(tmp_path / "cli"), "--size", "4", "eval.pass_k=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iteration"] == 1 and 0 <= result["accuracy"] <= 1
    with pytest.raises(SystemExit):  # argparse's exit 2, naming the option
        eval_main([str(tmp_path / "cli"), "--size", "0"])
    assert "argument --size: expects an int >= 1, got '0'" in capsys.readouterr().err
    loaded = checkpoint.load_run(tmp_path / "cli")
    with pytest.raises(ValueError, match="size must be a positive int or None"):
        loaded.evaluate(0)
    # evaluation and export leave the optimizer's moments on disk (twice the weights' memory); a resume loads them
    assert not loaded.optimizer.state
    checkpoint.load(loaded, tmp_path / "cli" / "checkpoint")
    moments = [state["exp_avg"] for state in loaded.optimizer.state.values()]
    assert moments and any(bool(m.abs().sum() > 0) for m in moments)
    assert train_main(["--quiet", "--name", "cli", *args]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_main(["optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "missing")]) == 2


def test_resume_starts_from_the_runs_config_and_refuses_changes_to_it(tmp_path, capsys):
    """A resumed run that silently took other settings (the CLI's defaults where the first call had overrides)
    would train something else under the run's name; a changed model shape failed inside the checkpoint load."""
    args = [*SMALL, f"logging.run_dir={tmp_path}", f"warmstart.cache_dir={tmp_path / 'cache'}"]
    assert train_main(["--quiet", "--name", "r", *args, "selection.rule=uniform", "optim.iterations=1"]) == 0
    resume = ["--quiet", "--name", "r", "--resume", *args]
    assert train_main([*resume, "model.tiny.hidden_size=64", "optim.iterations=2"]) == 2
    err = capsys.readouterr().err
    assert "a resumed run keeps its config" in err and "model.tiny.hidden_size (32 in the run, 64 here)" in err
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.model.tiny.hidden_size == 32, "the refused resume left the run's config alone"
    # without --config the run's own config is the base: selection.rule stays uniform, iterations may grow
    assert train_main([*resume, "optim.iterations=2"]) == 0
    resumed = load_config(tmp_path / "r" / "config.yaml")
    assert resumed.selection.rule == "uniform" and resumed.optim.iterations == 2
    assert [m["iteration"] for m in read(tmp_path / "r" / "metrics.jsonl") if "phase" not in m] == [0, 1]
    with pytest.raises(ValueError, match=r"selection.rule \('uniform' in the run, 'hybrid' here\)"):
        train(load_config(None, SMALL + [f"logging.run_dir={tmp_path}", "logging.name=r", "optim.iterations=3"]),
              resume=True, progress=False)


def test_a_metrics_line_cut_by_a_kill_does_not_stop_the_resume(tmp_path):
    """A process killed (or a disk filled) while appending a record leaves half a line without its newline."""
    train(small_config(tmp_path, "optim.iterations=1", "logging.name=r"), progress=False)
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"iteration": 1, "reward": 0.5')
    train(small_config(tmp_path, "optim.iterations=2", "logging.name=r"), resume=True, progress=False)
    assert [m["iteration"] for m in read(metrics) if "phase" not in m] == [0, 1]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["{torn"] + lines[1:]) + "\n")  # not the last line: not a cut write
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        train(small_config(tmp_path, "optim.iterations=3", "logging.name=r"), resume=True, progress=False)


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import atpo_fast.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", interrupted)
    assert train_main(["--quiet", "--name", "x", *SMALL, f"logging.run_dir={tmp_path}"]) == 130
    assert f"`atpo-train --resume --name x logging.run_dir={tmp_path}` continues" in capsys.readouterr().err


def test_a_full_disk_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """An OSError mid-run (here a full disk) is the environment's, not a bug: one line, and the way back."""
    import atpo_fast.run as run_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "train", disk_full)
    assert train_main(["--quiet", "--name", "x", *SMALL, f"logging.run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "atpo-train: error: [Errno 28] No space left on device" in err
    assert f"`atpo-train --resume --name x logging.run_dir={tmp_path}` continues" in err
    from atpo_fast import export

    monkeypatch.setattr(export, "export_run", disk_full)
    monkeypatch.setattr(checkpoint, "load_run", disk_full)
    assert export_main([str(tmp_path / "x"), str(tmp_path / "out")]) == 1
    assert eval_main([str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "atpo-export: error: [Errno 28]" in err and "atpo-eval: error: [Errno 28]" in err


def test_a_checkpoint_write_that_fails_keeps_the_last_one(tmp_path, monkeypatch):
    """A full disk made DCP raise a RuntimeError (torch's "unexpected pos", with its C++ stack) and left a partial
    checkpoint.tmp; now an OSError with the first line of the cause and the space, the partial write removed."""
    import torch.distributed.checkpoint as dcp

    train(small_config(tmp_path, "optim.iterations=1", "logging.name=r"), progress=False)
    trainer = checkpoint.load_run(tmp_path / "runs" / "r")
    kept = tmp_path / "runs" / "r" / "checkpoint"
    before = sorted((p.name, p.stat().st_size) for p in kept.iterdir())

    def disk_full(state, checkpoint_id):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nframe #0: c10::")

    monkeypatch.setattr(dcp, "save", disk_full)
    with pytest.raises(OSError, match=r"checkpoint.tmp failed \(\[enforce fail .*unexpected pos 704 vs 598; \d+ MiB "
                                      r"free there\): the last complete one, .*checkpoint \(\d+ MiB; a save needs"):
        checkpoint.save(trainer, kept)
    assert sorted((p.name, p.stat().st_size) for p in kept.iterdir()) == before
    assert not (tmp_path / "runs" / "r" / "checkpoint.tmp").exists()


def test_a_warm_start_that_cannot_be_cached_still_runs(tmp_path, capsys, monkeypatch):
    """The cache only saves the next run's time: a full disk (or a cache_dir this process cannot write) there
    was an OSError traceback after the warm start's work, and left a partial .tmp folder in the cache."""
    config = small_config(tmp_path)
    trainer = Trainer(config)
    save = TinyDiffusionLM.save_pretrained

    def disk_full(model, path):
        save(model, path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TinyDiffusionLM, "save_pretrained", disk_full)
    info = warm_start(trainer.model, trainer.task, config, trainer.device, progress=False)
    assert info["cached"] is None and info["steps"] == config.warmstart.steps
    assert "warm start: not cached ([Errno 28] No space left on device)" in capsys.readouterr().out
    assert not list((tmp_path / "cache").iterdir()), "nothing left in the cache folder"


def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path):
    """A run folder copied in part: DCP raised RuntimeError (a file cut short), AssertionError (a broken
    .metadata) or FileNotFoundError, each a traceback from atpo-eval, atpo-export and a resume."""
    train(small_config(tmp_path, "optim.iterations=1", "logging.name=r"), progress=False)
    kept = tmp_path / "runs" / "r" / "checkpoint"
    (weights,) = kept.glob("*.distcp")
    whole, metadata = weights.read_bytes(), (kept / ".metadata").read_bytes()
    for damage in ("cut short", "broken metadata", "missing"):
        if damage == "cut short":
            weights.write_bytes(whole[:1000])
        elif damage == "broken metadata":
            (kept / ".metadata").write_bytes(b"x")
        else:
            weights.unlink()
        with pytest.raises(ValueError, match=r"the checkpoint .*checkpoint cannot be loaded \(.+\): a damaged"):
            checkpoint.load_run(tmp_path / "runs" / "r")
        weights.write_bytes(whole)
        (kept / ".metadata").write_bytes(metadata)
    assert checkpoint.load_run(tmp_path / "runs" / "r").iteration == 1


@pytest.mark.parametrize("damage", ["truncated weights", "broken config.json"])
def test_a_damaged_warm_start_cache_is_trained_again_and_replaced(tmp_path, capsys, damage):
    """A cached copy cut short (copied between machines, a disk error) was a SafetensorError traceback."""
    config = small_config(tmp_path)
    task = build_task(config)
    fresh = lambda: build_model(config, torch.device("cpu"))  # noqa: E731  the same initial weights each time (seeded)
    model = fresh()
    warm_start(model, task, config, "cpu", progress=False)
    folder = cache_folder(config)
    weights = folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (folder / "config.json").write_text("{")
    again = fresh()
    info = warm_start(again, task, config, "cpu", progress=False)
    assert info["cached"] is None, "trained again"
    assert "warm start: the cached copy cannot be read" in capsys.readouterr().out
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b), "the same warm start as the first"
    assert warm_start(fresh(), task, config, "cpu", progress=False)["cached"] == str(folder), \
        "the damaged copy was replaced"


@pytest.fixture
def no_warm_start(monkeypatch):
    """A run that reaches the warm start fails the test: what it checks must fail before."""
    import atpo_fast.run as run_module

    def warm_start_on_every_rank(*args, **kwargs):
        raise AssertionError("the warm start ran before the check")

    monkeypatch.setattr(run_module, "warm_start_on_every_rank", warm_start_on_every_rank)


def test_a_run_dir_that_cannot_be_made_fails_before_the_warm_start(tmp_path, capsys, no_warm_start):
    (tmp_path / "a_file").write_text("")
    assert train_main(["--quiet", *SMALL, f"logging.run_dir={tmp_path / 'a_file' / 'runs'}"]) == 2
    assert "config key 'logging.run_dir' expects a folder this process can write" in capsys.readouterr().err


@pytest.mark.parametrize("override,match", [
    # sudoku4's prompts take 17 tokens: with a 16-token response they do not fit 30
    ("model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_length: 30}",
     r"the task's longest prompt \(17 tokens\) plus sampler.gen_length \(16\) exceeds the model's context of 30 "
     r"tokens \(model.tiny.max_length\)"),
    ("task.data=problems.jsonl", "config key 'task.data' expects null for task.name='sudoku4' .that task reads no file"),
    # were "Sample larger than population", after the warm start and the first evaluation for prompts_per_iter
    ("optim.prompts_per_iter=400", "config key 'optim.prompts_per_iter' expects at most the task's 300 training"),
    ("warmstart.batch_size=400", "config key 'warmstart.batch_size' expects at most the task's 300 training"),
])
def test_task_and_context_mistakes_fail_before_the_warm_start(tmp_path, capsys, no_warm_start, override, match):
    assert train_main(["--quiet", *SMALL, f"logging.run_dir={tmp_path}", override]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_trainer_refuses_a_task_whose_prompts_do_not_fit(tmp_path):
    """The same check for API users who hand Trainer their own model and task."""
    config = small_config(tmp_path)
    model = TinyDiffusionLM(dataclasses.replace(config.model.tiny, max_length=20))
    with pytest.raises(ValueError, match=r"longest prompt \(17 tokens\) plus sampler.gen_length \(16\)"):
        Trainer(config, model)
    empty = get_task("sudoku4", train_size=16, test_size=2)
    empty.train[0] = dataclasses.replace(empty.train[0], prompt="")
    with pytest.raises(ValueError, match="task prompt 0 .of train, then test. encodes to no token"):
        Trainer(config, task=empty)


@pytest.mark.parametrize("implementation", ["native", "remote"])
def test_llada_config_runs_a_small_checkpoint(tmp_path, gen, implementation):
    """configs/llada.yaml with --model and --task jsonl, wired end to end on CPU: a tiny checkpoint in
    LLaDA's layout (native), or a stand-in with its own modeling file (remote)."""
    from test_models import make_checkpoint

    model_dir = tmp_path / "llada"
    if implementation == "native":
        write_checkpoint(model_dir, "llada", gen)
    else:
        make_checkpoint(model_dir, "llada", vocab=126464, shift=False, four_d=False)
    data, runs = tmp_path / "qa.jsonl", tmp_path / "runs"
    data.write_text("".join(json.dumps({"question": f"w{i} w3", "answer": f"#### {i}"}) + "\n" for i in range(12)))
    argv = ["--config", "configs/llada.yaml", "--model", str(model_dir), "--task", "jsonl", "--data", str(data),
            "--quiet", "--name", "llada", "device=cpu", "model.dtype=float32", f"logging.run_dir={runs}",
            "sampler.gen_length=8", "sampler.block_length=4", "sampler.steps=4", "optim.iterations=1",
            "optim.prompts_per_iter=2", "optim.group_size=2", "selection.budget=2", "eval.size=2",
            f"model.implementation={implementation}"] + (["sampler.cache=none"] if implementation == "remote" else [])
    assert train_main(argv) == 0
    config = load_config(runs / "llada" / "config.yaml")
    assert (config.model.kind, config.model.path, config.task.data) == ("llada", str(model_dir), str(data))
    assert read(runs / "llada" / "metrics.jsonl")[1]["iteration"] == 0
    if implementation == "native":  # the run moved: its base model and data are found at other paths
        model_dir.rename(tmp_path / "moved_llada")
        data.rename(tmp_path / "moved.jsonl")
        resume = ["--resume", "--name", "llada", f"logging.run_dir={runs}", "optim.iterations=2", "--quiet"]
        assert train_main(resume) == 2  # the run's own paths are gone, and the error names them
        moved = [f"model.path={tmp_path / 'moved_llada'}", f"task.data={tmp_path / 'moved.jsonl'}"]
        assert train_main(resume + moved) == 0
        assert [m["iteration"] for m in read(runs / "llada" / "metrics.jsonl") if "phase" not in m] == [0, 1]
        assert load_config(runs / "llada" / "config.yaml").model.path == str(tmp_path / "moved_llada")


def test_checkpoint_restores_the_random_generators(tmp_path):
    config = small_config(tmp_path, "warmstart.steps=0")
    trainer = Trainer(config)
    torch.manual_seed(7)
    random.seed(7)
    checkpoint.save(trainer, tmp_path / "checkpoint")
    expected = (torch.rand(3), random.random())
    torch.manual_seed(8)
    random.seed(8)
    checkpoint.load(trainer, tmp_path / "checkpoint")
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
