"""Triton kernels of atpo_fast, installed as `atpo_fast.kernels`.

Importing this package does not import Triton; the kernel modules do. On CPU tensors the kernels
run only under Triton's interpreter (TRITON_INTERPRET=1 set before the first import).
"""

import os


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
