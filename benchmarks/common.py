"""Shared pieces of the benchmarks: machine description, CPU memory probes, result tables."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("ATPO_RESULTS_DIR", REPO / "benchmarks" / "results"))  # gpu_run.sh: $OUT


def machine_info() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident set size (VmRSS) or its peak (VmHWM) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_bytes(fn) -> int:
    """Peak resident memory of fn() above the state before it, after one warm-up call (Linux).

    Run it in a process started with MALLOC_MMAP_THRESHOLD_ set (see memory_in_worker), so that
    freed memory leaves the process and resident size follows live memory.
    """
    fn()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = rss_bytes("VmRSS")
    fn()
    return rss_bytes("VmHWM") - baseline


def cuda_peak_extra_bytes(fn) -> int:
    """Peak CUDA memory of one fn() call above what was allocated before it, after a warm-up call.

    Measured outside triton.testing.do_bench, whose own 256 MiB cache-flush buffer would count.
    """
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_in_worker(module: str, case: str, variant: str, quick: bool) -> int:
    """Peak extra bytes of one CPU case, measured in a fresh process (benchmarks.worker)."""
    args = [sys.executable, "-m", "benchmarks.worker", module, case, variant] + (["--quick"] if quick else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {module} {case} {variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def pytest_benchmark_times(modules: list[str], quick: bool) -> dict[tuple[str, str, str], float]:
    """Median seconds of every CPU case of `modules`, timed by pytest-benchmark in one pytest run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        # without the variables of an xdist worker this may run in: pytest-benchmark turns itself off under them
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
               "ATPO_BENCH_MODULES": ",".join(modules), "ATPO_BENCH_QUICK": "1" if quick else "0"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_cpu_kernels.py", "-q",
                               "-p", "no:cacheprovider", f"--benchmark-json={out}"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.stat().st_size:  # pytest-benchmark writes nothing when it times nothing
            raise RuntimeError(f"pytest-benchmark run failed or timed nothing:\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-2000:]}")
        report = json.loads(out.read_text())
    return {tuple(b["extra_info"][k] for k in ("module", "case", "variant")): b["stats"]["median"]
            for b in report["benchmarks"]}


def run_cpu_suite(modules: list[str], quick: bool) -> list[dict]:
    """Rows of every CPU case: median time (pytest-benchmark) and peak extra memory (a fresh process each,
    os.cpu_count() of them at a time: each reads its own peak), with ratios against the case's first variant,
    measured in this same run.

    Each module defines cpu_cases(quick) -> {case: (variant names, build)}, where build() makes the
    inputs and returns {variant: zero-argument callable}; the first variant is the baseline.
    """
    start = time.perf_counter()
    times = pytest_benchmark_times(modules, quick)
    timed_s, start = time.perf_counter() - start, time.perf_counter()
    cases = [(module, case, variants) for module in modules
             for case, (variants, _) in importlib.import_module(f"benchmarks.{module}").cpu_cases(quick).items()]
    jobs = [(module, case, v) for module, case, variants in cases for v in variants]
    # a worker took 2.4 s on 2 CPU cores, over half of it starting up (importing torch and Triton: 1.3 s)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        memory = dict(zip(jobs, pool.map(lambda job: memory_in_worker(*job, quick), jobs)))
    rows = []
    for module, case, variants in cases:
        base = variants[0]
        for v in variants:
            seconds, peak, base_peak = times[(module, case, v)], memory[(module, case, v)], memory[(module, case, base)]
            rows.append({"case": case, "variant": v, "time_ms": seconds * 1e3, "peak_extra_MiB": peak / 2**20,
                         "baseline": base, "speedup": times[(module, case, base)] / seconds,
                         "memory_vs_baseline": memory_ratio(peak, base_peak)})
    print(f"pytest-benchmark timings {timed_s:.0f} s, peak memory of {len(rows)} variants (a process each) "
          f"{time.perf_counter() - start:.0f} s")
    return rows


def memory_ratio(peak: int, baseline_peak: int) -> float:
    """peak / baseline_peak; 1 when both are 0 (a small case can allocate nothing the process does not
    already hold), NaN when only the baseline is 0 (no ratio to report, rather than a misleading 0)."""
    if baseline_peak > 0:
        return peak / baseline_peak
    return 1.0 if peak == 0 else float("nan")


CPU_COLUMNS = ["case", "variant", "time_ms", "peak_extra_MiB", "baseline", "speedup", "memory_vs_baseline"]


def time_interleaved(fns: dict, repeats: int = 10) -> dict:
    """Median seconds of each fn, calls interleaved round-robin (the order reversed every other round)
    so that drift and order effects hit every variant alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in (list(fns.items()) if round_ % 2 == 0 else list(fns.items())[::-1]):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def write_results(name: str, title: str, columns: list[str], rows: list[dict], meta: dict, notes: str = "",
                  results_dir: Path = RESULTS_DIR) -> Path:
    """Write <results_dir>/<name>_<device>_<date>.md and .json and say so; returns the Markdown path.
    A second run on the same day writes <...>_<date>_run2 (run3, ...): the day's earlier tables, committed
    or not, are never overwritten."""
    results_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if meta.get("device", "cpu") != "cpu" else "cpu"
    first = results_dir / f"{name}_{device}_{meta['date']}"
    stem, run = first, 1
    while stem.with_suffix(".md").exists() or stem.with_suffix(".json").exists():
        run += 1
        stem = first.with_name(f"{first.name}_run{run}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in meta.items()), ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    path = stem.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(columns: list[str], rows: list[dict]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def parse_args(doc: str) -> argparse.Namespace:
    """The benchmarks' command line: --quick (small shapes, no result files)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, no result files")
    return parser.parse_args()
