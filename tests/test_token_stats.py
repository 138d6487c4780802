"""token_stats against the float64 reference, on both backends (Triton interpreted on CPU)."""

import math
import subprocess
import sys

import pytest
import torch

from atpo_fast import TokenStats, token_stats
from atpo_fast import reference
from atpo_fast.kernels.token_stats import GROUP_W, _rows_aligned, softmax_row_stats
from atpo_fast.kernels.utils import row_layout
from atpo_fast.ops.token_stats import softmax_row_stats_torch
from conftest import DEVICE

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
       torch.float16: dict(rtol=1e-4, atol=1e-5)}
FLOAT_FIELDS = ("entropy", "top1_prob", "margin")


def mixed_rows(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of every hard kind: random, wide-scale, peaked, uniform, top-1 tie, top-2 tie, -inf columns."""
    rand = lambda scale: torch.randn(vocab, generator=gen) * scale  # noqa: E731
    pos = torch.randperm(vocab, generator=gen)[:3]
    peaked = rand(1.0)
    peaked[pos[0]] = 40.0
    uniform = torch.full((vocab,), 0.37)
    tie1 = rand(2.0)
    tie1[pos[:2]] = tie1.max() + 1.0
    tie2 = rand(2.0)
    tie2[pos[0]] = tie2.max() + 2.0
    tie2[pos[1:3]] = tie2[pos[0]] - 0.5
    neg_inf = rand(3.0)
    neg_inf[torch.rand(vocab, generator=gen) < 0.4] = float("-inf")
    neg_inf[pos[0]] = 1.0  # at least one finite entry
    first_inf = rand(1.0)
    first_inf[0] = float("-inf")
    return torch.stack([rand(1.0), rand(8.0), peaked, uniform, tie1, tie2, neg_inf, first_inf, rand(0.01)])


def laid_out(logits: torch.Tensor, aligned: bool) -> torch.Tensor:
    """The same rows [N, V] (N > 1) as a view into NaN padding whose rows start 16-byte aligned (a row
    stride that is a multiple of 16: the kernel of slots) or not (an odd stride: the kernel of lanes)."""
    rows, vocab = logits.shape
    stride = -(-vocab // 16) * 16 + (0 if aligned else 1)
    buf = torch.full((rows, stride), float("nan"), dtype=logits.dtype, device=logits.device)
    buf[:, :vocab] = logits
    view = buf[:, :vocab]
    assert _rows_aligned(*row_layout(view)) == aligned
    return view


def assert_matches_reference(stats: TokenStats, logits: torch.Tensor, targets=None):
    ref = reference.token_stats(logits.cpu(), None if targets is None else targets.cpu())
    tol = TOL[logits.dtype]
    for name in FLOAT_FIELDS:
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == logits.shape[:-1]
        torch.testing.assert_close(got.cpu().double(), ref[name], equal_nan=True, **tol, msg=name)
    assert stats.argmax.dtype == torch.int64
    assert torch.equal(stats.argmax.cpu(), ref["argmax"]), "argmax"
    if targets is not None:
        torch.testing.assert_close(stats.target_logprob.cpu().double(), ref["target_logprob"], equal_nan=True,
                                   **tol)
    else:
        assert stats.target_logprob is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [41, 1000])
def test_matches_reference(backend, gen, dtype, vocab):
    logits = mixed_rows(vocab, gen).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, logits.shape[:-1], generator=gen).to(DEVICE)
    stats = token_stats(logits, targets=targets, backend=backend)
    assert_matches_reference(stats, logits, targets)
    # greedy: the sampled token is the argmax, its probability p1
    assert torch.equal(stats.sampled, stats.argmax)
    torch.testing.assert_close(stats.sampled_prob, stats.top1_prob, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [126464, 152064])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_vocab_sizes(backend, gen, vocab, dtype):
    logits = torch.randn(3, vocab, generator=gen) * 4
    logits[1, torch.randint(0, vocab, (1,), generator=gen)] = 30.0  # peaked
    logits[2] = 0.5  # uniform: entropy = log V
    logits = logits.to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (3,), generator=gen).to(DEVICE)
    stats = token_stats(logits, targets=targets, backend=backend)
    assert_matches_reference(stats, logits, targets)
    assert math.isclose(stats.entropy[2].item(), math.log(vocab), rel_tol=1e-5)


@pytest.mark.parametrize("vocab", [126464, 152064])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_prob_is_the_probability_of_the_sampled_column(backend, gen, vocab, dtype):
    """At real vocabularies the Triton draw reads the chosen lane group in one chunk (bf16 at 126464), two (bf16 at
    152064) or four to five (float32), and reports the logit it read there: wrong if it took another column's (or
    chunk's) logit."""
    logits = (torch.randn(4, vocab, generator=gen) * 2).to(dtype)
    logits[1, torch.randint(0, vocab, (8,), generator=gen)] = 9.0  # a few likely columns
    probs = reference.token_stats(logits)["probs"]
    for temperature in (1.0, 0.7):
        stats = token_stats(logits.to(DEVICE), temperature=temperature, seed=11, backend=backend)
        expected = probs.gather(1, stats.sampled.cpu()[:, None]).squeeze(1)
        torch.testing.assert_close(stats.sampled_prob.cpu().double(), expected, **TOL[dtype],
                                   msg=f"T={temperature}")


def test_leading_shape_and_strides(backend, gen):
    vocab = 300
    base = torch.randn(4, 6, vocab + 9, generator=gen).to(DEVICE)
    views = {
        "padded rows": base[..., 3:3 + vocab],  # row stride > V, offset start
        "transposed": base[..., :vocab].transpose(0, 1),  # [6, 4, V], leading dims not foldable
        "strided": base[:, ::2, :vocab],
        "3-d contiguous": base[..., :vocab].contiguous(),
    }
    for name, logits in views.items():
        stats = token_stats(logits, backend=backend)
        assert stats.entropy.shape == logits.shape[:-1], name
        assert_matches_reference(stats, logits)


def test_no_read_outside_rows(backend, gen):
    """Neighbouring memory holds NaN: any read past a row's V columns would poison its stats."""
    vocab = 77
    buf = torch.full((5, vocab + 2), float("nan"))
    buf[:, 1:-1] = torch.randn(5, vocab, generator=gen)
    logits = buf.to(DEVICE)[:, 1:-1]
    stats = token_stats(logits, targets=torch.zeros(5, dtype=torch.int64, device=DEVICE), backend=backend)
    assert not stats.entropy.isnan().any() and not stats.target_logprob.isnan().any()
    assert_matches_reference(stats, logits, torch.zeros(5, dtype=torch.int64))


def test_invalid_rows_are_nan_only_there(backend, gen):
    logits = torch.randn(5, 50, generator=gen)
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 11] = float("inf")
    stats = token_stats(logits.to(DEVICE), backend=backend)
    bad = torch.tensor([False, True, True, True, False])
    for name in FLOAT_FIELDS + ("sampled_prob",):
        value = getattr(stats, name).cpu()
        assert value[bad].isnan().all() and not value[~bad].isnan().any(), name
    assert (stats.argmax.cpu()[bad] == -1).all() and (stats.sampled.cpu()[bad] == -1).all()
    assert_matches_reference(stats, logits.to(DEVICE))


@pytest.mark.parametrize("twin", ["triton", "torch"])
def test_log_sum_exp_of_a_row_of_only_minus_inf_is_minus_inf(twin, gen):
    """lse is log 0 = -inf for a row of only -inf (a vocabulary slice of fused_linear_logprobs can be
    one), NaN for NaN or +inf, the float64 log-sum-exp elsewhere; its log-prob stays NaN."""
    logits = torch.randn(4, 37, generator=gen)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    logits[3, 8] = float("inf")
    targets = torch.tensor([3, 3, 3, 3])
    run = softmax_row_stats if twin == "triton" else softmax_row_stats_torch
    out = run(logits.to(DEVICE), targets=targets.to(DEVICE), top2=False, entropy=False, lse=True)
    lse = out["lse"].cpu()
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(logits[0].double(), 0))
    assert lse[1].isnan() and lse[2] == float("-inf") and lse[3].isnan()
    assert out["target_logprob"].cpu()[1:].isnan().all()


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("vocab,block_v,num_splits", [(41, 16, 1), (41, 16, 3), (1000, 64, 3), (1000, 128, 16)])
def test_kernel_vocab_splits(gen, vocab, block_v, num_splits, aligned):
    """The merge of split partial states, with ties placed across split boundaries; rows read by
    16-byte slots (aligned) and by lanes."""
    logits = mixed_rows(vocab, gen)
    logits[4, [2, vocab - 3]] = 50.0  # top-1 tie across the first and last split
    logits[5, [vocab // 2, 1]] = logits[5].max()  # top-2 tie spread over splits
    logits = laid_out(logits.to(DEVICE), aligned)
    targets = torch.randint(0, vocab, logits.shape[:-1], generator=gen).to(DEVICE)
    out = softmax_row_stats(logits, targets=targets, block_v=block_v, num_splits=num_splits)
    stats = TokenStats(**{k: out[k] for k in TokenStats._fields})
    assert_matches_reference(stats, logits, targets)
    # the uniforms are keyed by (seed, row) and the column order by the tile width alone, so a seeded
    # sample does not depend on how many programs share a row (but for the group sums' rounding at one of
    # the few group boundaries of these rows: a chance of ~1e-6 per row)
    for temperature in (1.0, 0.7):
        split = softmax_row_stats(logits, temperature=temperature, seed=7, block_v=block_v, num_splits=num_splits)
        whole = softmax_row_stats(logits, temperature=temperature, seed=7, block_v=block_v, num_splits=1)
        assert torch.equal(split["sampled"], whole["sampled"])
        torch.testing.assert_close(split["sampled_prob"], whole["sampled_prob"], equal_nan=True)
        # nor on which kernel reads the rows, also in bf16 (float32 at T = 0.7 reads by lanes either way)
        other = softmax_row_stats(laid_out(logits, not aligned), temperature=temperature, seed=7, block_v=block_v,
                                  num_splits=num_splits)
        assert torch.equal(split["sampled"], other["sampled"])
        half = [softmax_row_stats(laid_out(logits.to(torch.bfloat16), a), temperature=temperature, seed=7,
                                  block_v=block_v, num_splits=num_splits) for a in (aligned, not aligned)]
        assert torch.equal(half[0]["sampled"], half[1]["sampled"])
        torch.testing.assert_close(half[0]["sampled_prob"], half[1]["sampled_prob"], equal_nan=True)


@pytest.mark.parametrize("aligned", [True, False])
def test_prefetch_changes_no_output(gen, aligned):
    """Loading the next tile ahead (the default of the kernel of lanes, not of slots) only moves a load:
    every output, the seeded draw included, is bit-identical with and without it, over several whole
    tiles, a partial last tile and 3 splits per row."""
    logits = laid_out(mixed_rows(1000, gen).to(torch.bfloat16).to(DEVICE), aligned)
    targets = torch.randint(0, 1000, logits.shape[:-1], generator=gen).to(DEVICE)
    for kwargs in (dict(targets=targets, lse=True), dict(temperature=0.7, seed=5)):
        for splits in (1, 3):
            default, *others = [softmax_row_stats(logits, block_v=64, num_splits=splits, prefetch=prefetch, **kwargs)
                                for prefetch in (None, True, False)]
            for run in others:
                for name, value in default.items():
                    torch.testing.assert_close(run[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_default_launch_layout(monkeypatch):
    """By default a row is split into as many parts as one wave of programs holds, never into a second
    wave; how many programs an SM holds follows the compiled kernel's registers and the SM's limits.
    Tiles hold 4 KiB of logits."""
    from types import SimpleNamespace

    from atpo_fast.kernels import utils

    props = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(utils, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)

    def compiled(registers):
        return SimpleNamespace(n_regs=registers, _init_handles=lambda: None)

    # the bf16 split passes' registers in the compile report (Triton 3.6): greedy 56, T=1 63, T=0.7 71, lse 32
    assert [utils.programs_per_sm(compiled(r), 4, cuda) for r in (56, 63, 71, 32, 40)] == [9, 8, 7, 16, 12]
    assert utils.programs_per_sm(compiled(32), 8, cuda) == 8 and utils.programs_per_sm(compiled(255), 8, cuda) == 1

    def splits(n_rows, per_sm):
        return utils.vocab_split(n_rows, 126464, 2, cuda, 2048, None, per_sm)[2]

    assert [splits(n, 8) for n in (64, 256, 1056, 1057, 4096)] == [16, 4, 1, 1, 1]
    assert splits(256, 12) == 6 and splits(1, 8) == 62  # at most one split per tile
    assert utils.vocab_split(5, 126464, 2, torch.device("cpu"), 2048, None, 8)[2] == 1  # the interpreter
    # 4 KiB tiles, two 16-byte loads per thread: 4 warps, fewer on a narrow vocabulary
    tiles = [utils.default_block_v(v, size) for v, size in ((126464, 2), (152064, 4), (100, 2), (3000, 4))]
    assert tiles == [2048, 1024, 128, 1024]
    assert [utils.stats_num_warps(b, size) for b, size in ((2048, 2), (1024, 4), (128, 2), (512, 2))] == [4, 4, 1, 1]
    if DEVICE.type == "cpu":  # the interpreter compiles nothing: the default count, not a crash
        from atpo_fast.kernels import token_stats as module

        flags = dict(TOP2=True, ENTROPY=True, SAMPLE=False, TEMPERED=False, BLOCK_V=16, GROUPS=1, PREFETCH=True,
                     VEC=4)
        count = module._partial_programs_per_sm(module._partial_kernel, torch.zeros(2, 32), 32, 32, 0, 1, flags, 1)
        assert count == 8


@pytest.mark.skipif(DEVICE.type != "cuda", reason="reads a compiled kernel's registers on the GPU")
def test_default_layout_reads_the_registers_of_the_launched_kernel(gen):
    """The default split count, from the launched kernel's registers, gives the statistics of the reference
    and the draws of one split: the argmax exactly; at T = 1 a row may move to another lane group."""
    from atpo_fast.kernels import token_stats as module

    logits = (torch.randn(256, 126464, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    module._PROGRAMS_PER_SM.clear()
    for temperature in (0.0, 1.0):
        out = softmax_row_stats(logits, temperature=temperature, seed=3)
        stats = TokenStats(**{k: out.get(k) for k in TokenStats._fields})
        assert_matches_reference(stats, logits)
        one = softmax_row_stats(logits, temperature=temperature, seed=3, num_splits=1)
        assert_same_draw_within_groups(out["sampled"], one["sampled"], 2048, max_moved=2 if temperature else 0)
    assert len(module._PROGRAMS_PER_SM) == 2 and all(1 <= n <= 16 for n in module._PROGRAMS_PER_SM.values())


def lane_group(columns: torch.Tensor, block_v: int) -> torch.Tensor:
    """The sampling lane group of each column: GROUP_W consecutive lanes of a block_v tile."""
    return columns % block_v // GROUP_W


def assert_same_draw_within_groups(sampled, other, block_v, max_moved):
    """Two draws with one seed: a row drawn into the same lane group must give the same column; at most
    max_moved rows may move to another group (the group sums' rounding, at a group boundary)."""
    differ = sampled != other
    same_group = lane_group(sampled, block_v) == lane_group(other, block_v)
    assert not (differ & same_group).any(), f"rows {torch.nonzero(differ & same_group).flatten().tolist()}"
    assert int(differ.sum()) <= max_moved, f"{int(differ.sum())} rows moved to another group"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_column_depends_on_the_group_sums_only_through_the_group(gen, monkeypatch, temperature):
    """The group sums the merge reads round differently with the split count and the kernel (on a GPU,
    a row of 256 at V = 126464 drew another column with the split count alone, in both runs, when one
    uniform chose the column over the whole row). Relative noise of 1e-4 on those sums may move a row
    to another lane group, but a row kept in its group keeps its column."""
    from atpo_fast.kernels import token_stats as module

    logits = torch.randn(256, 4096, generator=gen).to(DEVICE) * 2
    noise = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    merge = module._merge_kernel

    class PerturbedMerge:  # launches the merge on group sums scaled by 1 + 1e-4 * N(0, 1)
        def __getitem__(self, grid):
            def launch(part, part_idx, group, *args, **kwargs):
                scaled = group * (1 + 1e-4 * torch.randn(group.shape, generator=noise, device=DEVICE))
                return merge[grid](part, part_idx, scaled, *args, **kwargs)
            return launch

    exact = softmax_row_stats(logits, temperature=temperature, seed=11, block_v=1024, fuse_merge=False)
    monkeypatch.setattr(module, "_merge_kernel", PerturbedMerge())
    perturbed = softmax_row_stats(logits, temperature=temperature, seed=11, block_v=1024, fuse_merge=False)
    assert_same_draw_within_groups(exact["sampled"], perturbed["sampled"], 1024, max_moved=8)


@pytest.mark.parametrize("aligned", [True, False])
def test_one_program_per_row_writes_what_the_merge_kernel_writes(gen, monkeypatch, aligned):
    """When one program covers each row (the default from one wave of rows on), the vocabulary pass
    writes the outputs itself: bit for bit those of the merge kernel launched after it, for every
    output flag, both kernels and dtypes; the merge kernel runs only for split rows."""
    from atpo_fast.kernels import token_stats as module

    merges = []
    merge = module._merge_kernel

    class CountedMerge:
        def __getitem__(self, grid):
            merges.append(grid)
            return merge[grid]

    monkeypatch.setattr(module, "_merge_kernel", CountedMerge())
    vocab = 1000
    rows = mixed_rows(vocab, gen)
    targets = torch.randint(0, vocab, rows.shape[:-1], generator=gen).to(DEVICE)
    targets[2] = -100
    cases = [dict(), dict(temperature=1.0, seed=5), dict(temperature=0.7, seed=5, scale=1.3),
             dict(targets=targets, top2=False, entropy=False, lse=True, scale=0.5),
             dict(targets=targets, top2=False, entropy=True, lse=True), dict(targets=targets, temperature=1.0)]
    for dtype in (torch.float32, torch.bfloat16):
        logits = laid_out(rows.to(dtype).to(DEVICE), aligned)
        for kwargs in cases:
            fused = softmax_row_stats(logits, block_v=128, num_splits=1, **kwargs)
            assert not merges
            unfused = softmax_row_stats(logits, block_v=128, num_splits=1, fuse_merge=False, **kwargs)
            assert len(merges) == 1
            merges.clear()
            assert fused.keys() == unfused.keys()
            for name in fused:
                torch.testing.assert_close(fused[name], unfused[name], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{name}, {dtype}, {kwargs}")
    softmax_row_stats(logits, block_v=128, num_splits=2)
    assert len(merges) == 1


@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_far_from_zero_after_minus_inf(gen, aligned):
    """Logits of -300 or +300 after a stretch of -inf: the first finite max of a slot (or tile) must
    not rescale its empty sums by 2^(300 log2 e) (inf * 0 = NaN)."""
    vocab = 100
    rows = torch.randn(4, vocab, generator=gen)
    rows[:2] -= 300.0
    rows[2:] += 300.0
    rows[[0, 2], :40] = float("-inf")
    rows[[1, 3], 1::2] = float("-inf")
    logits = laid_out(rows.to(DEVICE), aligned)
    for num_splits in (1, 3):
        out = softmax_row_stats(logits, block_v=16, num_splits=num_splits)
        assert_matches_reference(TokenStats(**{k: out.get(k) for k in TokenStats._fields}), logits)


@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_argmax_where_the_max_is_raised(gen, aligned):
    """The argmax is found in the tile that raised the running max last: a max raised in every tile
    (ascending row), ties in one tile, ties across tiles, a max in the partial last tile, a max equal
    to a -inf-free row's only finite entry, ties in one slot of 4 columns within a tile and across
    tiles; top-2 ties give margin 0."""
    vocab = 100  # tiles of 16: six whole ones and a partial one of 4 columns
    rows = torch.randn(8, vocab, generator=gen)
    rows[0] = torch.arange(vocab, dtype=torch.float32)  # argmax 99, in the partial tile
    rows[1, [40, 35]] = 9.0  # a tie inside the tile [32, 48): 35
    rows[2, [37, 5]] = 9.0  # a tie across tiles: 5
    rows[3, [97, 3]] = torch.tensor([9.0, 8.0])  # the max in the partial tile, the runner-up in the first
    rows[4] = float("-inf")
    rows[4, 50] = 0.0  # one finite entry: argmax 50, top1_prob 1
    rows[5] = rows[0].flip(0)  # the max in the first column, never raised again
    rows[6, [45, 44]] = 9.0  # a tie inside one slot (columns 44-47) of one tile: 44
    rows[7, [21, 5]] = 9.0  # a tie in one slot position of two tiles: 5
    logits = laid_out(rows.to(DEVICE), aligned)
    for num_splits in (1, 2, 7):
        out = softmax_row_stats(logits, block_v=16, num_splits=num_splits)
        stats = TokenStats(**{k: out.get(k) for k in TokenStats._fields})
        assert stats.argmax.cpu().tolist() == [99, 35, 5, 97, 50, 0, 44, 5], num_splits
        assert_matches_reference(stats, logits)
        assert (stats.margin[[1, 2, 6, 7]] == 0).all()


@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_runner_up_in_the_argmax_lane(gen, aligned):
    """The loop keeps one running max per lane; the merge finds a runner-up that shares the argmax's
    lane (columns congruent modulo the tile width) by rereading that lane: in a later tile, an earlier
    one, another split, the partial last tile, a tie, and a lane holding the only finite entries."""
    vocab, block_v = 100, 16  # six whole tiles and a partial one of 4 columns
    rows = torch.randn(7, vocab, generator=gen) - 10.0
    rows[0, [5, 21]] = torch.tensor([9.0, 8.5])  # the next tile
    rows[1, [53, 5]] = torch.tensor([9.0, 8.5])  # an earlier tile
    rows[2, [2, 82]] = torch.tensor([9.0, 8.0])  # far apart: another split when the row is split
    rows[3, [2, 98]] = torch.tensor([9.0, 8.75])  # the runner-up in the partial last tile
    rows[4, [7, 39]] = 9.0  # a tie within one lane: margin 0
    rows[5] = float("-inf")
    rows[5, [11, 43]] = torch.tensor([1.0, 0.0])  # the only finite entries, in one lane
    rows[6] = float("-inf")
    rows[6, 60] = 3.0  # no runner-up at all: margin 1
    logits = laid_out(rows.to(DEVICE), aligned)
    for num_splits in (1, 2, 7):
        out = softmax_row_stats(logits, block_v=block_v, num_splits=num_splits)
        stats = TokenStats(**{k: out.get(k) for k in TokenStats._fields})
        assert stats.argmax.cpu().tolist() == [5, 53, 2, 2, 7, 11, 60], num_splits
        assert_matches_reference(stats, logits)
        # margin 1 within a rounding of the exponent: a GPU's exp2 and log2 are approximate
        assert stats.margin[4].item() == 0.0 and stats.margin[6].item() == pytest.approx(1.0, abs=1e-6)
    # the default layout at LLaDA's vocabulary: the runner-up one tile after the max, in bf16
    wide = torch.randn(2, 126464, generator=gen) - 10.0
    wide[0, [700, 700 + 1024]] = torch.tensor([4.0, 3.5])
    wide[1, [126463, 126463 - 3 * 1024]] = torch.tensor([4.0, 4.0])
    wide = laid_out(wide.to(torch.bfloat16).to(DEVICE), aligned)
    assert_matches_reference(token_stats(wide, backend="triton"), wide)


@pytest.mark.parametrize("vocab,vocab_chunk,chunk_elems", [(41, 16, 64), (1000, 128, 300)])
def test_torch_path_chunks(gen, vocab, vocab_chunk, chunk_elems):
    logits = mixed_rows(vocab, gen)
    logits[4, [2, vocab - 3]] = 50.0
    targets = torch.randint(0, vocab, logits.shape[:-1], generator=gen)
    before = logits.clone()
    out = softmax_row_stats_torch(logits, targets=targets, vocab_chunk=vocab_chunk, chunk_elems=chunk_elems)
    assert torch.equal(logits, before), "the input must not be modified"
    stats = TokenStats(**{k: out[k] for k in TokenStats._fields})
    assert_matches_reference(stats, logits, targets)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("vocab_chunk,chunk_elems", [(256, 1 << 20), (512, 3000), (32768, 1 << 20)])
def test_torch_sampling_is_the_float64_inverse_cdf_of_its_uniforms(gen, temperature, vocab_chunk, chunk_elems):
    """The torch path's draw is the inverse CDF of softmax(z / T) at one float64 uniform per row, whatever the
    chunking: the same column as a float64 cumulative sum over the whole row, up to a uniform that lands within
    rounding of a column boundary. Rows mix peaked, flat, -inf-holed and tied logits; whole chunks of -inf too."""
    rows, vocab = 600, 1500
    logits = torch.randn(rows, vocab, generator=gen) * torch.rand(rows, 1, generator=gen) * 8
    logits[torch.rand(rows, vocab, generator=gen) < 0.3] = float("-inf")
    logits[::7, 256:1024] = float("-inf")  # whole chunks without a finite logit
    logits[::5, :40] = 2.0  # ties at the row max
    logits[::11] = 0.0  # a flat row
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out = softmax_row_stats_torch(logits, temperature=temperature, generator=torch.Generator().manual_seed(seed),
                                  vocab_chunk=vocab_chunk, chunk_elems=chunk_elems)
    uniforms = torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cdf = torch.softmax(logits.double() / temperature, dim=1).cumsum(1)
    want = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    differ = (out["sampled"] != want).nonzero().flatten()
    for row in differ.tolist():  # only a uniform within rounding of the boundary between the two columns
        boundary = cdf[row, min(int(out["sampled"][row]), int(want[row]))]
        assert abs(boundary - uniforms[row] * cdf[row, -1]) < 1e-6, (seed, row)
    assert len(differ) <= 2, f"seed {seed}: {len(differ)} rows differ"
    drawn = logits.gather(1, out["sampled"][:, None])[:, 0]
    assert torch.isfinite(drawn).all(), f"seed {seed}: a -inf logit was drawn"
    probs = torch.softmax(logits.double(), dim=1).gather(1, out["sampled"][:, None])[:, 0]
    torch.testing.assert_close(out["sampled_prob"].double(), probs, rtol=1e-5, atol=1e-7)


def test_sampling_greedy_and_seeded(backend, gen):
    logits = (torch.randn(64, 500, generator=gen) * 0.5).to(DEVICE)
    greedy = token_stats(logits, temperature=0.0, backend=backend)
    assert torch.equal(greedy.sampled, greedy.argmax)
    assert torch.equal(token_stats(logits, temperature=None, backend=backend).sampled, greedy.argmax)

    a = token_stats(logits, temperature=1.0, seed=123, backend=backend)
    b = token_stats(logits, temperature=1.0, seed=123, backend=backend)
    c = token_stats(logits, temperature=1.0, seed=124, backend=backend)
    assert torch.equal(a.sampled, b.sampled)
    assert not torch.equal(a.sampled, c.sampled)
    assert not torch.equal(a.sampled, greedy.argmax)  # 64 rows of near-flat logits: greedy would be a miracle
    probs = reference.token_stats(logits.cpu())["probs"]
    expected = probs.gather(1, a.sampled.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(a.sampled_prob.cpu().double(), expected, rtol=1e-5, atol=1e-7)
    # statistics other than the sample do not depend on temperature
    torch.testing.assert_close(a.entropy, greedy.entropy, rtol=0, atol=0)


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z (3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.slow
def test_sampling_distribution(backend):
    """800 draws over 4 seeds at temperature 0.6: catches a dropped temperature and mis-scaled noise."""
    z = torch.tensor([2.0, 1.2, 0.5, 0.0, -1.0, -2.5, float("-inf")])
    temperature, rows, seeds = 0.6, 200, range(4)
    counts = torch.zeros(len(z))
    for seed in seeds:
        s = token_stats(z.expand(rows, -1).to(DEVICE), temperature=temperature, seed=seed, backend=backend)
        counts += torch.bincount(s.sampled.cpu(), minlength=len(z)).float()
    assert counts[-1] == 0, "a -inf logit was sampled"
    expected = torch.softmax(z.double() / temperature, 0)[:-1] * counts.sum()
    chi2 = ((counts[:-1] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(len(z) - 2), f"chi2 = {chi2:.1f}"


@pytest.mark.slow
def test_sampling_distribution_across_rescan_chunks():
    """The chosen lane group's columns are rescanned 2 KiB at a time (512 float32 columns: 32 tiles of 16
    here): eight tokens spread over three chunks, the rest -inf; 120 draws over 2 seeds follow their
    softmax, fused into the vocabulary pass and by the merge kernel alike."""
    z = torch.tensor([1.0, 0.5, 0.0, -0.5, 1.5, 0.2, -1.0, 0.8])
    columns = torch.tensor([10, 300, 600, 1000, 1025, 1030, 1034, 1039])
    row = torch.full((1040,), float("-inf"))
    row[columns] = z
    logits = row.expand(60, -1).contiguous().to(DEVICE)
    counts = torch.zeros(8)
    for seed in range(2):
        out = softmax_row_stats(logits, temperature=1.0, seed=seed, block_v=16, num_splits=1, fuse_merge=seed == 0)
        drawn = out["sampled"].cpu()
        assert torch.isin(drawn, columns).all(), "a -inf logit was sampled"
        counts += (drawn[:, None] == columns[None, :]).sum(0).float()
    expected = torch.softmax(z.double(), 0) * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(len(z) - 1), f"chi2 = {chi2:.1f}, counts {counts.tolist()}"


@pytest.mark.slow
def test_sampling_never_picks_a_negligible_token(backend, gen):
    """A rare event: a uniform that rounds to 1.0 made the Gumbel noise +inf and picked any column.

    With 24-bit uniforms that happened about V / 2**24 times per row (8 expected in 1024 rows; the
    kernel before this test sampled such a token in 35 of 4096 rows on an H200). Every row here has
    one logit at +30 and the rest 0, so each other token has probability ~1e-13: an exact sampler
    draws none of them (chance ~1e-5 in 1024 rows). The interpreted kernel takes 64 rows (a second
    each); compiled and torch runs take all 1024.
    """
    rows = 64 if (backend == "triton" and DEVICE.type == "cpu") else 1024
    vocab = 2**17
    logits = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    logits[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = 30.0
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    stats = token_stats(logits.to(DEVICE), temperature=1.0, seed=seed, backend=backend)
    bad = (stats.sampled_prob < 1e-9).nonzero().flatten().tolist()
    assert not bad, f"seed {seed}: rows {bad[:8]} sampled tokens of probability < 1e-9"


@pytest.mark.slow
def test_first_cpu_exp_after_import_is_accurate():
    """pytorch/pytorch#188792: oneMKL picks a VML function's kernel on its first call, and when that call
    runs on several threads at once one thread can run a low-accuracy kernel (on this project's CPU
    machine: the first exp of a fresh process was off by up to 1.4e-4 in 17 of 60 processes). Importing
    atpo_fast.ops settles each function first; 12 fresh processes check their first exp."""
    code = ("import torch, atpo_fast.ops\n"
            "z = -torch.rand(9, 256, generator=torch.Generator().manual_seed(0)) * 20\n"
            "e = torch.exp(z)\n"
            "ref = torch.exp(z.double())\n"
            "print(((e.double() - ref) / ref).abs().max().item())\n")
    errors = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
              for _ in range(12)]
    assert max(errors) < 1e-6, errors


def test_torch_compile_graph(backend):
    logits = torch.randn(4, 3, 33).to(DEVICE)

    def f(x):
        s = token_stats(x, backend=backend)
        return s.entropy * 2 + s.margin

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits), f(logits))


def test_empty_leading_shape(backend):
    stats = token_stats(torch.randn(0, 3, 10).to(DEVICE), backend=backend)
    assert stats.entropy.shape == (0, 3) and stats.argmax.shape == (0, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), "logits must be float32"),
    (dict(logits=torch.zeros(2, 1)), "V >= 2"),
    (dict(logits=torch.zeros(5, 2).t()), "unit-stride"),
    (dict(logits=torch.zeros(2, 5), temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(logits=torch.zeros(2, 5), temperature=float("nan")), "temperature"),
    (dict(logits=torch.zeros(2, 5), targets=torch.zeros(3, dtype=torch.int64)), "targets must have shape"),
    (dict(logits=torch.zeros(2, 5), targets=torch.zeros(2, dtype=torch.int32)), "targets must be int64"),
    (dict(logits=torch.zeros(2, 5), targets=torch.tensor([0, 5])), r"targets must lie in \[0, 5\)"),
    (dict(logits=torch.zeros(2, 5), targets=torch.tensor([-100, 0])), "targets must lie in"),
    (dict(logits=torch.zeros(2, 5), targets=torch.zeros(2, dtype=torch.int64, device="meta")), "targets must be on"),
    (dict(logits=torch.zeros(2, 5), seed=-1), "seed"),
    (dict(logits=torch.zeros(2, 5), seed=2**64, temperature=1.0), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(logits=torch.zeros(2, 5), backend="cuda"), "backend must be"),
])
def test_bad_input(kwargs, match):
    logits = kwargs.pop("logits")
    with pytest.raises(ValueError, match=match):
        token_stats(logits, **kwargs)
