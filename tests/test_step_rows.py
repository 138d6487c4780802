"""build_step_rows (extension and torch fallback) against a plain Python loop on random trajectories."""

import shutil

import pytest
import torch

from atpo_fast import StepRows, build_step_rows, reference
from atpo_fast.ops.step_rows import native_extension
from conftest import DEVICE

MASK_ID = 126336
STEP_ROW_BACKENDS = ["native", "torch"]


@pytest.fixture(params=STEP_ROW_BACKENDS)
def rows_backend(request):
    return request.param


def test_extension_is_built():
    """On a machine with a C++ compiler the install must have built atpo_fast._C: fail, never skip."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: the torch fallback builds the rows")
    assert native_extension() is not None, "atpo_fast._C did not build; see the pip install output"


def random_trajectories(batch, length, steps, gen):
    """Prompts of different lengths (-1), each response position committed once, some never masked."""
    tokens = torch.randint(0, 50000, (batch, length), generator=gen)
    step_map = torch.full((batch, length), -1, dtype=torch.int64)
    for b in range(batch):
        prompt = int(torch.randint(0, length // 2 + 1, (1,), generator=gen))
        response = length - prompt
        schedule = torch.randint(0, steps, (response,), generator=gen)
        schedule[torch.rand(response, generator=gen) < 0.05] = -1  # never masked (padding)
        step_map[b, prompt:] = schedule
    return tokens, step_map


def random_slots(batch, slots, steps, gen):
    starts = torch.randint(0, steps + 3, (batch, slots), generator=gen)  # some start after the last step
    ends = starts + torch.randint(0, 6, (batch, slots), generator=gen)  # empty intervals included
    unused = torch.rand(batch, slots, generator=gen) < 0.25
    starts[unused] = -1
    ends[unused] = -1
    starts[0, 0], ends[0, 0] = 0, steps  # the whole trajectory as one row
    return starts, ends


def assert_rows_equal(got: StepRows, want: StepRows):
    for name, g, w in zip(StepRows._fields, got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("batch,length,slots,steps", [(1, 7, 1, 3), (5, 64, 8, 16), (16, 300, 40, 64),
                                                      (3, 300, 40, 300)])
def test_matches_reference(rows_backend, gen, batch, length, slots, steps):
    tokens, step_map = random_trajectories(batch, length, steps, gen)
    starts, ends = random_slots(batch, slots, steps, gen)
    want = reference.step_rows(tokens, step_map, starts, ends, MASK_ID)
    args = [t.to(DEVICE) for t in (tokens, step_map, starts, ends)]
    assert_rows_equal(build_step_rows(*args, MASK_ID, backend=rows_backend), want)
    args[1] = args[1].int()  # int32 step maps too
    assert_rows_equal(build_step_rows(*args, MASK_ID, backend=rows_backend), want)


def test_uniform_partition_covers_every_target_once(rows_backend, gen):
    """TraceRL's uniform intervals [j*s, (j+1)*s): every committed token is a target in exactly one row."""
    batch, length, steps, budget = 6, 120, 32, 5
    tokens, step_map = random_trajectories(batch, length, steps, gen)
    size = -(-steps // budget)
    starts = torch.arange(budget).mul(size).expand(batch, -1).contiguous()
    ends = (starts + size).clamp(max=steps)
    rows = build_step_rows(*(t.to(DEVICE) for t in (tokens, step_map, starts, ends)), MASK_ID, backend=rows_backend)
    assert_rows_equal(rows, reference.step_rows(tokens, step_map, starts, ends, MASK_ID))
    hits = torch.zeros(batch, length, dtype=torch.int64)
    hits.index_put_((rows.seq_index[rows.target_row].cpu(), rows.target_pos.cpu()),
                    torch.ones(len(rows.target_row), dtype=torch.int64), accumulate=True)
    assert torch.equal(hits, (step_map >= 0).long())


def test_no_rows(rows_backend):
    tokens = torch.zeros(2, 5, dtype=torch.int64, device=DEVICE)
    step_map = torch.zeros(2, 5, dtype=torch.int64, device=DEVICE)
    none = torch.full((2, 3), -1, dtype=torch.int64, device=DEVICE)
    rows = build_step_rows(tokens, step_map, none, none, 7, backend=rows_backend)
    assert rows.input_ids.shape == (0, 5) and rows.target_row.shape == (0,)


def bad_case(**changes):
    args = dict(tokens=torch.zeros(2, 6, dtype=torch.int64), step_map=torch.zeros(2, 6, dtype=torch.int64),
                starts=torch.zeros(2, 3, dtype=torch.int64), ends=torch.ones(2, 3, dtype=torch.int64), mask_id=9)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(tokens=torch.zeros(2, 6)), "tokens must be int64"),
    (dict(tokens=torch.zeros(2, 6, 1, dtype=torch.int64)), r"tokens must have shape \[B, L\]"),
    (dict(step_map=torch.zeros(2, 5, dtype=torch.int64)), "step_map must have tokens' shape"),
    (dict(step_map=torch.zeros(2, 6)), "step_map must be int32 or int64"),
    (dict(step_map=torch.full((2, 6), -2, dtype=torch.int64)), "step_map must hold steps >= 0 or -1"),
    (dict(starts=torch.zeros(3, 3, dtype=torch.int64)), r"starts must have shape \[B=2, k\]"),
    (dict(ends=torch.ones(2, 4, dtype=torch.int64)), "ends must have starts' shape"),
    (dict(starts=torch.zeros(2, 3, dtype=torch.int32)), "starts must be int64"),
    (dict(ends=torch.zeros(2, 3, dtype=torch.int64, device="meta")), "ends must be on tokens' device"),
    (dict(mask_id=-1), "mask_id must be >= 0"),
    (dict(starts=torch.full((2, 3), 4, dtype=torch.int64)), "starts must not exceed ends"),
    (dict(starts=torch.tensor([[0, -1, 0], [0, 0, 0]])), "mark an unused slot with -1 together"),
    (dict(starts=torch.full((2, 3), -3, dtype=torch.int64)), "starts must be >= 0 or -1"),
])
def test_bad_input(rows_backend, changes, match):
    with pytest.raises(ValueError, match=match):
        build_step_rows(**bad_case(**changes), backend=rows_backend)


@pytest.mark.parametrize("changes", [dict(step_map=torch.full((2, 6), -2, dtype=torch.int64)),
                                     dict(starts=torch.full((2, 3), -3, dtype=torch.int64)),
                                     dict(starts=torch.full((2, 3), 4, dtype=torch.int64))])
def test_bad_values_never_reach_the_extension(monkeypatch, changes):
    """A C++ exception thrown in the extension killed the process on a CUDA machine (SIGSEGV, see
    benchmarks/results/gpu_h200_2026-11-27.md), so bad values are refused in Python before the call."""

    class Extension:
        with_cuda = True

        @staticmethod
        def build_step_rows(*args):
            raise AssertionError("bad values reached the extension")

    monkeypatch.setattr("atpo_fast.ops.step_rows.native_extension", lambda: Extension)
    with pytest.raises(ValueError):
        build_step_rows(**bad_case(**changes), backend="native")
