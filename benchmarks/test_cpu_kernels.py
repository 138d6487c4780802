"""CPU timings of every benchmark case with pytest-benchmark (run by benchmarks.common.run_cpu_suite).

Not part of the test suite: `pytest benchmarks/test_cpu_kernels.py --benchmark-json=out.json`, with
ATPO_BENCH_MODULES (comma-separated benchmark modules) and ATPO_BENCH_QUICK=1 for small shapes.
"""

import functools
import importlib
import os

import pytest

QUICK = os.environ.get("ATPO_BENCH_QUICK") == "1"
MODULES = os.environ.get("ATPO_BENCH_MODULES", "bench_token_stats,bench_logprobs,bench_step_rows,bench_sampler")
CASES = {(m, case): spec for m in MODULES.split(",")
         for case, spec in importlib.import_module(f"benchmarks.{m}").cpu_cases(QUICK).items()}


@functools.lru_cache(maxsize=1)
def built(module: str, case: str) -> dict:
    """The case's inputs and callables, built once for all its variants (one case held at a time)."""
    return CASES[(module, case)][1]()


@pytest.mark.parametrize("module,case,variant", [(m, c, v) for (m, c), (vs, _) in CASES.items() for v in vs],
                         ids=lambda x: str(x).replace(" ", "_"))
def test_cpu_case(benchmark, module, case, variant):
    benchmark.extra_info.update(module=module, case=case, variant=variant)
    benchmark.pedantic(built(module, case)[variant], rounds=3 if QUICK else 5, warmup_rounds=1, iterations=1)
