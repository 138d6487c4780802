"""4x4 Sudoku (2x2 boxes): unique-solution puzzles from the 288 valid grids, split by solution grid.

Prompt: the puzzle as 16 characters, row by row, '.' for a blank, then '='. Response: the 16
digits of the solution. Reward: the fraction of blank cells filled right; correct: every cell right.
With puzzles=n > 1 a prompt holds n puzzles (each followed by '=') and the response their n
solutions one after the other (16 n digits): a longer answer, decided over many denoising steps.
"""

from __future__ import annotations

import random

from atpo_fast.tasks.base import Example, Task, register_task

SIZE = 4


def _units() -> list[list[int]]:
    rows = [[r * SIZE + c for c in range(SIZE)] for r in range(SIZE)]
    cols = [[r * SIZE + c for r in range(SIZE)] for c in range(SIZE)]
    boxes = [[(br + r) * SIZE + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
    return rows + cols + boxes


UNITS = _units()
PEERS = [sorted({j for unit in UNITS if i in unit for j in unit} - {i}) for i in range(SIZE * SIZE)]


def all_grids() -> list[str]:
    """The 288 valid 4x4 Sudoku grids, as 16-character strings of digits 1-4 (filled by backtracking)."""
    grids: list[str] = []

    def fill(cells: list[str], i: int) -> None:
        if i == SIZE * SIZE:
            grids.append("".join(cells))
            return
        for digit in "1234":
            if all(cells[j] != digit for j in PEERS[i] if j < i):
                cells[i] = digit
                fill(cells, i + 1)
        cells[i] = "."

    fill(["."] * (SIZE * SIZE), 0)
    return grids


def count_solutions(puzzle: list[str], limit: int = 2) -> int:
    """Solutions of a puzzle (cells '1'-'4' or '.'), counting up to `limit`."""
    try:
        i = puzzle.index(".")
    except ValueError:
        return 1
    total = 0
    for digit in "1234":
        if all(puzzle[j] != digit for j in PEERS[i]):
            puzzle[i] = digit
            total += count_solutions(puzzle, limit - total)
            puzzle[i] = "."
            if total >= limit:
                break
    return total


def make_puzzle(grid: str, blanks: int, rng: random.Random) -> str | None:
    """Blank `blanks` cells of grid in random order, keeping a unique solution; None if it cannot."""
    puzzle = list(grid)
    removed = 0
    for i in rng.sample(range(SIZE * SIZE), SIZE * SIZE):
        puzzle[i] = "."
        if count_solutions(puzzle) == 1:
            removed += 1
            if removed == blanks:
                return "".join(puzzle)
        else:
            puzzle[i] = grid[i]
    return None


@register_task("sudoku4")
class Sudoku4(Task):
    def __init__(self, train_size: int = 4000, test_size: int = 200, min_blanks: int = 8, max_blanks: int = 11,
                 test_grids: int = 48, seed: int = 0, puzzles: int = 1):
        if not 1 <= min_blanks <= max_blanks <= 12:
            raise ValueError(f"need 1 <= min_blanks <= max_blanks <= 12, got {min_blanks}, {max_blanks}")
        if isinstance(puzzles, bool) or not isinstance(puzzles, int) or puzzles < 1:
            raise ValueError(f"task option puzzles must be an int >= 1, got {puzzles!r}")
        self.puzzles = puzzles
        rng = random.Random(seed)
        grids = all_grids()
        rng.shuffle(grids)
        test_grids_, train_grids = grids[:test_grids], grids[test_grids:]
        self.train = self._examples(train_grids, train_size, min_blanks, max_blanks, rng)
        self.test = self._examples(test_grids_, test_size, min_blanks, max_blanks, rng)

    def _examples(self, grids, count, min_blanks, max_blanks, rng) -> list[Example]:
        out = []
        while len(out) < count:
            pairs = []
            while len(pairs) < self.puzzles:
                grid = rng.choice(grids)
                puzzle = make_puzzle(grid, rng.randint(min_blanks, max_blanks), rng)
                if puzzle is not None:
                    pairs.append((puzzle, grid))
            out.append(Example(prompt="".join(p + "=" for p, _ in pairs), target="".join(g for _, g in pairs),
                               meta=("".join(p for p, _ in pairs),)))
        return out

    def reward(self, example: Example, response: str) -> float:
        puzzle = example.meta[0]  # the puzzles' cells one after the other
        blanks = [i for i, c in enumerate(puzzle) if c == "."]
        answer = response.strip()[:len(puzzle)]
        return sum(i < len(answer) and answer[i] == example.target[i] for i in blanks) / len(blanks)
