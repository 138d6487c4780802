"""Every Triton specialisation the public ops launch compiles for the GPU (sm_90), on this CPU.

The interpreter accepts code the compiler rejects (a plain Python global read in a kernel, for
one), so the compile report (benchmarks/sass.py --quick) runs here, for the installed Triton and
for Triton 3.6.0, the GPU machine's version, which `make install` puts in .cache/triton-3.6. The two
run side by side (one process each).
"""

import json
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


def test_report_reads_the_loop_of_whole_tiles():
    """The compile report measures the first innermost loop with a global load (a pass's whole tiles),
    not the shorter loop of the row's last partial tile after it, nor an outer loop around it. (In a
    process of its own: benchmarks.sass restarts itself without the interpreter that tests run under.)"""
    lines = [("", "MOV R1, R2"),
             (".L_x_0", "IADD3 R4, R4, 0x1, RZ"),  # an outer loop around the whole tiles
             (".L_x_1", "@!P0 LDG.E.128 R8, desc[UR4][R2.64+0x1000]"), ("", "FFMA R9, R9, R3, R4"),
             ("", "MUFU.EX2 R9, R9"), ("", "FADD R5, R5, R9"), ("", "@P1 BRA `(.L_x_1)"),
             ("", "@P2 BRA `(.L_x_0)"),
             (".L_x_2", "@!P0 LDG.E.128 R8, desc[UR4][R2.64]"), ("", "FADD R5, R5, R8"),  # the partial tile
             ("", "@P3 BRA `(.L_x_2)"), ("", "EXIT")]
    code = ("import json, sys; from benchmarks.sass import main_loop; "
            "print(json.dumps(main_loop([tuple(line) for line in json.load(sys.stdin)])))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(lines), capture_output=True, text=True,
                         cwd=REPO, env=env, check=True).stdout
    body, steady = json.loads(out.splitlines()[-1])
    assert body[0].startswith("@!P0 LDG.E.128") and "0x1000" in body[0] and len(body) == 5 and steady == body
