"""Tasks with verifiable rewards, all generated or read locally (no download)."""

from atpo_fast.tasks import arithmetic, countdown, jsonl, sudoku4  # noqa: F401  (registers them)
from atpo_fast.tasks.base import TASKS, Example, Task, get_task, register_task

__all__ = ["TASKS", "Example", "Task", "get_task", "register_task"]
