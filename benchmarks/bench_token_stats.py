"""token_stats against eager PyTorch (and torch.compile on CUDA).

CUDA: median time by triton.testing.do_bench (as a Python caller sees it, launch overhead included)
and by do_bench_cudagraph (device time: the call replayed from a CUDA graph; for atpo_fast the
median of GRAPH_REPEATS such medians), each as a percent of a measured device-to-device copy of
the 2*N*V bytes of bf16 logits, for V = 126464 and N = 64, 256, 4096, 16384; atpo_fast greedy
(T=0) and sampling (T=1, a fixed seed).
CPU: time (pytest-benchmark) and peak extra resident memory (a fresh process per variant) of the
chunked torch path against eager at fp32, N = 2048, V = 126464.

    python -m benchmarks.bench_token_stats            # full setting, writes benchmarks/results/
    python -m benchmarks.bench_token_stats --quick    # small CPU setting, no result files
"""

from __future__ import annotations

import statistics

import torch

from atpo_fast import token_stats
from benchmarks.common import (CPU_COLUMNS, cuda_peak_extra_bytes, machine_info, parse_args, print_table,
                               run_cpu_suite, write_results)

VOCAB = 126464
GPU_ROWS = (64, 256, 4096, 16384)
GRAPH_REPEATS = 5


def eager_token_stats(logits: torch.Tensor):
    """The plain PyTorch way: materialise the fp32 softmax, then reduce it."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    top = p.topk(2, dim=-1)
    argmax = top.indices[..., 0]
    return entropy, top.values[..., 0], top.values[..., 0] - top.values[..., 1], argmax, p.gather(-1, argmax[..., None])


def cpu_cases(quick: bool) -> dict:
    """The CPU case: the chunked torch path against eager at fp32 (see benchmarks.common.run_cpu_suite)."""
    rows = 256 if quick else 2048

    def build():
        logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
        return {"eager": lambda: eager_token_stats(logits), "atpo_fast": lambda: token_stats(logits, backend="torch")}

    return {f"token_stats N={rows} V={VOCAB} float32": (("eager", "atpo_fast"), build)}


def copy_bandwidth_gbps() -> float:
    """A measured device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6


def eager_sample(logits: torch.Tensor, temperature: float):
    """The plain PyTorch way to sample with the statistics: a tempered fp32 softmax and torch.multinomial."""
    stats = eager_token_stats(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return stats, torch.multinomial(probs, 1)


def bench_cuda_rows(rows: int, vocab: int, compiled, copy_gbps: float) -> list[dict]:
    """do_bench medians of every variant on bf16 logits [rows, vocab], with GB/s and the share of a copy.

    atpo_fast runs greedy (T=0) and sampling (T=1); eager and torch.compile compute the statistics
    only, and "eager T=1" adds a tempered softmax and torch.multinomial. `compiled` may be None.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 3
    bytes_read = 2 * rows * vocab
    variants = {"atpo_fast T=0": lambda: token_stats(logits, temperature=0.0),
                "atpo_fast T=1": lambda: token_stats(logits, temperature=1.0, seed=1),
                "eager": lambda: eager_token_stats(logits), "eager T=1": lambda: eager_sample(logits, 1.0)}
    if compiled is not None:
        variants["torch.compile"] = lambda: compiled(logits)
    table, times = [], {}
    for name, fn in variants.items():
        peak = cuda_peak_extra_bytes(fn)
        times[name] = do_bench(fn, return_mode="median")
        try:  # device time alone: the calls replayed from a CUDA graph, without Python's launch overhead; the
            # kernels' own median of GRAPH_REPEATS (one such median of the same kernel ranged 70-87% of a copy at
            # N = 4096 within one H200 run: token_stats_ab_cuda_2026-11-28)
            repeats = GRAPH_REPEATS if name.startswith("atpo_fast") else 1
            graph_ms = statistics.median(do_bench_cudagraph(fn, return_mode="median") for _ in range(repeats))
        except Exception:  # noqa: BLE001 - a variant that cannot be captured gets no graph time
            graph_ms = float("nan")
        table.append({"variant": name, "N": rows, "V": vocab, "dtype": "bfloat16", "time_ms": times[name],
                      "graph_ms": graph_ms, "copy_GB/s": copy_gbps,
                      "pct_of_copy": 100 * bytes_read / times[name] / 1e6 / copy_gbps,
                      "graph_pct_of_copy": 100 * bytes_read / graph_ms / 1e6 / copy_gbps,
                      "peak_extra_MiB": peak / 2**20})
    for row in table:
        row["speedup_vs_eager"] = times["eager"] / row["time_ms"]
        print(f"token_stats N={rows} V={vocab} {row['variant']}: {row['time_ms']:.4f} ms "
              f"({row['pct_of_copy']:.1f}% of copy), graph {row['graph_ms']:.4f} ms "
              f"({row['graph_pct_of_copy']:.1f}%)", flush=True)
    return table


def bench_cuda(rows_list=GPU_ROWS, vocab: int = VOCAB) -> list[dict]:
    """Every row count; torch.compile (one dynamic-shape compile) joins unless ATPO_BENCH_NO_COMPILE=1."""
    import os

    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    compiled = None
    if os.environ.get("ATPO_BENCH_NO_COMPILE") != "1":
        compiled = torch.compile(eager_token_stats, dynamic=True)
    return [row for rows in rows_list for row in bench_cuda_rows(rows, vocab, compiled, copy_gbps)]


def main() -> None:
    args = parse_args(__doc__)
    if torch.cuda.is_available() and not args.quick:
        table = bench_cuda()
        columns = ["variant", "N", "V", "dtype", "time_ms", "pct_of_copy", "graph_ms", "graph_pct_of_copy",
                   "copy_GB/s", "peak_extra_MiB", "speedup_vs_eager"]
    else:
        table, columns = run_cpu_suite(["bench_token_stats"], args.quick), CPU_COLUMNS
    print_table(columns, table)
    if not args.quick:
        write_results("token_stats", "token_stats: atpo_fast against PyTorch", columns, table, machine_info())


if __name__ == "__main__":
    main()
