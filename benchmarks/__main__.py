"""The benchmark suite's one entry point.

    python -m benchmarks kernels [--quick]   every kernel benchmark: pytest-benchmark + memory on CPU,
                                             triton.testing.do_bench on CUDA; one table + JSON per run
    python -m benchmarks trainer [--quick] [--layers N]   one ATPO iteration against the plain PyTorch path
    python -m benchmarks compare [--quick] [--setting zones] [--seeds N] ...   selection rules at equal budget
                                             (compare --help lists its options)
    python -m benchmarks rollout [--quick]   generate's cache modes (none, prefix, dual): rollout wall time, then
                                             (CPU) held-out accuracy and the training log-prob gap they cost
    python -m benchmarks memory [--quick]    peak memory of a training iteration by phase: measured, and predicted
    python -m benchmarks analyze RUN_DIR     confusion-zone analysis of a run's checkpoint
    python -m benchmarks sass [--quick]      compile report: every Triton specialisation for sm_90 / sm_80, no GPU
    python -m benchmarks all [--quick]       kernels, then trainer
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

from atpo_fast.cli import positive_int
from benchmarks.common import CPU_COLUMNS, RESULTS_DIR, machine_info, print_table, run_cpu_suite, write_results

KERNEL_MODULES = ["bench_token_stats", "bench_logprobs", "bench_step_rows", "bench_sampler"]


def kernels(quick: bool, results_dir=RESULTS_DIR) -> list[dict]:
    start = time.perf_counter()
    if torch.cuda.is_available() and not quick:
        table = cuda_kernels()
    else:
        table = run_cpu_suite(KERNEL_MODULES, quick)
    cases_s = time.perf_counter() - start
    sampler = importlib.import_module("benchmarks.bench_sampler")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overhead = sampler.trace_overhead(device, 4 if quick else 8, 32 if quick else 64)
    # where the time goes (the quick run took 47 s on 2 CPU cores and 179-290 s on the H200 machine)
    print(f"kernel cases {cases_s:.0f} s, trace overhead ({device}) {time.perf_counter() - start - cases_s:.0f} s")
    columns = list(dict.fromkeys(k for row in table for k in row)) if torch.cuda.is_available() and not quick \
        else CPU_COLUMNS
    print_table(columns, table)
    name = "kernels_quick" if quick else "kernels"
    write_results(name, "Kernel benchmarks: atpo_fast against its baselines", columns, table, machine_info(),
                  sampler.overhead_note([dict(device=device, **overhead)]),
                  results_dir=results_dir)
    return table


def cuda_kernels() -> list[dict]:
    """Every module's CUDA benchmark (do_bench), as rows of one table."""
    token_stats = importlib.import_module("benchmarks.bench_token_stats")
    logprobs = importlib.import_module("benchmarks.bench_logprobs")
    step_rows = importlib.import_module("benchmarks.bench_step_rows")
    rows = [{"case": f"token_stats N={r.pop('N')} V={r.pop('V')} {r.pop('dtype')}", **r}
            for r in token_stats.bench_cuda()]
    rows += logprobs.bench_cuda(logprobs.CUDA_SHAPE)
    rows += step_rows.bench_cuda(step_rows.FULL)
    return rows


def main() -> None:
    # these two parse their own options (--help included); sass re-runs itself under the Triton interpreter
    if sys.argv[1:2] == ["sass"]:
        raise SystemExit(importlib.import_module("benchmarks.sass").main(sys.argv[2:]))
    if sys.argv[1:2] == ["compare"]:
        importlib.import_module("benchmarks.compare_rules").main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernels", "trainer", "compare", "rollout", "memory", "analyze", "sass",
                                         "all"])
    parser.add_argument("run_dir", nargs="?", help="the run folder (analyze)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=positive_int, default=4, help="trainer: layers of the LLaDA-shaped model")
    args, rest = parser.parse_known_args()
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.what in ("kernels", "all"):
        kernels(args.quick)
    if args.what in ("trainer", "all"):
        importlib.import_module("benchmarks.bench_trainer").main((["--quick"] if args.quick else [])
                                                                 + ["--layers", str(args.layers)])
    if args.what == "rollout":
        importlib.import_module("benchmarks.bench_rollout").main(args.quick)
    if args.what == "memory":
        importlib.import_module("benchmarks.bench_memory").main(["--quick"] if args.quick else [])
    if args.what == "analyze":
        if not args.run_dir:
            parser.error("analyze needs RUN_DIR")
        from atpo_fast.analysis import analyze_run

        try:
            report = analyze_run(args.run_dir)
        except ValueError as error:  # not a run folder, or one without a checkpoint
            parser.error(str(error))
        print(json.dumps({name: data["best_window"] for name, data in report["signals"].items()}, indent=2))
        print(f"wrote {args.run_dir}/analysis.json and analysis.png")


if __name__ == "__main__":
    main()
