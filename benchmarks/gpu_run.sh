#!/usr/bin/env bash
# One call on a CUDA machine (no network), ordered by value and bounded in time (BUDGET seconds,
# default 540, under the device's 10-minute limit). STAGES picks stages (default: all, in order):
#   build     environment, the extension with its CUDA sources (falls back to the CPU build)
#   smoke     CUDA correctness of every op against float64 (at most SMOKE_S=150 s)
#   compare   when .baseline/kernels_old exists (python -m benchmarks.bench_ab --prepare <ref>, before the call): that
#             commit's statistics pass against this one, interleaved
#   native    atpo-train (configs/llada_lora.yaml) on a LLaDA-layout folder at LLaDA-8B's shape, random weights,
#             loaded natively (16 GB written to $ATPO_NATIVE_DIR or /tmp first)
#   tokens    token_stats bf16, N = 64..16384, T = 0 and 1, against eager and torch.compile, % of a copy
#   layouts   the vocabulary pass's launch layouts side by side (tile, warps, prefetch, splits)
#   rollout   generate's cache modes none / prefix / dual at LLaDA-8B's shape (random weights), batch 64
#   memory    one iteration at LLaDA-8B's shape, LoRA r=64 and full, at the memory model's largest micro-batch
#   logprobs  selected_logprobs and fused_linear_logprobs against eager, Liger-Kernel, cut-cross-entropy
#   rows      build_step_rows, extension against the torch fallback
#   tests     the whole CUDA test suite (or TESTS="<files or test ids>": a file runs on one worker), with the time left
# Logs and tables go to $OUT (default benchmarks/results) as each stage ends, so a run cut off still
# returns them. With PACK=<file.tgz> the folder is also packed into that one file as each stage
# begins and at the end (the device tool returns at most 8 files). PACK comes first, so that its $OUT is
# the device tool's folder (bash expands later assignments with the earlier ones already made):
#   PACK=$OUT/gpu_results.tgz OUT=/tmp/gpu bash benchmarks/gpu_run.sh
# Baseline libraries travel as wheels in .whl/ (ignored by git; carry it):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel cut-cross-entropy
#   bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-540}
STAGES=${STAGES:-build smoke compare native tokens layouts rollout memory logprobs rows tests}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ATPO_RESULTS_DIR="$OUT" MAX_JOBS=${MAX_JOBS:-16}
left() { echo $((BUDGET - ($(date +%s) - START))); }
pack() { if [ -n "${PACK:-}" ]; then tar czf "$PACK.part" -C "$OUT" . && mv "$PACK.part" "$PACK"; fi; }
want() { pack; [[ " $STAGES " == *" $1 "* ]] && [ "$(left)" -gt 20 ] && echo "== $1 ($(($(date +%s) - START)) s in, $(left) s left)"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
if want build; then
    python3 - <<'PY' | tee "$OUT/gpu_env.txt"
import importlib, torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
for name in ("liger_kernel", "cut_cross_entropy", "peft"):
    try:
        importlib.import_module(name)
        print(name, "available")
    except Exception as error:
        print(name, "unavailable:", type(error).__name__)
PY
    # --use-pep517: the legacy `setup.py develop` path would fetch setuptools, and there is no network
    if ! python3 -m pip install -v --use-pep517 --no-build-isolation --no-deps -e . >"$OUT/gpu_build.log" 2>&1; then
        grep -n -i -A6 "error" "$OUT/gpu_build.log" | head -40
        echo "build with CUDA sources failed (log: gpu_build.log); building the CPU extension instead"
        ATPO_FAST_NO_CUDA=1 python3 -m pip install -q --use-pep517 --no-build-isolation --no-deps -e . 2>&1 | tail -20
    fi
    python3 -c "import torch, atpo_fast._C as C; print('extension with CUDA:', C.with_cuda)" | tee -a "$OUT/gpu_env.txt"
fi
if want smoke; then
    # SIGINT at the limit: pytest still prints its summary (how many passed before the cut)
    timeout -s INT -k 5 "${SMOKE_S:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_token_stats.py \
        tests/test_logprobs.py tests/test_step_stats.py tests/test_step_rows.py 2>&1 | tee "$OUT/gpu_smoke.log" | tail -15
fi
if [ -d .baseline/kernels_old ] && want compare; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_ab 2>&1 | tee "$OUT/gpu_compare.log" | tail -12
fi
if want native; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_native 2>&1 | grep -v '^\[transformers\]' \
        | tee "$OUT/gpu_native.log" | tail -12
fi
if want tokens; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_token_stats 2>&1 | tee "$OUT/gpu_tokens.log" | tail -25
fi
if want layouts; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_layouts 2>&1 | tee "$OUT/gpu_layouts.log" | tail -8
fi
if want rollout; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_rollout 2>&1 | tee "$OUT/gpu_rollout.log" | tail -12
fi
if want memory; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_memory 2>&1 | tee "$OUT/gpu_memory.log" | tail -16
fi
if want logprobs; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_logprobs 2>&1 | tee "$OUT/gpu_logprobs.log" | tail -20
fi
if want rows; then
    timeout $(( $(left) - 10 )) python3 -m benchmarks.bench_step_rows 2>&1 | tee "$OUT/gpu_rows.log" | tail -8
fi
if want tests; then
    # SIGINT at the time limit: pytest then still prints the tracebacks of the failures so far. The two
    # ignored files check the CPU machine's stand-ins for this image's Triton 3.6 and transformers 5.17.
    # pytest-xdist, where the image has it, spreads the files over 8 workers (one file per worker: the torchrun
    # test keeps its port to itself).
    python3 -c "import xdist" 2>/dev/null && PARALLEL="-n 8 --dist loadfile" || PARALLEL=""
    # The deselected test checks a CPU library's first exp in 12 fresh processes: 124 s of GPU time on the H200.
    # gpu_tests.xml (JUnit, written also when the limit cuts the run) names every test that ran, so a cut run
    # shows which did not
    timeout -s INT -k 5 $(( $(left) - 15 )) python3 -m pytest -q -rfE --tb=short -p no:cacheprovider $PARALLEL ${TESTS:-tests} \
        --junitxml "$OUT/gpu_tests.xml" \
        --ignore=tests/test_compile.py --ignore=tests/test_transformers_517.py \
        --deselect tests/test_token_stats.py::test_first_cpu_exp_after_import_is_accurate 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -40
fi
echo "== done ($(($(date +%s) - START)) s)"
pack
