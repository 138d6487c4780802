"""token_stats against eager PyTorch (and torch.compile on CUDA).

CUDA: median time by triton.testing.do_bench, GB/s from the 2*N*V bytes of bf16 logits, percent
of a measured device-to-device copy, for V = 126464 and N = 64, 256, 4096, 16384.
CPU: time (pytest-benchmark) and peak extra resident memory (a fresh process per variant) of the
chunked torch path against eager at fp32, N = 2048, V = 126464.

    python -m benchmarks.bench_token_stats            # full setting, writes benchmarks/results/
    python -m benchmarks.bench_token_stats --quick    # small CPU setting, no result files
"""

from __future__ import annotations

import torch

from atpo_fast import token_stats
from benchmarks.common import CPU_COLUMNS, machine_info, parse_args, print_table, run_cpu_suite, write_results

VOCAB = 126464
GPU_ROWS = (64, 256, 4096, 16384)


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


def bench_cuda_rows(rows: int, vocab: int, compiled, copy_gbps: float) -> list[dict]:
    """do_bench medians of every variant on bf16 logits [rows, vocab], with GB/s and the share of a copy."""
    from triton.testing import do_bench

    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 3
    bytes_read = 2 * rows * vocab
    variants = {"atpo_fast": lambda: token_stats(logits), "eager": lambda: eager_token_stats(logits),
                "torch.compile": lambda: compiled(logits)}
    table, times = [], {}
    for name, fn in variants.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times[name] = do_bench(fn, return_mode="median")
        table.append({"variant": name, "N": rows, "V": vocab, "dtype": "bfloat16", "time_ms": times[name],
                      "GB/s": bytes_read / times[name] / 1e6, "copy_GB/s": copy_gbps,
                      "pct_of_copy": 100 * bytes_read / times[name] / 1e6 / copy_gbps,
                      "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20})
    for row in table:
        row["speedup_vs_eager"] = times["eager"] / row["time_ms"]
        row["speedup_vs_compile"] = times["torch.compile"] / row["time_ms"]
    return table


def bench_cuda(rows_list=GPU_ROWS, vocab: int = VOCAB) -> list[dict]:
    copy_gbps = copy_bandwidth_gbps()
    compiled = torch.compile(eager_token_stats)
    return [row for rows in rows_list for row in bench_cuda_rows(rows, vocab, compiled, copy_gbps)]


def main() -> None:
    args = parse_args(__doc__)
    if torch.cuda.is_available() and not args.quick:
        table = bench_cuda()
        columns = ["variant", "N", "V", "dtype", "time_ms", "GB/s", "pct_of_copy", "copy_GB/s", "peak_extra_MiB",
                   "speedup_vs_eager", "speedup_vs_compile"]
    else:
        table, columns = run_cpu_suite(["bench_token_stats"], args.quick), CPU_COLUMNS
    print_table(columns, table)
    if not args.quick:
        path = write_results("token_stats", "token_stats: atpo_fast against PyTorch", columns, table, machine_info())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
