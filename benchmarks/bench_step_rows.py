"""build_step_rows: the C++/CUDA extension against the vectorised torch fallback and a Python-loop builder.

Shape: B = 64 sequences of L = 1024 tokens (a 256-token prompt, 768 generated over T = 256 steps),
k = 64 selected intervals per sequence (4096 rows). The Python-loop builder is how dLLM RL code
commonly builds rows today: a loop over (sequence, interval) with a few torch ops per row.

    python -m benchmarks.bench_step_rows [--quick]
"""

from __future__ import annotations

import torch

from atpo_fast import build_step_rows
from atpo_fast.ops.step_rows import StepRows, native_extension
from benchmarks.common import machine_info, parse_args, print_table, time_cpu, write_results

MASK_ID = 126336


def make_inputs(batch: int, length: int, prompt: int, steps: int, slots: int, device: str):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MASK_ID, (batch, length), generator=gen)
    step_map = torch.full((batch, length), -1, dtype=torch.int64)
    step_map[:, prompt:] = torch.randint(0, steps, (batch, length - prompt), generator=gen)
    bounds = torch.sort(torch.randint(0, steps + 1, (batch, slots + 1), generator=gen), dim=1).values
    starts, ends = bounds[:, :-1].contiguous(), bounds[:, 1:].contiguous()
    return [t.to(device) for t in (tokens, step_map, starts, ends)]


def python_loop_builder(tokens, step_map, starts, ends, mask_id) -> StepRows:
    """A loop over (sequence, interval) with per-row torch ops."""
    input_ids, target_mask, seq_index, step_start = [], [], [], []
    for b in range(tokens.shape[0]):
        for s, e in zip(starts[b].tolist(), ends[b].tolist()):
            if s == -1:
                continue
            ids = tokens[b].clone()
            ids[step_map[b] >= s] = mask_id
            input_ids.append(ids)
            target_mask.append((step_map[b] >= s) & (step_map[b] < e))
            seq_index.append(b)
            step_start.append(s)
    input_ids, target_mask = torch.stack(input_ids), torch.stack(target_mask)
    seq_index = torch.tensor(seq_index, device=tokens.device)
    target_row, target_pos = target_mask.nonzero(as_tuple=True)
    return StepRows(input_ids, target_mask, seq_index, torch.tensor(step_start, device=tokens.device), target_row,
                    target_pos, tokens[seq_index[target_row], target_pos])


def run(shape: dict, device: str) -> list[dict]:
    inputs = make_inputs(**shape, device=device)
    variants = {
        "atpo_fast native": lambda: build_step_rows(*inputs, MASK_ID, backend="native"),
        "torch fallback": lambda: build_step_rows(*inputs, MASK_ID, backend="torch"),
        "python loop": lambda: python_loop_builder(*inputs, MASK_ID),
    }
    reference = variants["torch fallback"]()
    for name, fn in variants.items():  # every variant builds the same rows
        assert all(torch.equal(a, b) for a, b in zip(fn(), reference)), name
    if device == "cuda":
        from triton.testing import do_bench

        times = {name: do_bench(fn, return_mode="median") for name, fn in variants.items()}
    else:
        times = {name: time_cpu(fn, repeats=5) * 1e3 for name, fn in variants.items()}
    rows, targets = reference.input_ids.shape[0], reference.target_row.shape[0]
    return [{"variant": name, "device": device, "B": shape["batch"], "L": shape["length"], "k": shape["slots"],
             "rows": rows, "targets": targets, "time_ms": ms, "speedup_vs_torch": times["torch fallback"] / ms,
             "speedup_vs_loop": times["python loop"] / ms} for name, ms in times.items()]


def main() -> None:
    args = parse_args(__doc__)
    if native_extension() is None:
        raise SystemExit("atpo_fast._C is not built; install with `pip install --no-build-isolation -e .`")
    shape = dict(batch=64, length=1024, prompt=256, steps=256, slots=64)
    if args.quick:
        shape = dict(batch=8, length=256, prompt=64, steps=64, slots=16)
    table = run(shape, "cpu")
    if torch.cuda.is_available() and native_extension().with_cuda:
        table += run(shape, "cuda")
    columns = ["variant", "device", "B", "L", "k", "rows", "targets", "time_ms", "speedup_vs_torch", "speedup_vs_loop"]
    print_table(columns, table)
    if not args.quick:
        path = write_results("step_rows", "build_step_rows: extension against torch and a Python loop", columns, table,
                             machine_info())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
