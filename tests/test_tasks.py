"""Task generation and reward functions on hand-written correct, wrong and malformed answers."""

import json
from fractions import Fraction

import pytest

from atpo_fast.tasks import Example, Task, get_task, register_task
from atpo_fast.tasks.countdown import ParseError, parse_expression
from atpo_fast.tasks.jsonl import extract_number
from atpo_fast.tasks.sudoku4 import UNITS, all_grids, count_solutions


def test_sudoku_grids_and_puzzles():
    grids = all_grids()
    assert len(grids) == 288 == len(set(grids))
    assert all(len({g[i] for i in unit}) == 4 for g in grids for unit in UNITS)
    task = get_task("sudoku4", train_size=200, test_size=50)
    for ex in task.train[:50] + task.test:
        puzzle = ex.meta[0]
        assert 8 <= puzzle.count(".") <= 11 and ex.prompt == puzzle + "="
        assert count_solutions(list(puzzle)) == 1
        assert all(p in (".", t) for p, t in zip(puzzle, ex.target))
    assert not {ex.target for ex in task.train} & {ex.target for ex in task.test}, "split by solution grid"


def test_sudoku_reward():
    ex = Example(prompt="12.4....=", target="1234341221434321", meta=("12.4341221434..1",))
    # blanks at 2, 13, 14: the reward is the fraction of them filled right
    assert get_task("sudoku4", train_size=1, test_size=1).reward(ex, "1234341221434321") == 1.0
    task = get_task("sudoku4", train_size=1, test_size=1)
    assert task.reward(ex, "1214341221434321") == pytest.approx(2 / 3)  # one blank wrong
    assert task.reward(ex, "1234341221434") == pytest.approx(1 / 3)  # cut short: missing cells are wrong
    assert task.reward(ex, "") == 0.0
    assert task.reward(ex, "hello") == 0.0
    assert task.correct(ex, "1234341221434321") and not task.correct(ex, "1214341221434321")


def test_sudoku_with_several_puzzles_per_prompt():
    task = get_task("sudoku4", train_size=20, test_size=5, puzzles=3, min_blanks=4, max_blanks=6)
    for ex in task.train + task.test:
        parts = ex.prompt.split("=")
        assert len(parts) == 4 and parts[3] == "" and all(len(p) == 16 for p in parts[:3])
        assert len(ex.target) == 48 and ex.meta[0] == "".join(parts[:3])
        assert task.reward(ex, ex.target) == 1.0 and task.correct(ex, ex.target)
        blanks = [i for i, c in enumerate(ex.meta[0]) if c == "."]
        wrong = list(ex.target)
        wrong[blanks[-1]] = "5"  # the last puzzle's last blank
        assert task.reward(ex, "".join(wrong)) == pytest.approx(1 - 1 / len(blanks))
        assert not task.correct(ex, "".join(wrong))
    with pytest.raises(ValueError, match="puzzles must be an int >= 1"):
        get_task("sudoku4", puzzles=0)


def test_countdown_reward():
    task = get_task("countdown", train_size=50, test_size=10)
    ex = Example(prompt="3 5 2 4 -> 12:", target="(3+5)*2-4", meta=((3, 5, 2, 4), 12))
    assert task.reward(ex, "(3+5)*2-4") == 1.0
    assert task.reward(ex, "4*(5-2)+3-3") == 0.0  # 3 used twice
    assert task.reward(ex, "(3+5)*2") == 0.0  # 4 unused
    assert task.reward(ex, "(3+5)*2-5") == 0.0  # 5 twice, 4 missing
    assert task.reward(ex, "3*4*(5-2)/3") == 0.0
    assert task.reward(ex, "2++3") == 0.0
    assert task.reward(ex, "__import__('os')") == 0.0
    assert task.reward(ex, "") == 0.0
    for ex in task.train[:50]:
        assert task.reward(ex, ex.target) == 1.0, ex


def test_expression_parser():
    assert parse_expression("(3+5)*2-4") == (12, [3, 5, 2, 4])
    assert parse_expression(" 8 / (3-1) ") == (4, [8, 3, 1])
    assert parse_expression("1-2-3")[0] == -4  # left associative
    assert parse_expression("2*3+4*5")[0] == 26  # precedence
    for bad in ("(1+2", "1+2)", "4/0", "1 2", "-1+2", "1+", "x", "1" * 80):
        with pytest.raises(ParseError):
            parse_expression(bad)


def test_arithmetic_reward():
    task = get_task("arithmetic", train_size=20, test_size=5, digits=3, op="*")
    ex = task.train[0]
    a, b = map(int, ex.prompt[:-1].split("*"))
    assert ex.target == str(a * b)
    assert task.reward(ex, f" {a * b} ") == 1.0 and task.reward(ex, str(a * b + 1)) == 0.0
    assert task.reward(ex, "") == 0.0
    with pytest.raises(ValueError, match="op must be"):
        get_task("arithmetic", op="-")


@pytest.fixture(params=["math-verify", "numeric match"])
def answer_check(request, monkeypatch):
    """The jsonl reward with math-verify (when installed) and with its numeric fallback."""
    import atpo_fast.tasks.jsonl as jsonl

    if request.param == "numeric match":
        monkeypatch.setattr(jsonl, "_MATH_VERIFY", None)
    elif jsonl._MATH_VERIFY is None:
        pytest.skip("math-verify is not installed (pip install atpo_fast[math])")
    return request.param


def test_jsonl_task(tmp_path, answer_check):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"}
            for i in range(995, 1015)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task("jsonl", data=str(path))
    assert len(task.train) + len(task.test) == 20
    ex = next(e for e in task.train + task.test if e.prompt.startswith("What is 1000 "))
    assert task.reward(ex, "so the answer is \\boxed{2000}") == 1.0
    assert task.reward(ex, "1000+1000 = 2,000") == 1.0
    assert task.reward(ex, "#### 2000.0") == 1.0
    assert task.reward(ex, "\\boxed{2001} but 2000") == 0.0
    assert task.reward(ex, "no idea") == 0.0
    half = Example(prompt="", target="#### 1.5", meta=(Fraction(3, 2),))
    assert task.reward(half, "\\boxed{\\frac{3}{2}}") == (1.0 if answer_check == "math-verify" else 0.0)
    assert extract_number("x = 0.75") == Fraction(3, 4) and extract_number("-.5") == -0.5
    assert extract_number("3/4") == 4  # the last number: fractions are not parsed


def test_jsonl_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data=PATH"):
        get_task("jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        get_task("jsonl", data=str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
        get_task("jsonl", data=str(bad))
    bad.write_text('{"question": "q", "answer": "none"}\n{"question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: the answer holds no number"):
        get_task("jsonl", data=str(bad))
    for question in ('""', '" "', "5", "null"):  # would reach the tokenizer, or make a prompt of no token
        bad.write_text(f'{{"question": "q", "answer": "1"}}\n{{"question": {question}, "answer": "2"}}\n')
        with pytest.raises(ValueError, match="bad.jsonl:2: the question must be a non-empty string"):
            get_task("jsonl", data=str(bad))
    with pytest.raises(ValueError, match="is a folder, not a file"):
        get_task("jsonl", data=str(tmp_path))
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "q", "answer": "1"}\n{"question": "r", "answer": "2"}\n')
    for fraction in (0, 1, -0.5, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"test_fraction \(task.options\) must be a number in \(0, 1\)"):
            get_task("jsonl", data=str(good), test_fraction=fraction)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"question": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match="data file '.*binary.jsonl' is not UTF-8 text"):
        get_task("jsonl", data=str(binary))


def test_jsonl_reads_utf8_text_with_a_byte_order_mark(tmp_path):
    # a byte-order mark (some Windows editors write one) made line 1 "not a JSON object"
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + '{"question": "Combien font 2 × 3 ?", "answer": "6"}\n'.encode()
                     + '{"question": "Что такое 1 + 1?", "answer": "2"}\n'.encode())
    task = get_task("jsonl", data=str(path))
    assert sorted(e.prompt for e in task.train + task.test) == ["Combien font 2 × 3 ?", "Что такое 1 + 1?"]


def test_register_a_task():
    @register_task("echo-test")
    class Echo(Task):
        def __init__(self, word: str = "hi"):
            self.train = self.test = [Example(prompt=word, target=word)]

        def reward(self, example, response):
            return float(response == example.target)

    task = get_task("echo-test", word="yo")
    assert task.name == "echo-test" and task.correct(task.train[0], "yo")
    with pytest.raises(ValueError, match="already registered"):
        register_task("echo-test")(Echo)
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("nope")
    with pytest.raises(ValueError, match="bad options for task 'echo-test'"):
        get_task("echo-test", colour="red")
    with pytest.raises(ValueError, match=r"task 'sudoku4' with options \{'train_size': 0\} has no train examples"):
        get_task("sudoku4", train_size=0)  # the trainer would draw prompts from an empty list
