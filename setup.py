"""The one place the build lives: the Python package, its Triton kernels and the C++/CUDA extension."""

from setuptools import find_packages, setup

setup(
    name="atpo_fast",
    version="0.1.0",
    description="Fast ATPO reinforcement learning for masked-diffusion language models",
    python_requires=">=3.10",
    packages=find_packages(include=["atpo_fast", "atpo_fast.*"]) + ["atpo_fast.kernels"],
    package_dir={"atpo_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.46",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "flash": ["flash-attn"],
    },
)
