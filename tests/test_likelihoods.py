"""The reconstruction likelihoods agree with scipy's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from fedatlas.shared.model.nn import likelihoods as lk


@pytest.fixture
def counts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(32, 50, generator=gen) ** 3 * 6, generator=gen)
    log_mu = torch.randn(32, 50, generator=gen)
    theta = torch.rand(1, 50, generator=gen) * 3 + 0.2
    return x, log_mu, theta


def test_negative_binomial_matches_scipy(counts: tuple[torch.Tensor, ...]) -> None:
    x, log_mu, theta = counts
    mu, t = log_mu.exp().numpy(), np.broadcast_to(theta.numpy(), x.shape)
    expected = -stats.nbinom.logpmf(x.numpy(), t, t / (t + mu)).sum(axis=1)
    got = lk.negative_binomial_nll(x, lk.NonZero.from_dense(x), log_mu, theta).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_negative_binomial_with_its_constant_passed_in(counts: tuple[torch.Tensor, ...]) -> None:
    # While the dispersion is frozen, the terms the mean does not enter are computed once per
    # cell and passed in; the likelihood and its gradient in the mean must not change.
    x, log_mu, theta = counts
    nz = lk.NonZero.from_dense(x)
    constant = lk.negative_binomial_constant(nz, x.shape[0], theta)
    expected = -stats.nbinom.logpmf(
        x.numpy(), theta.numpy(), theta.numpy() / (theta + log_mu.exp()).numpy()
    )
    assert not np.allclose(constant.numpy(), 0)
    grads = []
    for passed in (None, constant):
        mean = log_mu.clone().requires_grad_(True)
        nll = lk.negative_binomial_nll(x, nz, mean, theta, passed)
        np.testing.assert_allclose(nll.detach().numpy(), expected.sum(axis=1), rtol=1e-5)
        nll.sum().backward()
        grads.append(mean.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_zero_inflated_nb_matches_its_definition(counts: tuple[torch.Tensor, ...]) -> None:
    x, log_mu, theta = counts
    zi = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    mu, t, xs = log_mu.exp().numpy(), np.broadcast_to(theta.numpy(), x.shape), x.numpy()
    pi = special.expit(zi.numpy())
    nb = stats.nbinom.pmf(xs, t, t / (t + mu))
    expected = -np.log(np.where(xs == 0, pi + (1 - pi) * nb, (1 - pi) * nb)).sum(axis=1)
    got = lk.zero_inflated_nb_nll(x, lk.NonZero.from_dense(x), log_mu, theta, zi).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_poisson_matches_scipy(counts: tuple[torch.Tensor, ...]) -> None:
    x, log_mu, _ = counts
    expected = -stats.poisson.logpmf(x.numpy(), log_mu.exp().numpy()).sum(axis=1)
    got = lk.poisson_nll(x, lk.NonZero.from_dense(x), log_mu).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_and_bernoulli() -> None:
    target = torch.tensor([[0.0, 1.0, 0.5]])
    assert lk.gaussian_nll(target, target).item() == 0.0
    assert lk.gaussian_nll(target, target + 1).item() == pytest.approx(3.0)
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).sum()
    assert lk.bernoulli_nll(target, logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_theta_and_mean(counts: tuple[torch.Tensor, ...]) -> None:
    x, log_mu, theta = counts
    log_mu = log_mu.clone().requires_grad_(True)
    theta = theta.clone().requires_grad_(True)
    lk.negative_binomial_nll(x, lk.NonZero.from_dense(x), log_mu, theta).sum().backward()
    assert log_mu.grad is not None
    assert torch.isfinite(log_mu.grad).all()
    assert theta.grad is not None
    assert theta.grad.abs().sum() > 0
