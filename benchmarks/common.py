"""Shared pieces of the benchmarks: machine description, CPU memory probes, result tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a peak excludes earlier work."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_cpu(fn, repeats: int = 5) -> dict:
    """Median wall time of fn() and its peak resident memory above the state before it.

    One warm-up call runs first, so one-off initialisation stays out of both figures.
    """
    fn()
    reset_peak_rss()
    baseline = rss_bytes("VmRSS")
    seconds = time_cpu(fn, repeats, warmup=False)
    return {"seconds": seconds, "peak_extra_bytes": rss_bytes("VmHWM") - baseline}


def time_cpu(fn, repeats: int = 3, warmup: bool = True) -> float:
    """Median wall time of fn() in seconds, after one warm-up call unless warmup is False."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_interleaved(fns: dict, repeats: int = 9) -> dict:
    """Median seconds of each fn, calls interleaved round-robin so drift hits every variant alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def run_worker(module: str, args: list[str], env: dict | None = None) -> dict:
    """Run `python -m module --worker ...` in a fresh process (so its peak RSS is its own); parse JSON."""
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_in_workers(module: str, args: list[str]) -> dict:
    """Time and peak memory of one variant, each from its own fresh worker process.

    Memory is read with glibc told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_), so
    freed memory leaves the process and resident size follows live memory; otherwise a warm-up's
    freed heap would hide the next call's allocations. Time is read with the default allocator.
    """
    seconds = run_worker(module, args)["seconds"]
    peak = run_worker(module, args, env={"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_extra_bytes"]
    return {"seconds": seconds, "peak_extra_bytes": peak}


def write_results(name: str, title: str, columns: list[str], rows: list[dict], meta: dict, notes: str = "") -> Path:
    """Write benchmarks/results/<name>_<device>_<date>.md and .json; returns the Markdown path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = "cuda" if meta.get("device", "cpu") != "cpu" else "cpu"
    stem = RESULTS_DIR / f"{name}_{device}_{meta['date']}"
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


def parse_args(doc: str, worker_fields: tuple[str, ...] = ()) -> argparse.Namespace:
    """The benchmarks' command line: --quick, and the hidden --worker a parent uses to spawn a process."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, no result files")
    if worker_fields:
        parser.add_argument("--worker", nargs=len(worker_fields), metavar=worker_fields, help=argparse.SUPPRESS)
    return parser.parse_args()
