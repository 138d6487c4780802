"""File helpers: atomic writes, so a run that dies mid-write never leaves a torn file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary path beside target, then rename it over target (atomic on POSIX)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
