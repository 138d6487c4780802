"""Countdown: combine every given number once with + - * / and parentheses to reach the target.

Prompt: "3 5 2 4 -> 14:". Response: an expression such as "(3+5)*2-4". Reward 1 when the
expression parses (a small recursive-descent parser; nothing is ever eval'd), uses each given
number exactly once and evaluates exactly (fractions) to the target; 0 otherwise.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from atpo_fast.tasks.base import Example, Task, register_task

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")
MAX_EXPRESSION_CHARS = 64


class ParseError(ValueError):
    pass


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value and the integer literals of an arithmetic expression (+ - * / and parentheses only)."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ParseError("expression too long")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ParseError(f"unexpected character {text[pos]!r}")
        tokens.append(match.group(1))
        pos = match.end()
    numbers: list[int] = []
    index = 0

    def peek():
        return tokens[index] if index < len(tokens) else None

    def take():
        nonlocal index
        index += 1
        return tokens[index - 1]

    def expression() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> Fraction:
        value = factor()
        while peek() in ("*", "/"):
            op, rhs = take(), factor()
            if op == "/" and rhs == 0:
                raise ParseError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor() -> Fraction:
        token = peek()
        if token is None:
            raise ParseError("unexpected end")
        take()
        if token == "(":
            value = expression()
            if peek() != ")":
                raise ParseError("missing ')'")
            take()
            return value
        if token.isdigit():
            numbers.append(int(token))
            return Fraction(int(token))
        raise ParseError(f"unexpected token {token!r}")

    value = expression()
    if index != len(tokens):
        raise ParseError(f"unexpected token {tokens[index]!r}")
    return value, numbers


def _random_expression(numbers: list[int], rng: random.Random) -> tuple[str, Fraction]:
    """A random expression using every number once; division only where it is exact."""
    parts = [(str(n), Fraction(n)) for n in numbers]
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        (a, va), (b, vb) = parts[i], parts[j]
        ops = ["+", "-", "*"] + (["/"] if vb != 0 and (va / vb).denominator == 1 else [])
        op = rng.choice(ops)
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
        text = f"({a}{op}{b})" if len(parts) > 2 else f"{a}{op}{b}"
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [(text, value)]
    return parts[0]


@register_task("countdown")
class Countdown(Task):
    def __init__(self, train_size: int = 4000, test_size: int = 200, sizes: tuple = (3, 4), max_number: int = 20,
                 max_target: int = 100, seed: int = 0):
        rng = random.Random(seed)
        examples, seen = [], set()
        while len(examples) < train_size + test_size:
            numbers = [rng.randint(1, max_number) for _ in range(rng.choice(list(sizes)))]
            expression, value = _random_expression(numbers, rng)
            if value.denominator != 1 or not 0 < value <= max_target:
                continue
            key = (tuple(sorted(numbers)), int(value))
            if key in seen:
                continue
            seen.add(key)
            prompt = " ".join(map(str, numbers)) + f" -> {int(value)}:"
            examples.append(Example(prompt=prompt, target=expression, meta=(tuple(numbers), int(value))))
        self.train, self.test = examples[:train_size], examples[train_size:]

    def reward(self, example: Example, response: str) -> float:
        numbers, target = example.meta
        try:
            value, used = parse_expression(response)
        except ParseError:
            return 0.0
        return float(value == target and Counter(used) == Counter(numbers))
