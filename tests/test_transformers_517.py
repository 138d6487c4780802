"""The model code under transformers 5.17.0, the GPU machine's version, on this CPU.

The venv holds a newer transformers; the native LLaDA / Dream loaders, the tiny model and the
in-place block KV cache (a DynamicLayer subclass) lean on its internals, which change between
releases. `make install` puts 5.17.0 in .cache/transformers-5.17; this test runs the model tests
in a process that imports it first.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO, cached_packages_env

TRANSFORMERS_517 = REPO / ".cache" / "transformers-5.17"
MODEL_TESTS = ["tests/test_models.py", "tests/test_native.py", "tests/test_kv_cache.py", "tests/test_lora.py"]


@pytest.mark.slow
def test_model_tests_pass_under_transformers_5_17():
    env = cached_packages_env(TRANSFORMERS_517, "transformers", dict(os.environ))
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert version.stdout.strip() == "5.17.0", version.stdout + version.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODEL_TESTS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"under transformers 5.17.0:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
