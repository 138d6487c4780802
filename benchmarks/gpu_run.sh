#!/usr/bin/env bash
# One call on a CUDA machine (no network): build the extension with its CUDA sources, run the test
# suite on CUDA, then every benchmark. Logs and result tables go to $OUT (default benchmarks/results).
#   bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/gpu_env.txt"
import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
PY
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
python3 -c "import atpo_fast._C as C; print('extension with CUDA:', C.with_cuda)" | tee -a "$OUT/gpu_env.txt"
python3 -m pytest -q tests -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python3 -m benchmarks kernels 2>&1 | tee "$OUT/gpu_kernels.log" | tail -40
python3 -m benchmarks trainer --layers "${LAYERS:-4}" 2>&1 | tee "$OUT/gpu_trainer.log" | tail -10
if [ "$OUT" != benchmarks/results ]; then cp benchmarks/results/*cuda* "$OUT"/ 2>/dev/null; fi
