"""Confusion-zone analysis on synthetic traces with known answers."""

import math

import pytest
import torch

from atpo_fast.analysis import auroc, best_window, confusion_zone_report, per_step_auroc
from atpo_fast.trace import Trace


def synthetic_trace(entropy: torch.Tensor) -> Trace:
    batch, steps = entropy.shape
    return Trace(entropy=entropy, margin=1 - entropy / (entropy.max() + 1), roec=torch.zeros_like(entropy),
                 surprisal=entropy,
                 candidate_entropy=entropy, candidate_margin=torch.zeros_like(entropy),
                 count=torch.ones(batch, steps, dtype=torch.int64), filled=torch.zeros(batch, steps, dtype=torch.int64),
                 block=torch.zeros(steps, dtype=torch.int64))


def test_auroc_known_values():
    labels = torch.tensor([True, True, False, False])
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), labels) == 1.0  # a perfect predictor
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5  # ties count half
    assert auroc(torch.tensor([0.9, 0.3, 0.5, 0.2]), labels) == 0.75  # 3 of the 4 pairs ordered right
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
    assert auroc(torch.tensor([0.9, float("nan"), 0.1, 0.2]), labels) == 1.0  # NaN entries are dropped


def test_auroc_equals_the_pairwise_count_with_ties(gen):
    """Fresh random scores on a coarse grid (many ties) and NaNs: the rank formula equals counting every pair."""
    for n in (2, 7, 300):
        scores = torch.randint(0, 5, (n,), generator=gen).double()
        scores[torch.rand(n, generator=gen) < 0.1] = float("nan")
        positive = torch.rand(n, generator=gen) < 0.3
        keep = ~scores.isnan()
        pos, neg = scores[keep & positive], scores[keep & ~positive]
        if len(pos) and len(neg):
            pairs = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
            assert auroc(scores, positive) == pytest.approx(pairs.item() / (len(pos) * len(neg)), abs=1e-12)


def test_planted_spike_is_found(gen):
    """Wrong responses spike in entropy at steps 6-8 only: the AUROC peaks there and the best window is 6-9."""
    batch, steps = 200, 16
    failed = torch.rand(batch, generator=gen) < 0.4
    entropy = torch.rand(batch, steps, generator=gen)
    entropy[failed, 6:9] += 3.0
    aurocs = per_step_auroc(entropy, failed)
    assert all(a == 1.0 for a in aurocs[6:9])
    assert all(abs(a - 0.5) < 0.2 for i, a in enumerate(aurocs) if i not in (6, 7, 8))
    window = best_window(entropy, failed)
    assert (window["start"], window["end"], window["auroc"]) == (6, 7, 1.0)  # earliest and narrowest of the ties
    selected = torch.bincount(torch.tensor([6, 7, 8]), minlength=steps)
    report = confusion_zone_report(synthetic_trace(entropy), ~failed, selected)
    spike = report["signals"]["entropy"]
    assert spike["best_window"]["start"] == 6 and spike["auroc_per_step"][7] == 1.0
    # low margin is read as "likely wrong": the margin built from entropy predicts failure equally well
    assert report["signals"]["margin"]["auroc_per_step"][7] == 1.0
    assert spike["mean_wrong"][7] > spike["mean_correct"][7] + 2.5
    assert report["selected_share"][6:9] == pytest.approx([1 / 3] * 3)


def test_concentration_by_hand():
    from atpo_fast.analysis import concentration

    assert concentration([0.9, 0.5, 0.5, 0.6]) == 0.25  # power .4, 0, 0, .1: the first step holds 80%
    assert concentration([0.6, 0.4, 0.6, 0.4]) == 1.0  # spread evenly: every step is needed
    assert concentration([0.5, float("nan")]) != concentration([0.5, float("nan")])  # no power at all: NaN
