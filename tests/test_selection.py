"""Step selection against hand-computed cases, and the partition property with real step rows."""

import pytest
import torch

from atpo_fast import build_step_rows
from atpo_fast.trace import Trace
from atpo_fast.selection import select_steps, step_scores

NAN = float("nan")


def make_trace(entropy, margin, roec, count) -> Trace:
    entropy, margin, roec = (torch.tensor(v, dtype=torch.float32) for v in (entropy, margin, roec))
    count = torch.tensor(count)
    return Trace(entropy=entropy, margin=margin, roec=roec, surprisal=entropy / 2, candidate_entropy=entropy,
                 candidate_margin=margin,
                 count=count, filled=torch.zeros_like(count),
                 block=torch.zeros(entropy.shape[1], dtype=torch.int64))


@pytest.fixture
def trace():
    """Two responses over T = 5 steps; the second reaches only steps 0-2."""
    return make_trace(entropy=[[1, 2, 3, 4, 5], [2, 1, 3, NAN, NAN]],
                      margin=[[0.9, 0.5, 0.8, 0.2, 0.6], [0.7, 0.3, 0.9, NAN, NAN]],
                      roec=[[0, 0.1, 0.4, 0.2, 0.3], [0, 0.5, 0.2, NAN, NAN]],
                      count=[[1, 1, 1, 1, 1], [2, 1, 1, 0, 0]])


def rows(starts, ends):
    return [[(s, e) for s, e in zip(a, b) if s >= 0] for a, b in zip(starts.tolist(), ends.tolist())]


def test_hybrid_batch_average_by_hand(trace):
    # batch 1-CM per step: .2 .6 .15 .8 .4 -> min-max: 1/13, 9/13, 0, 1, 5/13
    # batch RoEC per step:  0 .3 .3 .2 .3 -> min-max: 0, 1, 1, 2/3, 1
    want = torch.tensor([0.5 / 13, 0.5 + 4.5 / 13, 0.5, 0.5 + 1 / 3, 0.5 + 2.5 / 13])
    got = step_scores(trace, "hybrid", alpha=0.5, per="batch")
    torch.testing.assert_close(got, want.expand(2, -1))
    starts, ends = select_steps(trace, 2, "hybrid")
    assert rows(starts, ends) == [[(1, 2), (3, 4)]] * 2
    assert rows(*select_steps(trace, 3, "hybrid")) == [[(1, 2), (3, 4), (4, 5)]] * 2
    # alpha = 1: RoEC alone; its ties (steps 1, 2, 4) go to the earlier steps
    assert rows(*select_steps(trace, 2, "hybrid", alpha=1.0)) == [[(1, 2), (2, 3)]] * 2


def test_single_signal_rules_by_hand(trace):
    assert rows(*select_steps(trace, 2, "entropy")) == [[(3, 4), (4, 5)]] * 2  # batch entropy 1.5 1.5 3 4 5
    assert rows(*select_steps(trace, 2, "margin")) == [[(1, 2), (3, 4)]] * 2  # lowest batch CM: .2 then .4
    assert rows(*select_steps(trace, 2, "roec")) == [[(1, 2), (2, 3)]] * 2  # ties at .3: earlier steps


def test_per_trajectory(trace):
    # response 2 alone, steps 0-2: 1-CM .3 .7 .1 -> 1/3 1 0; RoEC 0 .5 .2 -> 0 1 .4; score 1/6 1 .2
    scores = step_scores(trace, "hybrid", per="trajectory")
    torch.testing.assert_close(scores[1, :3], torch.tensor([1 / 6, 1.0, 0.2]))
    assert scores[1, 3:].isnan().all()
    got = rows(*select_steps(trace, 2, "hybrid", per="trajectory"))
    assert got[1] == [(1, 2), (2, 3)]
    # a budget beyond the steps a response reaches takes all of them
    assert rows(*select_steps(trace, 9, "hybrid", per="trajectory"))[1] == [(0, 1), (1, 2), (2, 3)]


def test_surprisal_rule_at_tau_zero_is_top_k(trace):
    """tau = 0: the top-k steps by surprisal (the fixture's surprisal is entropy / 2: the entropy rule's steps)."""
    for per in ("batch", "trajectory"):
        want = select_steps(trace, 2, "entropy", per=per)
        got = select_steps(trace, 2, "surprisal", per=per, tau=0.0, seed=5)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), per


def test_surprisal_rule_draws_steps_with_softmax_probabilities():
    """Drift's rule: one step per response drawn with probability softmax(S_t / tau); over 40000 responses
    the frequencies match within 4.5 standard errors; unreached steps are never drawn."""
    surprisal = torch.tensor([0.2, 1.0, 0.5, 2.0, 0.1, NAN])
    n, tau = 20000, 0.7
    signal = surprisal.expand(n, -1).clone()
    count = torch.tensor([1, 1, 1, 1, 1, 0]).expand(n, -1).clone()
    trace = Trace(entropy=signal, margin=signal, roec=signal, surprisal=signal, candidate_entropy=signal,
                  candidate_margin=signal, count=count, filled=torch.zeros_like(count),
                  block=torch.zeros(6, dtype=torch.int64))
    starts, _ = select_steps(trace, 1, "surprisal", per="trajectory", tau=tau, seed=11)
    freq = torch.bincount(starts[:, 0], minlength=6).double() / n
    want = torch.cat([torch.softmax(surprisal[:5].double() / tau, 0), torch.zeros(1, dtype=torch.float64)])
    assert (freq - want).abs().max() <= 4.5 * (want * (1 - want) / n).sqrt().max(), (freq, want)
    assert freq[5] == 0
    two, _ = select_steps(trace, 2, "surprisal", per="trajectory", tau=tau, seed=12)
    assert (two[:, 0] != two[:, 1]).all() and (two >= 0).all(), "without replacement"


def test_the_built_in_rule_names_are_the_ones_selection_defines():
    from atpo_fast.choices import RULES  # what the config accepts without importing torch
    from atpo_fast.selection import rule_names

    assert rule_names() == RULES


def test_a_registered_rule_selects_by_its_score(trace):
    from atpo_fast import register_rule
    from atpo_fast.config import load_config
    from atpo_fast.selection import SCORE_RULES

    register_rule("lowest_entropy", lambda signals, alpha: -signals["entropy"])
    try:
        # per trajectory: row 0 entropies 1..5 -> steps 0, 1; row 1 reaches steps 0-2 with 2, 1, 3 -> steps 0, 1
        assert rows(*select_steps(trace, 2, "lowest_entropy", per="trajectory")) == [[(0, 1), (1, 2)], [(0, 1), (1, 2)]]
        with pytest.raises(ValueError, match="register_rule needs a new name"):
            register_rule("uniform", lambda signals, alpha: signals["entropy"])
        assert load_config(None, ["selection.rule=lowest_entropy"]).selection.rule == "lowest_entropy"
    finally:
        del SCORE_RULES["lowest_entropy"]
    with pytest.raises(ValueError, match="rule must be one of .*'surprisal'\\), got 'lowest_entropy'"):
        select_steps(trace, 2, "lowest_entropy")
    with pytest.raises(ValueError, match="'selection.rule' expects one of .*'surprisal', got 'lowest_entropy'"):
        load_config(None, ["selection.rule=lowest_entropy"])


def test_partition_and_uniform(trace):
    starts, ends = select_steps(trace, 2, "hybrid", mode="partition")  # selected 1, 3
    assert rows(starts, ends) == [[(0, 3), (3, 5)]] * 2
    assert rows(*select_steps(trace, 2, "uniform")) == [[(0, 3), (3, 5)]] * 2
    starts, ends = select_steps(trace, 4, "uniform")  # s = ceil(5/4) = 2: three rows, one slot unused
    assert rows(starts, ends) == [[(0, 2), (2, 4), (4, 5)]] * 2
    assert (starts[:, 3] == -1).all() and (ends[:, 3] == -1).all()


def test_masked_token_set_uses_candidate_signals(trace):
    trace.candidate_entropy = torch.tensor([[0.0, 5.0, 5.1, 1.0, 1.0], [0.0, 5.0, 5.2, 1.0, 1.0]])
    trace.candidate_margin = torch.full((2, 5), 0.5)
    # RoEC on the masked set: |dH| = 0 5 .1 4.1 0 (row 1), 0 5 .2 4.2 0 (row 2); margin flat -> RoEC decides
    assert rows(*select_steps(trace, 2, "hybrid", token_set="masked")) == [[(1, 2), (3, 4)]] * 2


def test_random_rule(trace):
    a = select_steps(trace, 2, "random", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, select_steps(trace, 2, "random", seed=5)))
    picked = rows(*select_steps(trace, 3, "random", seed=1))
    assert len(picked[0]) == 3 and len(set(picked[0])) == 3
    assert all(s < 3 for s, _ in picked[1])  # only steps the response reaches


def test_partition_covers_every_committed_token_once():
    gen = torch.Generator().manual_seed(0)
    batch, length, steps = 6, 40, 12
    for rule in ("hybrid", "entropy", "random", "uniform"):
        step_map = torch.randint(0, steps, (batch, length), generator=gen)
        step_map[:, :5] = -1  # the prompt
        count = torch.stack([(step_map == t).sum(1) for t in range(steps)], 1)
        signals = [torch.rand(batch, steps, generator=gen).tolist() for _ in range(3)]
        trace = make_trace(*signals, count.tolist())
        starts, ends = select_steps(trace, 4, rule, mode="partition", seed=0)
        built = build_step_rows(torch.zeros(batch, length, dtype=torch.int64), step_map, starts, ends, 7)
        hits = torch.zeros(batch, length, dtype=torch.int64)
        hits.index_put_((built.seq_index[built.target_row], built.target_pos),
                        torch.ones_like(built.target_pos), accumulate=True)
        assert torch.equal(hits, (step_map >= 0).long()), rule


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), "budget must be a positive int"),
    (dict(budget=2, rule="best"), "rule must be one of"),
    (dict(budget=2, mode="all"), "mode must be one of"),
    (dict(budget=2, alpha=1.5), r"alpha must lie in \[0, 1\]"),
    (dict(budget=2, rule="surprisal", tau=-1.0), "tau must be >= 0"),
    (dict(budget=2, per="prompt"), "per must be 'batch' or 'trajectory'"),
    (dict(budget=2, token_set="all"), "token_set must be"),
])
def test_bad_arguments(trace, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_steps(trace, **kwargs)


def test_a_missing_trace_is_an_error():
    with pytest.raises(ValueError, match="trace must be a Trace .*record=False.*, got NoneType"):
        select_steps(None, budget=2)  # what generate(record=False) leaves in Rollout.trace


@pytest.mark.parametrize("rule,per", [("random", "batch"), ("hybrid", "trajectory"), ("entropy", "trajectory"),
                                      ("surprisal", "trajectory")])
def test_split_batch_selects_like_the_whole_on_own_rows(trace, rule, per):
    """Rules that need no other rank's rows: a rank holding rows 1: of the batch (row_offset=1) picks
    what the whole batch picks for those rows (random draws are keyed by the global row)."""
    whole = select_steps(trace, 2, rule, per=per, seed=5)
    tail = make_trace(*(getattr(trace, f)[1:].tolist() for f in ("entropy", "margin", "roec", "count")))
    part = select_steps(tail, 2, rule, per=per, seed=5, row_offset=1)
    assert torch.equal(part[0], whole[0][1:]) and torch.equal(part[1], whole[1][1:])


def _two_rank_selection(rank: int, init_file: str, rules: tuple[str, ...], results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        whole = make_trace(*BATCH_TRACE)
        mine = make_trace(*(getattr(whole, f)[rank::2].tolist() for f in ("entropy", "margin", "roec", "count")))
        for rule in rules:
            results[rank, rule] = select_steps(mine, 2, rule, per="batch", tau=0.0, group=dist.group.WORLD,
                                               row_offset=rank)
    finally:
        dist.destroy_process_group()


# four responses whose batch averages differ from either half's: each rank alone would pick other steps
BATCH_TRACE = ([[1, 2, 3, 4, 5], [5, 1, 1, 1, 1], [2, 1, 3, NAN, NAN], [1, 6, 1, 1, NAN]],
               [[0.9, 0.5, 0.8, 0.2, 0.6], [0.1, 0.9, 0.9, 0.9, 0.9], [0.7, 0.3, 0.9, NAN, NAN],
                [0.9, 0.2, 0.9, 0.9, NAN]],
               [[0, 0.1, 0.4, 0.2, 0.3], [0, 0.9, 0.1, 0.1, 0.1], [0, 0.5, 0.2, NAN, NAN], [0, 0.6, 0.1, 0.3, NAN]],
               [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [2, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_batch_average_over_two_ranks_selects_like_the_whole(tmp_path):
    """per="batch" over two gloo ranks, each holding every other response: both pick the steps the
    whole batch picks, which neither rank's own rows would give."""
    import torch.multiprocessing as mp

    rules = ("hybrid", "entropy", "margin", "surprisal")
    results = mp.Manager().dict()
    mp.spawn(_two_rank_selection, args=(str(tmp_path / "init"), rules, results), nprocs=2)
    whole_trace = make_trace(*BATCH_TRACE)
    for rule in rules:
        whole = select_steps(whole_trace, 2, rule, per="batch", tau=0.0)  # tau 0: the surprisal rule draws nothing
        alone = [select_steps(make_trace(*(getattr(whole_trace, f)[rank::2].tolist()
                                           for f in ("entropy", "margin", "roec", "count"))), 2, rule, per="batch",
                              tau=0.0)
                 for rank in range(2)]
        assert any(not torch.equal(a[0], whole[0][r::2]) for r, a in enumerate(alone)), (rule, "separates nothing")
        for rank in range(2):
            got = results[rank, rule]
            assert torch.equal(got[0], whole[0][rank::2]) and torch.equal(got[1], whole[1][rank::2]), (rule, rank)
