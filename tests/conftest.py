"""Test set-up: with no GPU the Triton kernels run under the interpreter (set before any import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton"]


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
