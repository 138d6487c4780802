"""Question/answer pairs from a local JSONL file (GSM8K style), with a numeric-match reward.

Each line: {"question": ..., "answer": ...}; the reference number is what follows "####" in the
answer, or what \\boxed{} holds, or the answer itself. A response is right when math-verify (an
optional extra: pip install atpo_fast[math]) finds it equal to the reference, which accepts
\\frac{3}{2} for 1.5; without math-verify, when the number it gives (in \\boxed{}, else after "####",
else its last number) equals the reference.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

from atpo_fast.tasks.base import Example, Task, register_task

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> Fraction | None:
    """The final numeric answer of a text: \\boxed{...}, else after '####', else the last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        text = boxed[-1]
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return Fraction(numbers[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


@register_task("jsonl")
class JsonlTask(Task):
    def __init__(self, data: str | None = None, test_fraction: float = 0.1, seed: int = 0):
        if data is None:
            raise ValueError("the jsonl task needs data=PATH to a local JSONL file")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction (task.options) must be a number in (0, 1), got {test_fraction!r}")
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data file {data!r} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
        try:  # UTF-8 whatever the locale; a byte-order mark (as some Windows editors write) is dropped
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {data!r} is not UTF-8 text: {err}") from None
        examples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], str(row["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{data}:{number}: expected a JSON object with 'question' and 'answer'") from err
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{data}:{number}: the question must be a non-empty string, got {question!r}")
            reference = extract_number(answer)
            if reference is None:
                raise ValueError(f"{data}:{number}: the answer holds no number")
            examples.append(Example(prompt=question, target=answer, meta=(reference,)))
        if len(examples) < 2:
            raise ValueError(f"data file {data!r} needs at least 2 examples, found {len(examples)}")
        random.Random(seed).shuffle(examples)
        n_test = max(1, int(len(examples) * test_fraction))
        self.test, self.train = examples[:n_test], examples[n_test:]

    def reward(self, example: Example, response: str) -> float:
        if _MATH_VERIFY is not None:
            parse, verify = _MATH_VERIFY
            return float(verify(parse(str(example.meta[0])), parse(response)))
        return float(extract_number(response) == example.meta[0])


def _load_math_verify():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


_MATH_VERIFY = _load_math_verify()  # (parse, verify), or None without the optional extra
