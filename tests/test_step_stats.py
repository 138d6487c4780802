"""step_stats against the float64 reference."""

import pytest
import torch

from atpo_fast import StepStats, step_stats, token_stats
from atpo_fast import reference


@pytest.mark.parametrize("relative", [False, True])
def test_matches_reference(gen, relative):
    entropy = torch.rand(3, 5, 37, generator=gen) * 4
    margin = torch.rand(3, 5, 37, generator=gen)
    mask = torch.rand(3, 5, 37, generator=gen) < 0.3
    mask[0, 1] = False  # an empty token set
    mask[2, 4] = True  # a full one
    prev = torch.rand(3, 5, generator=gen) * 4
    prev[1, 0] = 0.0  # relative RoEC divides by (prev + 1e-6)
    got = step_stats((entropy, margin), mask, prev_entropy=prev, relative=relative)
    ref = reference.step_stats(entropy, margin, mask, prev, relative)
    assert isinstance(got, StepStats)
    for name in ("entropy", "margin", "roec"):
        torch.testing.assert_close(getattr(got, name).double(), ref[name], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(got.count, ref["count"])
    assert got.entropy[0, 1].isnan() and got.count[0, 1] == 0


def test_first_step_and_token_stats_input(gen):
    logits = torch.randn(2, 9, 50, generator=gen)
    stats = token_stats(logits)
    mask = torch.rand(2, 9, generator=gen) < 0.5
    mask[:, 0] = True
    got = step_stats(stats, mask)
    assert torch.equal(got.roec, torch.zeros(2))
    ref = reference.step_stats(stats.entropy, stats.margin, mask)
    torch.testing.assert_close(got.entropy.double(), ref["entropy"], rtol=1e-6, atol=1e-7)


def test_roec_of_a_trajectory(gen):
    """Chaining steps: RoEC_t = |H_t - H_{t-1}|."""
    entropy = torch.rand(4, 6, 20, generator=gen)  # [T, B, L]
    masks = torch.rand(4, 6, 20, generator=gen) < 0.5
    masks[..., 0] = True
    prev, roecs, means = None, [], []
    for t in range(4):
        s = step_stats((entropy[t], entropy[t]), masks[t], prev_entropy=prev)
        prev = s.entropy
        roecs.append(s.roec)
        means.append(s.entropy)
    means = torch.stack(means)
    torch.testing.assert_close(torch.stack(roecs)[1:], (means[1:] - means[:-1]).abs())


@pytest.mark.parametrize("args,match", [
    (((torch.rand(2, 5), torch.rand(2, 5)), torch.ones(2, 5)), "token_mask must be a bool"),
    (((torch.rand(2, 5), torch.rand(2, 4)), torch.ones(2, 5, dtype=torch.bool)), "margin must have"),
    ((torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool)), "stats_or_entropy_margin"),
    (((torch.rand(2, 5), torch.rand(2, 5)), torch.ones(2, 5, dtype=torch.bool), torch.rand(3)), "prev_entropy"),
    (((torch.ones(2, 5, dtype=torch.long), torch.rand(2, 5)), torch.ones(2, 5, dtype=torch.bool)), "entropy must be"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        step_stats(*args)
