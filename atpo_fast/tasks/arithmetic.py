"""Multi-digit addition or multiplication with an exact-match reward. Prompt "123+45=", response "168"."""

from __future__ import annotations

import random

from atpo_fast.tasks.base import Example, Task, register_task


@register_task("arithmetic")
class Arithmetic(Task):
    def __init__(self, train_size: int = 4000, test_size: int = 200, digits: int = 2, op: str = "+", seed: int = 0):
        if op not in ("+", "*"):
            raise ValueError(f"op must be '+' or '*', got {op!r}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        rng = random.Random(seed)
        pairs = set()
        while len(pairs) < train_size + test_size:
            pairs.add((rng.randrange(10 ** digits), rng.randrange(10 ** digits)))
        pairs = sorted(pairs)
        rng.shuffle(pairs)
        examples = [Example(prompt=f"{a}{op}{b}=", target=str(a + b if op == "+" else a * b)) for a, b in pairs]
        self.train, self.test = examples[:train_size], examples[train_size:]

    def reward(self, example: Example, response: str) -> float:
        return float(response.strip() == example.target)
