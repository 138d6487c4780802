"""Method comparison: every selection rule at the same budget and iterations, over seeds, from one warm start.

Variants: uniform (TraceRL's intervals), random / entropy / margin / roec / hybrid (ATPO) in select
and partition modes, EGSPO (entropy top-k per trajectory), Drift (surprisal sampling per
trajectory) and "all steps" (every denoising step its own row: the most expensive baseline). Each
trains the tiny model on the default task from the same warm-start checkpoint, and seed s means the
same prompts and draws for every variant (paired seeds). The table gives held-out greedy accuracy
after training (mean and spread over seeds), its paired difference to uniform with a 95%
t-interval over seeds, and each variant's cost (rows and target tokens trained per iteration,
update seconds per iteration); a PNG shows held-out accuracy over iterations with a band of one
standard deviation over seeds. Then the confusion-zone analysis (atpo_fast.analysis) of the published
rules' trained checkpoints: per signal, how well each denoising step predicts a wrong answer (AUROC),
the best window of steps and how concentrated that power is; a second table and PNG.

    python -m benchmarks compare               # full: 5 seeds, 40 iterations each (hours on 2 cores)
    python -m benchmarks compare --quick       # CI smoke: small model, 6 variants, 2 seeds, 2 iterations
    python -m benchmarks compare --setting zones   # configs/zones.yaml: 96 digits over 48 steps, 30 iterations
    python -m benchmarks compare --variants uniform,hybrid-select,egspo,drift   # a subset, by short name

Re-running after an interruption reuses the finished runs and resumes the unfinished one from its
checkpoint (a run is reused only when its saved config is the one it would run with now).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from atpo_fast import checkpoint
from atpo_fast.analysis import analyze_run
from atpo_fast.checkpoint import CHECKPOINT
from atpo_fast.cli import positive_int
from atpo_fast.config import CONFIG, load_config
from atpo_fast.distributed import Dist
from atpo_fast.run import METRICS, read_metrics, train
from atpo_fast.trainer import build_model, build_task, resolve_device
from atpo_fast.warmstart import cache_folder, warm_start
from benchmarks.common import RESULTS_DIR, machine_info, print_table, write_results

RULES = ("random", "entropy", "margin", "roec", "hybrid")
# setting -> (its config file over the defaults, iterations per run); a zones iteration costs ~3x a default one
SETTINGS = {"default": (None, 40), "zones": (Path(__file__).resolve().parent.parent / "configs" / "zones.yaml", 30)}
# Student's t 0.975 quantiles by degrees of freedom (the 95% interval's half-width factor); 1.96 beyond 30
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}
QUICK = ["model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_length: 208}",
         "warmstart.steps=20", "warmstart.batch_size=16", "optim.prompts_per_iter=4",
         "optim.group_size=4", "eval.size=16", "eval.pass_k=0", "eval.every=1",
         "task.options.train_size=300", "task.options.test_size=16"]
QUICK_VARIANTS = ("uniform (TraceRL)", "hybrid/select", "hybrid/partition", "EGSPO (entropy per trajectory)",
                  "Drift (surprisal sampling)", "all steps")  # the smoke runs these only
FULL = ["eval.every=10", "eval.pass_k=0"]  # held-out greedy accuracy every 10 iterations; no pass@k sampling
# the variants whose trained checkpoints get the confusion-zone analysis (the published rules)
ANALYZED = ("uniform (TraceRL)", "hybrid/select", "EGSPO (entropy per trajectory)", "Drift (surprisal sampling)")


def variants(steps: int) -> list[tuple[str, list[str]]]:
    """Every variant's name and config overrides, the published rules first: a sweep runs them in this
    order, all seeds of one before the next, so an interrupted sweep has already paired the ones that matter."""
    out = [("uniform (TraceRL)", ["selection.rule=uniform"]),
           ("hybrid/select", ["selection.rule=hybrid", "selection.mode=select"]),
           ("EGSPO (entropy per trajectory)", ["selection.rule=entropy", "selection.per=trajectory"]),
           ("Drift (surprisal sampling)", ["selection.rule=surprisal", "selection.per=trajectory"])]
    out += [(f"{rule}/{mode}", [f"selection.rule={rule}", f"selection.mode={mode}"])
            for mode in ("select", "partition") for rule in RULES if f"{rule}/{mode}" != "hybrid/select"]
    out.append(("all steps", ["selection.rule=uniform", f"selection.budget={steps}"]))
    return out


def slug(name: str) -> str:
    """A variant's short name (its run folders' prefix; --variants takes these): uniform, hybrid-select, egspo..."""
    return "all-steps" if name == "all steps" else name.split(" ")[0].replace("/", "-").lower()


def run_variant(name: str, overrides: list[str], seed: int, base: list[str], work: Path,
                config_file: Path | None = None) -> dict:
    run_name = f"{slug(name)}-seed{seed}"
    config = load_config(config_file, base + overrides + [f"seed={seed}", f"logging.run_dir={work}",
                                                   f"logging.name={run_name}"])
    run_dir = config.run_folder()
    saved = run_dir / CONFIG
    same = saved.exists() and load_config(saved).to_dict() == config.to_dict()  # keys added since take defaults
    if same and (run_dir / "summary.json").exists():  # finished by an earlier, interrupted comparison
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        resume = same and checkpoint.find(run_dir / CHECKPOINT) is not None
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        summary = train(config, resume=resume, progress=False)
    history = read_metrics(Path(summary["run_dir"]) / METRICS)
    iterations = [m for m in history if "phase" not in m]
    curve = [(m["iteration"] + (0 if "phase" in m else 1), m["eval"]["accuracy"]) for m in history if "eval" in m]
    return {"variant": name, "seed": seed, "run_dir": summary["run_dir"], "before": summary["before"],
            "after": summary["after"], "curve": curve,
            "rows_per_iter": statistics.mean(m.get("rows", 0) for m in iterations),
            "targets_per_iter": statistics.mean(m.get("targets", 0) for m in iterations),
            "update_s_per_iter": statistics.mean(m.get("update_time", 0.0) for m in iterations)}


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN half-width for fewer than two values)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    df = len(values) - 1
    factor = T975.get(df) or (T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96)
    return mean, factor * statistics.stdev(values) / len(values) ** 0.5


def summarize(runs: list[dict]) -> list[dict]:
    table = []
    uniform = {r["seed"]: r["after"]["accuracy"] for r in runs if r["variant"] == "uniform (TraceRL)"}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        after = [r["after"]["accuracy"] for r in mine]
        paired = [r["after"]["accuracy"] - uniform[r["seed"]] for r in mine if r["seed"] in uniform]
        diff, half = t_interval(paired) if paired else (float("nan"), float("nan"))  # uniform not run
        row = {"variant": name, "seeds": len(mine), "acc_before": mine[0]["before"]["accuracy"],
               "acc_after_mean": statistics.mean(after), "acc_after_std": statistics.pstdev(after),
               "acc_after_min": min(after), "acc_after_max": max(after), "diff_vs_uniform": diff,
               "ci95_low": diff - half, "ci95_high": diff + half}
        for key in ("rows_per_iter", "targets_per_iter", "update_s_per_iter"):
            row[key] = statistics.mean(r[key] for r in mine)
        pass_keys = [k for k in mine[0]["after"] if k.startswith("pass@")]
        if pass_keys:
            row[pass_keys[0] + "_after"] = statistics.mean(r["after"][pass_keys[0]] for r in mine)
        table.append(row)
    return table


def analyze_checkpoints(runs: list[dict], samples: int) -> list[dict]:
    """The confusion-zone report (atpo_fast.analysis.analyze_run: `samples` sampled responses per held-out
    problem) of every ANALYZED variant's trained checkpoint, reusing a run folder's analysis.json."""
    reports = []
    for run in runs:
        if run["variant"] not in ANALYZED:
            continue
        saved = Path(run["run_dir"]) / "analysis.json"
        report = json.loads(saved.read_text()) if saved.exists() else None
        if report is None or report.get("samples") != samples:
            report = analyze_run(run["run_dir"], samples=samples)
        reports.append({"variant": run["variant"], "seed": run["seed"], **report})
    return reports


def summarize_analysis(reports: list[dict]) -> list[dict]:
    """Per analyzed variant and signal, over its checkpoints: the best single step (its AUROC for predicting a
    wrong answer, and where), the best contiguous window of steps, and the share of steps holding 80% of the
    predictive power (|AUROC - 0.5| summed)."""
    def mean(values) -> float:  # over the checkpoints where it is defined (a report writes NaN as None)
        values = [v for v in values if v is not None and v == v]
        return statistics.mean(values) if values else float("nan")

    table = []
    for name in dict.fromkeys(r["variant"] for r in reports):
        mine = [r for r in reports if r["variant"] == name]
        for signal in mine[0]["signals"]:
            data = [r["signals"][signal] for r in mine]
            # checkpoints with both right and wrong answers (otherwise every AUROC is undefined)
            peaks = [max((a, t) for t, a in enumerate(d["auroc_per_step"]) if a is not None) for d in data
                     if any(a is not None for a in d["auroc_per_step"])]
            windows = [d["best_window"] for d in data if d["best_window"]["end"] > 0]
            table.append({
                "variant": name, "signal": signal, "checkpoints": len(mine), "steps": mine[0]["steps"],
                "wrong_share": mean(1 - r["correct"] / r["responses"] for r in mine),
                "peak_step_auroc": mean(a for a, _ in peaks),
                "peak_step_median": statistics.median(t for _, t in peaks) if peaks else float("nan"),
                "window_median": f"{statistics.median(w['start'] for w in windows):g}-"
                                 f"{statistics.median(w['end'] for w in windows):g}" if windows else "",
                "window_auroc": mean(w["auroc"] for w in windows),
                "all_steps_auroc": mean(mean(d["auroc_per_step"]) for d in data),
                "steps_for_80pct_power": mean(d["steps_for_80pct_power"] for d in data),
            })
    return table


def plot_analysis(reports: list[dict], path: Path) -> None:
    """Per-step AUROC of each signal for predicting a wrong answer: mean over seeds, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signals = list(reports[0]["signals"])
    fig, axes = plt.subplots(1, len(signals), figsize=(4.2 * len(signals), 3.8), sharey=True)
    for ax, signal in zip(axes, signals):
        for name in dict.fromkeys(r["variant"] for r in reports):
            curves = [r["signals"][signal]["auroc_per_step"] for r in reports if r["variant"] == name]
            defined = [[c[t] for c in curves if c[t] is not None] for t in range(len(curves[0]))]
            ax.plot([statistics.mean(v) if v else float("nan") for v in defined], label=name)
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_title(signal)
        ax.set_xlabel("denoising step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUROC for a wrong final answer")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=[plt.cm.tab20(i) for i in range(0, 20, 2)] + [plt.cm.tab20(i) for i in range(1, 20, 2)])
    for name in dict.fromkeys(r["variant"] for r in runs):
        curves = [dict(r["curve"]) for r in runs if r["variant"] == name]
        its = sorted(set.intersection(*(set(c) for c in curves)))
        style = "-" if name.startswith(("hybrid", "uniform", "all", "EGSPO", "Drift")) else ":"
        mean = [statistics.mean(c[i] for c in curves) for i in its]
        spread = [statistics.pstdev([c[i] for c in curves]) for i in its]
        line, = ax.plot(its, mean, style, marker="o", ms=3, label=name)
        ax.fill_between(its, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                        color=line.get_color(), alpha=0.08)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out greedy accuracy (mean and 1 sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke: small model, 2 seeds, 2 iterations")
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default",
                        help="the task setting: the default job, or configs/zones.yaml")
    parser.add_argument("--iterations", type=positive_int, help="per run (default: 40, zones 30)")
    parser.add_argument("--variants", help="comma-separated short names to run, in the table's order "
                                           "(default: all; e.g. uniform,hybrid-select,egspo,drift)")
    parser.add_argument("--analysis-samples", type=positive_int, default=4,
                        help="sampled responses per held-out problem for the confusion-zone analysis of the "
                             "published rules' checkpoints (0: no analysis)")
    parser.add_argument("--work-dir", default=".cache/compare_rules", help="where the runs' folders go")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the table, JSON and plot go")
    args = parser.parse_args(argv)
    config_file, setting_iterations = SETTINGS[args.setting]
    seeds, iterations = (2, 2) if args.quick else (args.seeds, args.iterations or setting_iterations)
    work = Path(args.work_dir) / args.setting
    base = (QUICK if args.quick else FULL) + [f"optim.iterations={iterations}", f"warmstart.cache_dir={work / 'warm'}"]

    warm_config = load_config(config_file, base + [f"logging.run_dir={work}"])
    chosen = variants(warm_config.sampler.steps)
    if args.quick:
        chosen = [(name, overrides) for name, overrides in chosen if name in QUICK_VARIANTS]
    if args.variants:
        wanted, known = args.variants.split(","), [slug(name) for name, _ in chosen]
        if set(wanted) - set(known):
            parser.error(f"--variants: unknown {sorted(set(wanted) - set(known))}; choose from {','.join(known)}")
        chosen = [(name, overrides) for name, overrides in chosen if slug(name) in wanted]
    device = resolve_device(warm_config, Dist())
    task, model = build_task(warm_config), build_model(warm_config, device)
    warm_start(model, task, warm_config, device, progress=not args.quick)  # shared by every run: model.path
    shared = base + [f"model.path={cache_folder(warm_config)}", "warmstart.steps=0"]

    runs = [run_variant(name, overrides, seed, shared, work, config_file) for name, overrides in chosen
            for seed in range(seeds)]
    table = summarize(runs)
    columns = ["variant", "seeds", "acc_before", "acc_after_mean", "acc_after_std", "acc_after_min", "acc_after_max",
               "diff_vs_uniform", "ci95_low", "ci95_high"]
    columns += [k for k in table[0] if k.startswith("pass@")] + ["rows_per_iter", "targets_per_iter",
                                                                  "update_s_per_iter"]
    print_table(columns, table)
    meta = {**machine_info(), "setting": args.setting, "size": "quick" if args.quick else "full",
            "iterations": iterations, "seeds": seeds, "budget": warm_config.selection.budget,
            "task": warm_config.task.name}
    s = warm_config.sampler
    notes = (f"Tiny model, setting {args.setting}: task {warm_config.task.name} {warm_config.task.options}, "
             f"{s.gen_length} response tokens over {s.steps} steps, {iterations} iterations, budget "
             f"{warm_config.selection.budget} rows per response, {seeds} paired seed(s), one shared warm start. "
             f"diff_vs_uniform: mean over seeds of (accuracy - uniform's accuracy at the same seed), with its 95% "
             f"t-interval [ci95_low, ci95_high]; an interval that holds 0 separates nothing.")
    results_dir = Path(args.results_dir)
    name = f"compare_rules{'' if args.setting == 'default' else '_' + args.setting}{'_quick' if args.quick else ''}"
    path = write_results(name, "Selection rules at equal budget: held-out accuracy", columns, table, meta, notes,
                         results_dir=results_dir)
    plot_curves(runs, path.with_suffix(".png"))
    (path.with_name(path.stem + "_runs.json")).write_text(json.dumps(runs, indent=2))
    print(f"wrote {path.with_suffix('.png')}")
    result = {"table": table, "runs": runs, "path": str(path)}
    samples = 1 if args.quick else args.analysis_samples
    if samples:
        reports = analyze_checkpoints(runs, samples)
        analysis = summarize_analysis(reports)
        columns = list(analysis[0])
        print_table(columns, analysis)
        notes = (f"Confusion-zone analysis of the trained checkpoints above ({', '.join(ANALYZED)}): each rolls out "
                 f"its held-out problems, {samples} sampled response(s) each at temperature 1, and scores every "
                 f"denoising step's signal (entropy, margin read as low = likely wrong, RoEC, surprisal) by its "
                 f"AUROC for predicting a wrong final answer. peak_step_auroc: the best single step (mean over "
                 f"checkpoints; peak_step_median: where); window: the contiguous steps whose mean signal predicts "
                 f"best (median start-end, mean AUROC); all_steps_auroc: the mean per-step AUROC; "
                 f"steps_for_80pct_power: the smallest share of steps whose |AUROC - 0.5| adds to 80% of the total "
                 f"(low: the signal sits in a few steps).")
        path = write_results(name + "_analysis", "Where wrong answers show: per-step AUROC of each signal", columns,
                             analysis, meta, notes, results_dir=results_dir)
        plot_analysis(reports, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        result.update(analysis=analysis, analysis_path=str(path))
    return result


if __name__ == "__main__":
    main()
