"""Test set-up: with no GPU the Triton kernels run under the interpreter (set before any import)."""

import os
from pathlib import Path

import numpy as np
import torch


def round_bf16_to_nearest_in_interpreter() -> None:
    """Make the Triton interpreter round float32 -> bfloat16 to nearest even, as compiled kernels do.

    A downcast in a kernel (`x.to(tl.bfloat16)`, or a store of float32 into a bf16 pointer) compiles
    to round-to-nearest-even (`cvt.rn.bf16.f32`; semantic.cast's default rounding), but the
    interpreter's InterpreterBuilder.cast_impl drops the low 16 bits instead. Truncation errs twice
    as much and always towards zero, so unpatched the tests would check a kernel the GPU never runs.
    The patch rounds with torch's own conversion (round to nearest even) and leaves other casts be.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(np.ascontiguousarray(data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16).reshape(data.shape), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    round_bf16_to_nearest_in_interpreter()

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton"]
REPO = Path(__file__).resolve().parent.parent


def cached_packages_env(folder: Path, package: str, env: dict) -> dict:
    """env with `folder` (a `pip install --target` cache that `make install` fills, holding `package`)
    first on PYTHONPATH, then the repository; fails the test, naming the folder, if it is not set up."""
    if not (folder / package).is_dir():
        pytest.fail(f"{package} is not set up in {folder}: run `make install`")
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO), env.get("PYTHONPATH", "")])}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def gen():
    """A fresh, seeded-from-entropy generator: every run draws new inputs; failures print the seed,
    and ATPO_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("ATPO_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"input seed: {seed} (replay with ATPO_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
