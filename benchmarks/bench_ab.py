"""An older commit's statistics pass against the working tree's, interleaved on one GPU (gpu_run.sh's stage compare).

A kernel change moves the vocabulary pass by a point or two of copy bandwidth, less than one do_bench_cudagraph
median varies between calls (on the H200 the same kernel gave 70-87% at N = 4096 within one run). Here both
versions run on the same logits, REPEATS times each, alternating, and the table gives each one's median of the
medians with the spread; the outputs of the two are compared too (identical unless the change meant them to differ).

    python -m benchmarks.bench_ab --prepare HEAD   # here, with git: .baseline/kernels_old/ from that commit's kernels/
    python -m benchmarks.bench_ab                  # on the GPU: writes benchmarks/results/token_stats_ab_cuda_<date>.*

.baseline/ is ignored by git: name it in the device tool's carry (with .whl). gpu_run.sh runs the stage when
.baseline/kernels_old exists; it also runs without an install (STAGES=compare skips the 100 s build).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import REPO, machine_info, print_table, write_results

BASELINE = REPO / ".baseline"
VOCAB = 126464
ROWS = (4096, 256, 16384)
TEMPERATURES = (1.0, 0.0)
REPEATS = 5
COLUMNS = ["N", "T", "old_pct_of_copy", "new_pct_of_copy", "new_vs_old", "old_range", "new_range",
           "outputs_identical"]


def prepare(ref: str, target: Path = BASELINE / "kernels_old") -> None:
    """Write the kernels/ folder of commit `ref` to target (a package: its relative imports hold), and the
    commit's hash to target/REF."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{ref}:kernels"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        source = subprocess.run(["git", "show", f"{ref}:kernels/{name}"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        (target / name).write_text(source)
    (target / "REF").write_text(subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True,
                                               capture_output=True, text=True).stdout)
    print(f"wrote {target} ({len(names)} files of {ref})")


def _percent_range(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def _kernels_without_install() -> None:
    """Make atpo_fast.kernels importable in a bare copy of the repository (the device tool's, before or without
    gpu_run.sh's build stage): it is the repository's kernels/ folder, which only an install maps there."""
    try:
        import atpo_fast.kernels  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO))
        import kernels

        sys.modules["atpo_fast.kernels"] = kernels


def main() -> list[dict]:
    from triton.testing import do_bench_cudagraph

    _kernels_without_install()
    sys.path.insert(0, str(BASELINE))
    from kernels_old.token_stats import softmax_row_stats as old

    from atpo_fast.kernels.token_stats import softmax_row_stats as new
    from benchmarks.bench_token_stats import copy_bandwidth_gbps

    copy_gbps = copy_bandwidth_gbps()
    ref = (BASELINE / "kernels_old" / "REF").read_text().strip()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s; old = {ref}", flush=True)
    table = []
    for rows in ROWS:
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
        megabytes = logits.numel() * logits.element_size() / 1e6
        for temperature in TEMPERATURES:
            versions = {"old": lambda: old(logits, temperature=temperature, seed=5),
                        "new": lambda: new(logits, temperature=temperature, seed=5)}
            outs = {name: fn() for name, fn in versions.items()}
            identical = all(torch.equal(outs["old"][k].nan_to_num(-7), outs["new"][k].nan_to_num(-7))
                            for k in outs["new"])
            pct = {name: [] for name in versions}
            for _ in range(REPEATS):
                for name, fn in versions.items():
                    pct[name].append(100 * megabytes / do_bench_cudagraph(fn, return_mode="median") / copy_gbps)
            old_pct, new_pct = statistics.median(pct["old"]), statistics.median(pct["new"])
            table.append({"N": rows, "T": temperature, "old_pct_of_copy": old_pct, "new_pct_of_copy": new_pct,
                          "new_vs_old": new_pct / old_pct, "old_range": _percent_range(pct["old"]),
                          "new_range": _percent_range(pct["new"]), "outputs_identical": identical})
            print_table(COLUMNS, table[-1:])
    notes = (f"bf16 logits [N, {VOCAB}], standard normal times 3; old = kernels/ of {ref}, new = the working tree. "
             f"Each version's device time of one call from a CUDA graph (do_bench_cudagraph median), {REPEATS} "
             "times each, alternating; pct_of_copy: the median of those, as a percent of a measured device-to-device "
             "copy (bytes read plus written) of the logits' bytes; range: the lowest and highest of the five.")
    write_results("token_stats_ab", "An older statistics pass against the working tree's", COLUMNS, table,
                  machine_info(), notes)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", metavar="REF", help="write .baseline/kernels_old from this commit and stop")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
    else:
        main()
