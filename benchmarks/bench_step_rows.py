"""build_step_rows: the C++/CUDA extension against the vectorised torch fallback and a Python-loop builder.

Shape: B = 64 sequences of L = 1024 tokens (a 256-token prompt, 768 generated over T = 256 steps),
k = 64 selected intervals per sequence (4096 rows). The Python-loop builder is how dLLM RL code
commonly builds rows today: a loop over (sequence, interval) with a few torch ops per row.

    python -m benchmarks.bench_step_rows [--quick]
"""

from __future__ import annotations

import torch

from atpo_fast import build_step_rows, reference
from atpo_fast.ops.step_rows import native_extension
from benchmarks.common import CPU_COLUMNS, machine_info, parse_args, print_table, run_cpu_suite, write_results

MASK_ID = 126336


def make_inputs(batch: int, length: int, prompt: int, steps: int, slots: int, device: str):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MASK_ID, (batch, length), generator=gen)
    step_map = torch.full((batch, length), -1, dtype=torch.int64)
    step_map[:, prompt:] = torch.randint(0, steps, (batch, length - prompt), generator=gen)
    bounds = torch.sort(torch.randint(0, steps + 1, (batch, slots + 1), generator=gen), dim=1).values
    starts, ends = bounds[:, :-1].contiguous(), bounds[:, 1:].contiguous()
    return [t.to(device) for t in (tokens, step_map, starts, ends)]


FULL = dict(batch=64, length=1024, prompt=256, steps=256, slots=64)
QUICK = dict(batch=8, length=256, prompt=64, steps=64, slots=16)
VARIANTS = ("torch fallback", "atpo_fast native", "python loop")


def variants(shape: dict, device: str) -> dict:
    inputs = make_inputs(**shape, device=device)
    return {"torch fallback": lambda: build_step_rows(*inputs, MASK_ID, backend="torch"),
            "atpo_fast native": lambda: build_step_rows(*inputs, MASK_ID, backend="native"),
            "python loop": lambda: reference.step_rows(*inputs, MASK_ID)}


def cpu_cases(quick: bool) -> dict:
    """The extension against the torch fallback (the baseline) and a Python loop (see run_cpu_suite)."""
    shape = QUICK if quick else FULL
    name = f"step_rows B={shape['batch']} L={shape['length']} k={shape['slots']}"
    return {name: (VARIANTS, lambda: variants(shape, "cpu"))}


def check_same_rows(fns: dict) -> None:
    reference = fns["torch fallback"]()
    for name, fn in fns.items():  # every variant builds the same rows
        assert all(torch.equal(a, b) for a, b in zip(fn(), reference)), name


def bench_cuda(shape: dict) -> list[dict]:
    from triton.testing import do_bench

    fns = variants(shape, "cuda")
    check_same_rows(fns)
    times = {name: do_bench(fn, return_mode="median") for name, fn in fns.items()}
    return [{"case": f"step_rows B={shape['batch']} L={shape['length']} k={shape['slots']}", "variant": name,
             "time_ms": ms, "baseline": "torch fallback", "speedup": times["torch fallback"] / ms}
            for name, ms in times.items()]


def main() -> None:
    args = parse_args(__doc__)
    if native_extension() is None:
        raise SystemExit("atpo_fast._C is not built; install with `pip install --no-build-isolation -e .`")
    shape = QUICK if args.quick else FULL
    check_same_rows(variants(shape, "cpu"))
    table = run_cpu_suite(["bench_step_rows"], args.quick)
    if torch.cuda.is_available() and native_extension().with_cuda:
        table += bench_cuda(shape)
    print_table(CPU_COLUMNS, table)
    if not args.quick:
        write_results("step_rows", "build_step_rows: extension against torch and a Python loop", CPU_COLUMNS,
                      table, machine_info())


if __name__ == "__main__":
    main()
