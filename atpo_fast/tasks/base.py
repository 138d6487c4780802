"""Verifiable tasks: prompts, reference answers and a reward, generated locally. Users register their own."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # what the model is given
    target: str  # a correct response (supervised warm start; the reference answer)
    meta: tuple = ()  # whatever the reward needs beyond the target (hashable)


class Task:
    """A task: a train and a test split of Examples, and a reward in [0, 1] for a response text.

    Subclasses fill self.train and self.test in __init__ and implement reward(); `correct` defaults
    to a reward of 1.
    """

    name: str = "task"
    train: list[Example]
    test: list[Example]

    def reward(self, example: Example, response: str) -> float:
        raise NotImplementedError

    def correct(self, example: Example, response: str) -> bool:
        return self.reward(example, response) >= 1.0


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Class decorator: make a Task constructible by name (get_task(name, **options))."""

    def wrap(cls):
        if name in TASKS:
            raise ValueError(f"a task named {name!r} is already registered")
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    try:
        task = TASKS[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for task {name!r} (task.options): {err}") from err
    for split in ("train", "test"):  # a training run draws prompts from one and evaluates on the other
        if not getattr(task, split):
            raise ValueError(f"task {name!r} with options {options} has no {split} examples (task.options)")
    return task
