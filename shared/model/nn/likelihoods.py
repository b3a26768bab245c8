"""Reconstruction likelihoods: negative log-likelihood per cell, summed over genes.

Count likelihoods take the log mean (``log_mu``). Their Gamma-function terms (log(x!) and the
negative binomial's lgamma(x + theta) - lgamma(theta)) vanish where a count is zero, so they are
evaluated on the minibatch's non-zero entries only (:class:`NonZero`, known from the sparse
input): their cost follows the data's sparsity. The NB's terms that the mean does not enter
(:func:`negative_binomial_constant`) can be computed once per cell and passed in while the
dispersion is not being trained (mapping), which skips the Gamma functions at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


@dataclass(frozen=True)
class NonZero:
    """Coordinates and values of a minibatch's non-zero counts."""

    rows: Tensor  # int64
    cols: Tensor  # int64
    values: Tensor  # float32

    @classmethod
    def from_dense(cls, x: Tensor) -> NonZero:
        """Non-zero entries of a dense matrix."""
        rows, cols = (x > 0).nonzero(as_tuple=True)
        return cls(rows, cols, x[rows, cols])

    def gather(self, dense: Tensor) -> Tensor:
        """Entries of ``dense`` (cells x genes, or 1 x genes broadcast) at the non-zeros."""
        if dense.shape[0] == 1:
            return dense[0, self.cols]
        return dense[self.rows, self.cols]

    def row_sum(self, values: Tensor, n_rows: int) -> Tensor:
        """Sum per cell of values given at the non-zeros."""
        return torch.zeros(n_rows, dtype=values.dtype).index_add(0, self.rows, values)


def _log_factorial(nz: NonZero, n_cells: int) -> Tensor:
    """Per cell, the sum of log(x!) (zero wherever x = 0; no parameter affects it)."""
    return nz.row_sum(torch.lgamma(nz.values + 1.0), n_cells)


def _log_gamma_ratio(nz: NonZero, n_cells: int, theta: Tensor) -> Tensor:
    """Per cell, the sum of lgamma(x + theta) - lgamma(theta) - log(x!) (zero where x = 0)."""
    t = nz.gather(theta)
    x = nz.values
    return nz.row_sum(torch.lgamma(x + t) - torch.lgamma(t) - torch.lgamma(x + 1.0), n_cells)


def negative_binomial_constant(nz: NonZero, n_cells: int, theta: Tensor) -> Tensor:
    """Per cell, the terms of the NB negative log-likelihood that the mean does not enter:
    -sum(theta log theta) and the Gamma-function terms of the non-zero counts ``nz``."""
    theta_terms = (theta * torch.log(theta + EPS)).sum(dim=-1)
    return -(theta_terms + _log_gamma_ratio(nz, n_cells, theta))


def negative_binomial_nll(
    x: Tensor, nz: NonZero, log_mu: Tensor, theta: Tensor, constant: Tensor | None = None
) -> Tensor:
    """NB(mean exp(``log_mu``), inverse dispersion ``theta``) negative log-likelihood of the
    counts ``x`` (dense) whose non-zero entries are ``nz``. ``constant``: the cells'
    :func:`negative_binomial_constant`, when known already (computed here otherwise)."""
    if constant is None:
        constant = negative_binomial_constant(nz, x.shape[0], theta)
    mean_terms = (theta + x) * torch.log(theta + log_mu.exp() + EPS) - x * log_mu
    return mean_terms.sum(dim=-1) + constant


def zero_inflated_nb_nll(
    x: Tensor, nz: NonZero, log_mu: Tensor, theta: Tensor, zi_logits: Tensor
) -> Tensor:
    """Zero-inflated NB negative log-likelihood; ``zi_logits`` are the dropout logits."""
    softplus_pi = F.softplus(-zi_logits)
    log_theta_mu = torch.log(theta + log_mu.exp() + EPS)
    pi_theta_log = -zi_logits + theta * (torch.log(theta + EPS) - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = -softplus_pi + pi_theta_log + x * (log_mu - log_theta_mu)
    log_lik = torch.where(x > 0, case_non_zero, case_zero)
    return -(log_lik.sum(dim=-1) + _log_gamma_ratio(nz, x.shape[0], theta))


def poisson_nll(x: Tensor, nz: NonZero, log_mu: Tensor) -> Tensor:
    """Poisson negative log-likelihood of counts ``x`` with rate exp(``log_mu``)."""
    return (log_mu.exp() - x * log_mu).sum(dim=-1) + _log_factorial(nz, x.shape[0])


def gaussian_nll(target: Tensor, mean: Tensor) -> Tensor:
    """Sum of squared errors (Gaussian with unit variance, up to a constant)."""
    return ((target - mean) ** 2).sum(dim=-1)


def bernoulli_nll(target: Tensor, logits: Tensor) -> Tensor:
    """Binary cross-entropy of values in [0, 1] against sigmoid(``logits``)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=-1)
