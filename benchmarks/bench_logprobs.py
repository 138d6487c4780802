"""selected_logprobs and fused_linear_logprobs against eager PyTorch: forward+backward time and peak memory.

Eager baselines: log_softmax(logits.float()).gather (selected), and F.linear followed by that
(fused linear); also F.linear followed by selected_logprobs, both with the LM head frozen too (only
hidden gets a gradient, as under LoRA), and liger-kernel's fused linear cross-entropy and
cut-cross-entropy where they are installed. CUDA: N=8192, V=126464, D=4096, bf16, timed with do_bench.
CPU: N=2048, V=32000, D=512, float32 and bfloat16 (fused linear in float32 only): time by
pytest-benchmark, peak memory in a fresh process per variant.

    python -m benchmarks.bench_logprobs [--quick]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from atpo_fast import fused_linear_logprobs, selected_logprobs
from benchmarks.common import (CPU_COLUMNS, cuda_peak_extra_bytes, machine_info, memory_in_worker, parse_args,
                               print_table, run_cpu_suite, time_interleaved, write_results)

CUDA_SHAPE = dict(n=8192, vocab=126464, dim=4096, dtype=torch.bfloat16)
CPU_SHAPES = [dict(n=2048, vocab=32000, dim=512, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
QUICK_SHAPE = dict(n=256, vocab=32000, dim=256, dtype=torch.float32)
FROZEN = ("atpo_fast, frozen head", "F.linear + selected_logprobs, frozen head")


def eager_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _liger_logprobs():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda hidden, weight, targets: -loss(weight, hidden, targets)


def _liger_selected():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss(reduction="none")
    return lambda logits, targets: -loss(logits, targets)


def _cce_logprobs():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda hidden, weight, targets: -linear_cross_entropy(hidden, weight, targets, reduction="none")


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

        variants = {"atpo_fast": step(lambda x, t: selected_logprobs(x, t)), "eager": step(eager_logprobs)}
        liger = _liger_selected()
        if liger is not None and device == "cuda":
            variants["liger CE"] = step(liger)
        return variants

    hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim ** 0.5).to(dtype).requires_grad_()

    def step(fn):
        def run():
            (fn(hidden, weight, targets) * weights).sum().backward()
            hidden.grad = weight.grad = None
        return run

    frozen = weight.detach()  # a frozen LM head (LoRA): only hidden gets a gradient
    variants = {
        "atpo_fast": step(fused_linear_logprobs),
        "F.linear + selected_logprobs": step(lambda h, w, t: selected_logprobs(F.linear(h, w), t)),
        "eager": step(lambda h, w, t: eager_logprobs(F.linear(h, w), t)),
        FROZEN[0]: step(lambda h, w, t: fused_linear_logprobs(h, frozen, t)),
        FROZEN[1]: step(lambda h, w, t: selected_logprobs(F.linear(h, frozen), t)),
    }
    liger = _liger_logprobs()
    if liger is not None and device == "cuda":
        variants["liger FLCE"] = step(liger)
    cce = _cce_logprobs()
    if cce is not None and device == "cuda":
        variants["cut-cross-entropy"] = step(cce)
    return variants


def _shape_name(case: str, shape: dict) -> str:
    dim = f" D={shape['dim']}" if case == "fused_linear" else ""
    return f"{case} N={shape['n']} V={shape['vocab']}{dim} {str(shape['dtype']).split('.')[-1]}"


def cpu_cases(quick: bool) -> dict:
    """Forward+backward of both ops against eager, per CPU shape (see benchmarks.common.run_cpu_suite)."""
    variants = {"selected": ("eager", "atpo_fast"),
                "fused_linear": ("eager", "atpo_fast", "F.linear + selected_logprobs", *FROZEN)}
    # fused_linear in float32 only: on a CPU without AVX-512 (this project's machine) torch 2.13 runs bf16
    # GEMMs ~100x slower than float32 ones (F.linear + selected_logprobs forward+backward at the CPU shape:
    # 164 s), so a bf16 row would time that path and hold the suite for hours
    return {_shape_name(case, shape): (variants[case], functools.partial(make_case, case, **shape, device="cpu"))
            for shape in ([QUICK_SHAPE] if quick else CPU_SHAPES) for case in variants
            if case == "selected" or shape["dtype"] == torch.float32}


def fused_cpu_interleaved(shape: dict = CPU_SHAPES[0], repeats: int = 5) -> None:
    """fused_linear_logprobs against F.linear + selected_logprobs on CPU, trainable and frozen head,
    forward+backward timed interleaved in one process (a few minutes; the full CPU suite takes longer).

        python -c "from benchmarks.bench_logprobs import fused_cpu_interleaved as f; f()"
    """
    fns = make_case("fused_linear", **shape, device="cpu")
    times = time_interleaved({name: fns[name] for name in ("F.linear + selected_logprobs", "atpo_fast", *FROZEN)},
                             repeats)
    baseline = {"atpo_fast": "F.linear + selected_logprobs", FROZEN[0]: FROZEN[1]}
    case = _shape_name("fused_linear", shape)
    peaks = {name: memory_in_worker("bench_logprobs", case, name, False) for name in (*times, "eager")}
    rows = [{"case": case, "variant": name, "time_ms": t * 1e3,
             "vs_unfused": t / times[baseline[name]] if name in baseline else 1.0,
             "peak_extra_MiB": peaks[name] / 2**20, "memory_vs_eager": peaks[name] / peaks["eager"]}
            for name, t in times.items()]
    columns = ["case", "variant", "time_ms", "vs_unfused", "peak_extra_MiB", "memory_vs_eager"]
    print_table(columns, rows)
    notes = (f"Median of {repeats} forward+backward calls each, the variants interleaved in one process "
             "(benchmarks.common.time_interleaved); vs_unfused: time over F.linear + selected_logprobs' with "
             "the same head (trainable, or frozen: only hidden gets a gradient). Peak extra memory in a fresh "
             "process per variant, gradients included; memory_vs_eager: against F.linear + log_softmax's.")
    write_results("logprobs_fused", "fused_linear_logprobs against F.linear + selected_logprobs", columns,
                  rows, machine_info(), notes)


def bench_cuda(shape: dict) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for case in ("selected", "fused_linear"):
        results = {}
        for name, fn in make_case(case, **shape, device="cuda").items():
            try:
                fn()
            except Exception as error:  # a baseline library that fails here is reported, not fatal
                print(f"{case} {name}: failed: {type(error).__name__}: {error}", flush=True)
                continue
            peak = cuda_peak_extra_bytes(fn)
            ms = do_bench(fn, return_mode="median")
            results[name] = (ms, peak)
            print(f"{case} {name}: {ms:.3f} ms fwd+bwd", flush=True)
        rows += _rows(case, shape, results)
        torch.cuda.empty_cache()
    return rows


def _rows(case: str, shape: dict, results: dict[str, tuple[float, int]]) -> list[dict]:
    eager_ms, eager_bytes = results["eager"]
    logits_bytes = 2 * shape["n"] * shape["vocab"]  # the bf16 logits one would otherwise hold
    return [{"case": _shape_name(case, shape), "variant": name, "fwd+bwd_ms": ms, "peak_extra_MiB": peak / 2**20,
             "time_vs_eager": ms / eager_ms, "memory_vs_eager": peak / eager_bytes, "peak_vs_2NV": peak / logits_bytes}
            for name, (ms, peak) in results.items()]


def main() -> None:
    args = parse_args(__doc__)
    if torch.cuda.is_available() and not args.quick:
        table = bench_cuda(CUDA_SHAPE)
        columns = ["case", "variant", "fwd+bwd_ms", "peak_extra_MiB", "time_vs_eager", "memory_vs_eager", "peak_vs_2NV"]
    else:
        table, columns = run_cpu_suite(["bench_logprobs"], args.quick), CPU_COLUMNS
    print_table(columns, table)
    if not args.quick:
        meta = machine_info()
        notes = ("Peak extra memory counts everything allocated during forward+backward above the inputs, the "
                 "gradients included. fused_linear_logprobs: chunked GEMMs in hidden's dtype, one pass per logits "
                 "tile (Triton on CUDA, torch ops on CPU).")
        write_results("logprobs", "Log-prob ops: atpo_fast against PyTorch", columns, table, meta, notes)


if __name__ == "__main__":
    main()
