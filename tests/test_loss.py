"""The TraceRL loss against a plain float64 implementation, values and gradients; group advantages by hand."""

import pytest
import torch

from atpo_fast.loss import clipped_policy_loss, group_advantages


def plain_loss(logprob, old, advantages, row, num_rows, eps, beta):
    """Row by row, token by token, in float64: the definition written out."""
    total = 0.0
    for r in range(int(row.max()) + 1):
        terms = []
        for i in (row == r).nonzero().flatten().tolist():
            ratio = torch.exp(logprob[i] - old[i])
            surrogate = torch.minimum(ratio * advantages[i], torch.clamp(ratio, 1 - eps, 1 + eps) * advantages[i])
            kl = torch.exp(old[i] - logprob[i]) - (old[i] - logprob[i]) - 1
            terms.append(-surrogate + beta * kl)
        total = total + torch.stack(terms).mean()
    return total / num_rows


@pytest.mark.parametrize("eps,beta", [(0.2, 0.01), (0.1, 0.0), (0.3, 0.5)])
def test_loss_matches_plain_float64(gen, eps, beta):
    tokens, rows = 40, 7
    row = torch.sort(torch.randint(0, rows, (tokens,), generator=gen)).values
    row[:rows] = torch.arange(rows)  # every row holds a target
    row = torch.sort(row).values
    old = -torch.rand(tokens, generator=gen, dtype=torch.float64) * 3
    logprob = (old + torch.randn(tokens, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    advantages = torch.randn(tokens, generator=gen, dtype=torch.float64)
    loss, stats = clipped_policy_loss(logprob, old, advantages, row, num_rows=10, clip_eps=eps, kl_beta=beta)
    (grad,) = torch.autograd.grad(loss, logprob)
    ref_input = logprob.detach().clone().requires_grad_()
    ref = plain_loss(ref_input, old, advantages, row, 10, eps, beta)
    (ref_grad,) = torch.autograd.grad(ref, ref_input)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    ratio = (logprob - old).exp()
    assert stats["clip_fraction"].item() == pytest.approx(((ratio - 1).abs() > eps).double().mean().item())


def test_on_policy_loss_is_minus_mean_advantage():
    """With logprob == old (one update per batch), the surrogate is the advantage and the KL is 0."""
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    row = torch.tensor([0, 0, 1, 1])
    loss, stats = clipped_policy_loss(old.clone(), old, advantages, row, num_rows=2)
    assert loss.item() == pytest.approx(-((1 - 1) / 2 + (2 + 0.5) / 2) / 2)
    assert stats["kl"].item() == 0 and stats["clip_fraction"].item() == 0


def test_micro_batches_add_up(gen):
    """Two micro-batches with the total row count as normaliser sum to the whole batch's loss."""
    row = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    logprob = -torch.rand(7, generator=gen)
    old = logprob + 0.1 * torch.randn(7, generator=gen)
    adv = torch.randn(7, generator=gen)
    whole, _ = clipped_policy_loss(logprob, old, adv, row, num_rows=4)
    first, _ = clipped_policy_loss(logprob[:3], old[:3], adv[:3], row[:3], num_rows=4)
    second, _ = clipped_policy_loss(logprob[3:], old[3:], adv[3:], row[3:] - 2, num_rows=4)
    torch.testing.assert_close(first + second, whole)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    advantages, informative = group_advantages(rewards, 4)
    torch.testing.assert_close(advantages[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # mean .5, population std .5
    assert (advantages[4:8] == 0).all()  # no spread: no signal
    torch.testing.assert_close(advantages[8:], torch.tensor([-1, -1, -1, 3]) / 3 ** 0.5)
    assert informative.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 5)
