"""Every Triton specialisation the public ops launch compiles for the GPU (sm_90), on this CPU.

The interpreter accepts code the compiler rejects (a plain Python global read in a kernel, for
one), so the compile report (benchmarks/sass.py --quick) runs here, for the installed Triton and
for Triton 3.6.0, the GPU machine's version, which `make install` puts in .cache/triton-3.6. The two
run side by side (one process each).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cached_packages_env

TRITON_36 = REPO / ".cache" / "triton-3.6"


def start_report(triton_dir: Path | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir is not None:  # put that Triton in front of the installed one
        env = cached_packages_env(triton_dir, "triton", env)
    return subprocess.Popen([sys.executable, "-m", "benchmarks", "sass", "--quick"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    reports = {"3.6.0": start_report(TRITON_36), "installed": start_report(None)}  # the one that can fail first
    for version, proc in reports.items():
        out, err = proc.communicate(timeout=1200)
        summary = [line for line in out.splitlines() if " specialisations x " in line]
        assert proc.returncode == 0 and summary and summary[-1].endswith(" 0 failed"), \
            f"Triton {version}:\n{out[-6000:]}\n{err[-3000:]}"
        if version == "3.6.0":
            assert summary[-1].startswith("triton 3.6.0:"), summary
