"""Launch layouts of the vocabulary pass on CUDA, side by side: tile width, warps, prefetch, splits.

What picks the statistics pass's defaults (kernels/utils.py: default_block_v, stats_num_warps, vocab_split), and the
two kernels of kernels/token_stats.py side by side on the same aligned rows, and the default with
its merge kernel launched after a one-program-per-row pass (fuse_merge=False). Device time of one
call replayed from a CUDA graph (do_bench_cudagraph), as a percent of a measured device-to-device
copy of the bf16 logits' bytes (read once), for V = 126464 and N = 256 and 4096: greedy
token_stats (T=0), sampling (T=1) and the log-sum-exp pass of selected_logprobs' forward (lse).
Each layout is passed to softmax_row_stats explicitly; the row marked default is the launch a
caller gets.

    python -m benchmarks.bench_layouts        # CUDA only; writes benchmarks/results/kernel_layouts_cuda_<date>.*
"""

from __future__ import annotations

import torch

from atpo_fast.kernels.token_stats import softmax_row_stats
from benchmarks.bench_token_stats import copy_bandwidth_gbps
from benchmarks.common import machine_info, print_table, write_results

VOCAB = 126464
ROWS = (4096, 256)
# (block_v, num_warps, prefetch, num_splits, lanes, fuse_merge); None takes the default; lanes: the kernel for
# unaligned rows (one max per tile) on these aligned rows, against the default kernel (one max per 16-byte slot);
# fuse_merge False: the merge kernel even where one program covers a row (added at N = 4096)
LAYOUTS = [(None, None, None, None, False, True), (None, None, None, None, True, True),
           (2048, 4, True, None, False, True), (2048, 2, None, None, False, True),
           (2048, 8, None, None, False, True), (4096, 4, None, None, False, True),
           (4096, 8, None, None, False, True), (1024, 4, None, None, False, True),
           (1024, 2, None, None, False, True), (512, 1, None, None, False, True)]
SPLITS_AT_256 = (2, 3, 4, 6, 8)  # programs per row at N = 256 with the default layout otherwise
KINDS = {"T=0": dict(temperature=0.0), "T=1": dict(temperature=1.0, seed=1),
         "lse": dict(top2=False, entropy=False, lse=True)}
COLUMNS = ["kind", "N", "block_v", "num_warps", "prefetch", "num_splits", "lanes", "fuse_merge", "graph_ms",
           "pct_of_copy"]


def main() -> list[dict]:
    from triton.testing import do_bench_cudagraph

    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    table = []
    for rows in ROWS:
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
        targets = torch.randint(0, VOCAB, (rows,), device="cuda")
        layouts = LAYOUTS + ([(None, None, None, s, False, True) for s in SPLITS_AT_256] if rows == 256 else
                             [(None, None, None, None, False, False)])
        for kind, kwargs in KINDS.items():
            if kind == "lse":
                kwargs = dict(kwargs, targets=targets)
            for block_v, num_warps, prefetch, num_splits, lanes, fuse_merge in layouts:
                layout = dict(block_v=block_v, num_warps=num_warps, prefetch=prefetch, num_splits=num_splits)
                chosen = {k: v for k, v in layout.items() if v is not None}
                layout["lanes"] = chosen["lanes"] = lanes
                layout["fuse_merge"] = chosen["fuse_merge"] = fuse_merge
                ms = do_bench_cudagraph(lambda: softmax_row_stats(logits, **kwargs, **chosen), return_mode="median")
                row = {"kind": kind, "N": rows, **{k: "default" if v is None else v for k, v in layout.items()},
                       "graph_ms": ms, "pct_of_copy": 100 * 2 * rows * VOCAB / ms / 1e6 / copy_gbps}
                table.append(row)
                print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
        del logits
    print_table(COLUMNS, table)
    notes = (f"bf16 logits [N, {VOCAB}], standard normal times 3; device time of one call from a CUDA graph "
             f"(median), percent of a measured {copy_gbps:.0f} GB/s device-to-device copy (bytes read plus "
             f"written) of the logits' bytes. 'default' is what softmax_row_stats picks.")
    write_results("kernel_layouts", "Launch layouts of the vocabulary pass", COLUMNS, table, machine_info(),
                  notes)
    return table


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench_layouts measures CUDA launch layouts; no CUDA device here")
    main()
