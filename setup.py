"""The one place the build lives: the Python package, its Triton kernels and the C++/CUDA extension.

The extension atpo_fast._C is built from csrc/: its CPU sources always, its CUDA sources only
where a CUDA toolkit and a CUDA build of torch are both present (ATPO_FAST_NO_CUDA=1 skips them).
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

import os
import re
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

CSRC = Path("csrc")
VERSION = re.search(r'__version__ = "([^"]+)"', Path("atpo_fast/__init__.py").read_text()).group(1)


def cuda_build_problem() -> str | None:
    """Why the CUDA sources cannot be built here, or None when they can."""
    if os.environ.get("ATPO_FAST_NO_CUDA") == "1":
        return "ATPO_FAST_NO_CUDA=1 is set"
    if torch.version.cuda is None:
        return "this torch is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    try:
        version = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return f"nvcc in {CUDA_HOME} does not run ({error})"
    found = re.search(r"release (\d+)\.", version)
    toolkit_major, torch_major = (found.group(1) if found else "?"), torch.version.cuda.split(".")[0]
    if toolkit_major != torch_major:
        return f"the CUDA toolkit in {CUDA_HOME} is {toolkit_major}.x, torch was built with CUDA {torch.version.cuda}"
    return None


def native_extension():
    cpp = sorted(str(p) for p in CSRC.glob("*.cpp"))
    cuda = sorted(str(p) for p in CSRC.glob("*.cu"))
    # The C++ standard is the one torch's build tooling picks for its headers. ATen's parallel_for is
    # header-inline OpenMP: without -fopenmp it silently runs on one thread.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    link = ["-fopenmp"]
    problem = cuda_build_problem()
    if problem is None:
        extra["nvcc"] = ["-O3"]
        return CUDAExtension("atpo_fast._C", cpp + cuda, define_macros=[("WITH_CUDA", None)],
                             extra_compile_args=extra, extra_link_args=link)
    if torch.version.cuda is not None:  # a CUDA torch user expects the CUDA kernels: say why they are left out
        print(f"atpo_fast: building the extension without its CUDA sources: {problem}")
    return CppExtension("atpo_fast._C", cpp, extra_compile_args=extra, extra_link_args=link)


setup(
    name="atpo_fast",
    version=VERSION,
    description="Fast ATPO reinforcement learning for masked-diffusion language models",
    python_requires=">=3.10",
    packages=find_packages(include=["atpo_fast", "atpo_fast.*"]) + ["atpo_fast.kernels"],
    package_dir={"atpo_fast.kernels": "kernels"},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.46",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["atpo-train=atpo_fast.cli:train_main", "atpo-eval=atpo_fast.cli:eval_main",
                                    "atpo-export=atpo_fast.cli:export_main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "math-verify", "peft"],
        "tensorboard": ["tensorboard"],
        "flash": ["flash-attn"],
        "math": ["math-verify"],
        "lora": ["peft"],
    },
)
