"""selected_logprobs and fused_linear_logprobs against eager PyTorch: forward+backward time and peak memory.

Eager baselines: log_softmax(logits.float()).gather (selected), and F.linear followed by that
(fused linear); also F.linear followed by selected_logprobs, and liger-kernel's fused linear
cross-entropy where it is installed. CUDA: N=8192, V=126464, D=4096, bf16, timed with do_bench.
CPU: N=2048, V=32000, D=512, float32 and bfloat16, each variant in its own processes.

    python -m benchmarks.bench_logprobs [--quick]
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from atpo_fast import fused_linear_logprobs, selected_logprobs
from atpo_fast.ops.fused_linear_logprobs import IMPLEMENTATION
from benchmarks.common import (machine_info, measure_cpu, measure_in_workers, parse_args, print_table,
                               write_results)

CUDA_SHAPE = dict(n=8192, vocab=126464, dim=4096, dtype=torch.bfloat16)
CPU_SHAPES = [dict(n=2048, vocab=32000, dim=512, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
QUICK_SHAPE = dict(n=256, vocab=32000, dim=256, dtype=torch.float32)


def eager_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _liger_logprobs():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda hidden, weight, targets: -loss(weight, hidden, targets)


def make_case(case: str, n: int, vocab: int, dim: int, dtype: torch.dtype, device: str):
    """Inputs and a dict of variant name -> zero-argument forward+backward closure."""
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
    weights = torch.randn(n, device=device, generator=gen)
    if case == "selected":
        logits = (torch.randn(n, vocab, device=device, generator=gen) * 3).to(dtype).requires_grad_()

        def step(fn):
            def run():  # gradients are freed after each call, so every call allocates them afresh
                (fn(logits, targets) * weights).sum().backward()
                logits.grad = None
            return run

        return {"atpo_fast": step(lambda x, t: selected_logprobs(x, t)), "eager": step(eager_logprobs)}

    hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim ** 0.5).to(dtype).requires_grad_()

    def step(fn):
        def run():
            (fn(hidden, weight, targets) * weights).sum().backward()
            hidden.grad = weight.grad = None
        return run

    variants = {
        "atpo_fast": step(fused_linear_logprobs),
        "F.linear + selected_logprobs": step(lambda h, w, t: selected_logprobs(F.linear(h, w), t)),
        "eager": step(lambda h, w, t: eager_logprobs(F.linear(h, w), t)),
    }
    liger = _liger_logprobs()
    if liger is not None and device == "cuda":
        variants["liger FLCE"] = step(liger)
    return variants


def _worker(case: str, variant: str, shape: dict) -> dict:
    return measure_cpu(make_case(case, **shape, device="cpu")[variant])


def bench_cpu(shape: dict) -> list[dict]:
    rows = []
    for case in ("selected", "fused_linear"):
        names = list(make_case(case, **dict(shape, n=2, vocab=8, dim=4), device="cpu"))
        spec = json.dumps({k: (str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in shape.items()})
        results = {name: measure_in_workers("benchmarks.bench_logprobs", [case, name, spec]) for name in names}
        rows += _rows(case, shape, {k: (r["seconds"] * 1e3, r["peak_extra_bytes"]) for k, r in results.items()})
    return rows


def bench_cuda(shape: dict) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for case in ("selected", "fused_linear"):
        results = {}
        for name, fn in make_case(case, **shape, device="cuda").items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = do_bench(fn, return_mode="median")
            results[name] = (ms, torch.cuda.max_memory_allocated() - base)
        rows += _rows(case, shape, results)
        torch.cuda.empty_cache()
    return rows


def _rows(case: str, shape: dict, results: dict[str, tuple[float, int]]) -> list[dict]:
    eager_ms, eager_bytes = results["eager"]
    logits_bytes = 2 * shape["n"] * shape["vocab"]  # the bf16 logits one would otherwise hold
    out = []
    for name, (ms, peak) in results.items():
        out.append({"op": case, "variant": name, "N": shape["n"], "V": shape["vocab"],
                    "D": shape["dim"] if case == "fused_linear" else "", "dtype": str(shape["dtype"]).split(".")[-1],
                    "fwd+bwd_ms": ms, "peak_extra_MiB": peak / 2**20, "time_vs_eager": ms / eager_ms,
                    "memory_vs_eager": peak / eager_bytes, "peak_vs_2NV": peak / logits_bytes})
    return out


def main() -> None:
    args = parse_args(__doc__, ("CASE", "VARIANT", "SHAPE"))
    if args.worker:
        case, variant, spec = args.worker
        shape = json.loads(spec)
        shape["dtype"] = getattr(torch, shape["dtype"])
        print(json.dumps(_worker(case, variant, shape)))
        return

    meta = machine_info()
    meta["fused_linear_implementation"] = IMPLEMENTATION
    cuda = torch.cuda.is_available() and not args.quick
    if cuda:
        table = bench_cuda(CUDA_SHAPE)
    else:
        table = [row for shape in ([QUICK_SHAPE] if args.quick else CPU_SHAPES) for row in bench_cpu(shape)]
    columns = ["op", "variant", "N", "V", "D", "dtype", "fwd+bwd_ms", "peak_extra_MiB", "time_vs_eager",
               "memory_vs_eager", "peak_vs_2NV"]
    print_table(columns, table)
    if not args.quick:
        notes = ("peak_extra counts everything allocated during forward+backward above the inputs, the "
                 "gradients included. fused_linear_logprobs: " + IMPLEMENTATION + ".")
        path = write_results("logprobs", "Log-prob ops: atpo_fast against PyTorch", columns, table, meta, notes)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
