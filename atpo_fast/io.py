"""File helpers: atomic writes, so a run that dies mid-write never leaves a torn file, and JSON and
safetensors reads whose failure names the file."""

from __future__ import annotations

import contextlib
import json
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


def read_json(path: Path) -> dict:
    """The JSON object in path; a ValueError naming the file when it is not one (a torn download, an edit)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # JSON is UTF-8; a byte-order mark is dropped
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def open_safetensors(file: Path):
    """A safetensors file memory-mapped on the CPU; a ValueError naming it when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (an incomplete download?): {err}") from None
    with handle as f:
        yield f
