"""The benchmark suite's quick settings: they run, and their result files parse and hold every field."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the benchmarks package lives beside the installed one

META_FIELDS = {"date", "python", "torch", "triton", "cpu", "cpu_count", "device"}


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert META_FIELDS <= set(data["meta"]), META_FIELDS - set(data["meta"])
    assert data["rows"], "no result rows"
    return data


@pytest.mark.slow
def test_kernels_quick(tmp_path):
    from benchmarks.__main__ import kernels
    from benchmarks.common import CPU_COLUMNS

    kernels(quick=True, results_dir=tmp_path)
    (json_file,) = tmp_path.glob("kernels_quick_*.json")
    data = load(json_file)
    cases = {row["case"].split(" ")[0] for row in data["rows"]}
    assert cases == {"token_stats", "selected", "fused_linear", "step_rows", "sampler"}
    for row in data["rows"]:
        assert set(CPU_COLUMNS) <= set(row), row
        assert row["time_ms"] > 0 and row["peak_extra_MiB"] >= 0
        if row["variant"] == row["baseline"]:
            assert row["speedup"] == 1.0 and row["memory_vs_baseline"] == pytest.approx(1.0)
    assert "Trace overhead" in json_file.with_suffix(".md").read_text()


def test_memory_ratio_of_a_baseline_that_allocated_nothing():
    from benchmarks.common import memory_ratio

    assert memory_ratio(30, 10) == 3.0 and memory_ratio(0, 0) == 1.0 and math.isnan(memory_ratio(5, 0))


def test_trainer_bench_quick():
    from benchmarks.bench_trainer import main

    table = main(["--quick"])
    assert [row["variant"] for row in table] == ["atpo_fast", "plain"]
    for row in table:
        assert row["iteration_s"] > 0 and row["rollout_s"] > 0 and row["rows"] > 0 and row["targets"] >= row["rows"]


def test_rollout_bench_quick(tmp_path):
    from benchmarks import bench_rollout

    speed = bench_rollout.rollout_times(bench_rollout.QUICK, "cpu", torch.float32)
    assert all(row["shape"].endswith(" float32") for row in speed)
    assert [row["mode"] for row in speed] == ["none", "prefix", "dual"] and speed[0]["agreement"] == 1.0
    assert all(0 < row["head_s"] < row["wall_s"] and row["speedup_without_head"] > 0 for row in speed)
    # the caches forward fewer positions through the decoder layers: prefix the block and after it, dual the block
    assert speed[0]["layer_work"] == 1 and 1 > speed[1]["layer_work"] > speed[2]["layer_work"] > 0
    assert speed[0]["work_bound"] == pytest.approx(1) and all(row["work_bound"] > 1 for row in speed[1:])
    task = bench_rollout.default_task(4, bench_rollout.QUICK_TASK + [f"warmstart.cache_dir={tmp_path}"])
    assert [(row["mode"], row["cache_refresh"]) for row in task][:3] == [("none", "-"), ("prefix", "-"), ("dual", "-")]
    assert all(0 <= row["accuracy"] <= 1 and 0 <= row["agreement"] <= 1 for row in task)
    with pytest.warns(UserWarning, match="with one block"):  # the default job's response is one block
        gap = bench_rollout.training_gap(("tiny",), bench_rollout.GAP_RUN + bench_rollout.QUICK_TASK
                                         + ["optim.iterations=1", f"warmstart.cache_dir={tmp_path}"])
    assert [row["mode"] for row in gap] == ["none", "prefix", "dual"] and gap[0]["speedup"] == 1
    # QUICK_TASK's model has one layer, whose keys and values outside the block depend on their own tokens
    # alone: there the caches are exact, and every mode's rollout log-probs are the training forward's
    assert all(row["logprob_gap"] < 1e-5 for row in gap)


@pytest.mark.slow
def test_compare_rules_quick(tmp_path):
    from benchmarks.compare_rules import main

    result = main(["--quick", "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the runs' device (config device: auto) names the files
    (json_file,) = tmp_path.glob(f"compare_rules_quick_{device}_*[0-9].json")
    data = load(json_file)
    variants = [row["variant"] for row in data["rows"]]
    assert variants == ["uniform (TraceRL)", "hybrid/select", "EGSPO (entropy per trajectory)",
                        "Drift (surprisal sampling)", "hybrid/partition", "all steps"]
    for row in data["rows"]:
        for key in ("seeds", "acc_before", "acc_after_mean", "acc_after_std", "rows_per_iter", "targets_per_iter",
                    "diff_vs_uniform", "ci95_low", "ci95_high"):
            assert key in row, key
        assert 0 <= row["acc_after_mean"] <= 1 and row["seeds"] == 2
        assert row["ci95_low"] <= row["diff_vs_uniform"] <= row["ci95_high"]
    by_name = {row["variant"]: row for row in data["rows"]}
    assert by_name["all steps"]["rows_per_iter"] > by_name["hybrid/select"]["rows_per_iter"]  # the costly baseline
    assert json_file.with_suffix(".png").is_file()
    runs = json.loads(json_file.with_name(json_file.stem + "_runs.json").read_text())
    assert len(runs) == 12 and all(run["curve"] for run in runs)
    assert len(result["runs"]) == 12
    # the confusion-zone analysis of the published rules' checkpoints: every signal, per-step AUROC in [0, 1]
    (analysis_file,) = tmp_path.glob(f"compare_rules_quick_analysis_{device}_*.json")
    rows = load(analysis_file)["rows"]
    assert [(row["variant"], row["signal"]) for row in rows] == [
        (variant, signal) for variant in ("uniform (TraceRL)", "hybrid/select", "EGSPO (entropy per trajectory)",
                                          "Drift (surprisal sampling)")
        for signal in ("entropy", "margin", "roec", "surprisal")]
    for row in rows:  # a checkpoint with only wrong (or only right) answers has no AUROC: NaN
        assert row["checkpoints"] == 2 and row["steps"] == 16 and 0 <= row["wrong_share"] <= 1
        if not math.isnan(row["peak_step_auroc"]):
            assert 0 <= row["all_steps_auroc"] <= row["peak_step_auroc"] <= 1
            assert 0 < row["steps_for_80pct_power"] <= 1
    assert analysis_file.with_suffix(".png").is_file()
    assert all((Path(run["run_dir"]) / "analysis.json").is_file() for run in runs if run["variant"] != "all steps"
               and run["variant"] != "hybrid/partition")


def test_paired_t_interval_by_hand():
    from benchmarks.compare_rules import summarize, t_interval

    mean, half = t_interval([0.1, 0.3, 0.2])  # sd 0.1, n 3, t(0.975, 2) = 4.303
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    runs = [{"variant": v, "seed": s, "before": {"accuracy": 0.4}, "after": {"accuracy": a}, "rows_per_iter": 1,
             "targets_per_iter": 1, "update_s_per_iter": 1}
            for v, accs in (("uniform (TraceRL)", (0.5, 0.6, 0.4)), ("x", (0.6, 0.9, 0.6))) for s, a in enumerate(accs)]
    row = summarize(runs)[1]  # paired differences 0.1, 0.3, 0.2
    assert row["diff_vs_uniform"] == pytest.approx(0.2) and row["ci95_low"] == pytest.approx(0.2 - half)


def test_analysis_summary_by_hand():
    """Two checkpoints' reports of one signal over 4 steps: peaks, windows, means; a report without AUROCs is
    left out of the AUROC columns but counted in the wrong share."""
    from benchmarks.compare_rules import summarize_analysis

    def report(seed, correct, aurocs, window, power):
        return {"variant": "v", "seed": seed, "responses": 10, "correct": correct, "steps": 4, "signals": {"entropy": {
            "auroc_per_step": aurocs, "best_window": window, "steps_for_80pct_power": power}}}

    reports = [report(0, 4, [0.5, 0.9, 0.7, None], {"start": 1, "end": 3, "auroc": 0.85}, 0.5),
               report(1, 2, [0.6, 0.6, 0.8, 0.6], {"start": 2, "end": 3, "auroc": 0.8}, 0.25),
               report(2, 0, [None] * 4, {"start": 0, "end": 0, "auroc": float("nan")}, None)]
    (row,) = summarize_analysis(reports)
    assert row["checkpoints"] == 3 and row["wrong_share"] == pytest.approx((0.6 + 0.8 + 1.0) / 3)
    assert row["peak_step_auroc"] == pytest.approx(0.85) and row["peak_step_median"] == 1.5
    assert row["window_median"] == "1.5-3" and row["window_auroc"] == pytest.approx(0.825)
    assert row["all_steps_auroc"] == pytest.approx((0.7 + 0.65) / 2) and row["steps_for_80pct_power"] == 0.375


def test_memory_model_counts_the_parameters_it_predicts_for():
    """bench_memory's parameter counts are those of the models it measures (tiny model, peft LoRA)."""
    from atpo_fast.config import LoraConfig
    from atpo_fast.models import TinyConfig, TinyDiffusionLM
    from atpo_fast.models.lora import add_lora
    from benchmarks import bench_memory

    shape = dict(hidden_size=48, num_heads=4, intermediate_size=80, vocab_size=500, num_layers=3)
    model = TinyDiffusionLM(TinyConfig(**shape))
    assert bench_memory.Shape(**shape).parameters() == sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(rank=5))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bench_memory.Shape(**shape).lora_parameters(5) == adapters
    llada = bench_memory.Shape(**bench_memory.LLADA_8B)
    assert 8.0e9 < llada.parameters() < 8.1e9  # LLaDA-8B
    rows = {(lora, ac): bench_memory.largest_micro_batch(llada, lora_rank=lora, checkpointing=ac, length=512)
            for lora in (0, 64) for ac in (False, True)}
    assert rows[0, True] >= rows[0, False] and rows[64, False] >= rows[0, False] and rows[64, True] >= rows[64, False]


def test_memory_measurement_runs_one_setting():
    from benchmarks import bench_memory

    got = bench_memory.measure("lora", True, bench_memory.QUICK_SHAPE, bench_memory.QUICK_PLAN)
    assert {"rollout", "old_logprobs", "update", "update_s_single_pass", "update_s_two_pass"} <= set(got)
    assert got["rows"] == bench_memory.QUICK_PLAN["micro"] and got["length"] > bench_memory.QUICK_PLAN["gen_length"]


def test_native_bench_quick(tmp_path, monkeypatch):
    """configs/llada_lora.yaml runs on a LLaDA-layout folder loaded natively, and a random model scores on the
    parity task well enough that the update runs (the GPU check does the same at LLaDA-8B's shape)."""
    from benchmarks import bench_native

    monkeypatch.setenv("ATPO_NATIVE_DIR", str(tmp_path))
    (row,) = bench_native.main(quick=True)
    assert (tmp_path / "llada" / "model.safetensors.index.json").is_file()
    assert row["updated"] and 0 < row["reward"] < 1 and row["rollout_time"] > 0 and row["update_time"] > 0
    config = (tmp_path / "native" / "config.yaml").read_text()
    assert "implementation: native" in config and "cache: dual" in config


def test_ab_bench_prepares_an_importable_older_kernels_package(tmp_path):
    """bench_ab's baseline: a commit's kernels/ as a package that imports beside the working tree's (no GPU)."""
    import importlib
    import subprocess

    from benchmarks.bench_ab import prepare

    prepare("HEAD", tmp_path / "kernels_old")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert (tmp_path / "kernels_old" / "REF").read_text().strip() == head
    sys.path.insert(0, str(tmp_path))
    try:
        old = importlib.import_module("kernels_old.token_stats")
    finally:
        sys.path.remove(str(tmp_path))
    assert callable(old.softmax_row_stats) and old.softmax_row_stats.__module__ == "kernels_old.token_stats"


def test_bad_benchmark_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from benchmarks import __main__ as entry
    from benchmarks.compare_rules import main as compare

    with pytest.raises(SystemExit):
        compare(["--seeds", "0"])
    assert "argument --seeds: expects an int >= 1, got '0'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["benchmarks", "analyze", str(tmp_path)])
    with pytest.raises(SystemExit):
        entry.main()
    assert f"error: {tmp_path} holds no checkpoint/ folder" in capsys.readouterr().err


def test_a_second_run_on_the_same_day_keeps_the_first_runs_table(tmp_path):
    from benchmarks.common import write_results

    meta = {"date": "2026-11-28", "device": "cpu"}
    paths = [write_results("rollout", "Rollouts", ["mode"], [{"mode": f"run {i}"}], meta, results_dir=tmp_path)
             for i in range(3)]
    assert [path.name for path in paths] == ["rollout_cpu_2026-11-28.md", "rollout_cpu_2026-11-28_run2.md",
                                             "rollout_cpu_2026-11-28_run3.md"]
    for i, path in enumerate(paths):
        assert f"| run {i} |" in path.read_text()
        assert json.loads(path.with_suffix(".json").read_text())["rows"] == [{"mode": f"run {i}"}]
