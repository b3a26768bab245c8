"""The conditional VAE core: one network, three condition mechanisms, five likelihoods.

Tensors fall in two groups. *Trunk* tensors (the encoder, decoder and their statistics) are
trained once, when the reference is built, and frozen forever after. *Condition tables*
(:class:`ConditionTable`, axis 0 = condition) hold everything condition-specific; architecture
surgery (:mod:`fedatlas.shared.model.surgery`) names the two groups, appends rows for new
conditions and checks that mapping trained only those rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedatlas.shared.config import COUNT_LIKELIHOODS, ModelConfig
from fedatlas.shared.model.nn import likelihoods
from fedatlas.shared.model.nn.conditions import ConditionTable
from fedatlas.shared.model.nn.layers import (
    DomainSpecificBatchNorm,
    HiddenActivation,
    HiddenStack,
    SparseLinear,
)
from fedatlas.shared.model.nn.likelihoods import NonZero


@dataclass
class DecoderOutput:
    """What the decoder produces for a minibatch."""

    logits: Tensor  # output before the likelihood's link function (after DSBN, if any)
    zi_logits: Tensor | None  # zero-inflation logits (ZINB only)
    first_hidden: Tensor | None  # activation of the first decoder layer (MMD target)


class CondVAE(nn.Module):
    """Conditional VAE whose condition-specific tensors are all :class:`ConditionTable` rows."""

    def __init__(self, config: ModelConfig, n_conditions: int) -> None:
        super().__init__()
        self.config = config
        cfg = config
        genes, latent = cfg.n_genes, cfg.latent_dim
        enc, dec = cfg.encoder_hidden, cfg.decoder_hidden

        self.embedding: ConditionTable | None = None
        if cfg.condition == "embedding":
            self.embedding = ConditionTable((cfg.embedding_dim,), n_conditions)

        self.encoder_input = nn.Linear(genes, enc[0])
        self.encoder_condition = self._condition_term(enc[0], n_conditions)
        self.encoder_first = HiddenActivation(enc[0], cfg.norm, cfg.dropout)
        self.encoder_hidden = HiddenStack(enc, cfg.norm, cfg.dropout)
        self.latent_mean = nn.Linear(enc[-1], latent)
        self.latent_log_var = nn.Linear(enc[-1], latent)

        self.decoder_input: nn.Linear | None = None
        self.decoder_condition: nn.Module | None = None
        self.decoder_first: HiddenActivation | None = None
        self.decoder_hidden: HiddenStack | None = None
        if dec:
            self.decoder_input = nn.Linear(latent, dec[0])
            self.decoder_condition = self._condition_term(dec[0], n_conditions)
            self.decoder_first = HiddenActivation(dec[0], cfg.norm, cfg.dropout)
            self.decoder_hidden = HiddenStack(dec, cfg.norm, cfg.dropout)
            self.output = nn.Linear(dec[-1], genes)
            self.output_condition: nn.Module | None = None
        else:
            # No hidden decoder layer (SCALEX): the condition, if any, enters at the output.
            self.output = nn.Linear(latent, genes)
            self.output_condition = self._condition_term(genes, n_conditions)

        self.dsbn: DomainSpecificBatchNorm | None = None
        if cfg.condition == "dsbn":
            self.dsbn = DomainSpecificBatchNorm(genes, n_conditions)
        last = dec[-1] if dec else latent
        self.zi_head = nn.Linear(last, genes) if cfg.likelihood == "zinb" else None

        self.log_theta: nn.Parameter | None = None
        self.log_theta_condition: ConditionTable | None = None
        if cfg.likelihood in ("nb", "zinb"):
            if cfg.dispersion == "gene":
                self.log_theta = nn.Parameter(torch.zeros(genes))
            else:
                self.log_theta_condition = ConditionTable((genes,), n_conditions, init="zeros")

    # ----------------------------------------------------------------------------- structure
    def _condition_term(self, width: int, n_conditions: int) -> nn.Module | None:
        if self.config.condition == "onehot":
            return ConditionTable((width,), n_conditions)
        if self.config.condition == "embedding":
            return nn.Linear(self.config.embedding_dim, width, bias=False)
        return None

    def _shift(self, term: nn.Module | None, condition: Tensor) -> Tensor | None:
        if term is None:
            return None
        if isinstance(term, ConditionTable):
            return term(condition)
        assert self.embedding is not None
        rows = self.embedding(condition)
        max_norm = self.config.embedding_max_norm
        if max_norm is not None:
            norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
            rows = rows * torch.clamp(max_norm / norms.clamp(min=1e-12), max=1.0)
        shift: Tensor = term(rows)
        return shift

    def condition_tables(self) -> dict[str, ConditionTable]:
        """Every condition-indexed tensor, by module path."""
        return {n: m for n, m in self.named_modules() if isinstance(m, ConditionTable)}

    @property
    def n_conditions(self) -> int:
        """Number of conditions the network currently knows."""
        return next(iter(self.condition_tables().values())).n_rows

    # ------------------------------------------------------------------------------- forward
    def project_input(self, x_input: Tensor) -> Tensor:
        """First encoder layer without its condition term (cacheable while the trunk is frozen)."""
        out: Tensor = self.encoder_input(x_input)
        return out

    def sparse_projector(self) -> SparseLinear:
        """:meth:`project_input` for sparse input, with the current weights (no gradient)."""
        return SparseLinear(self.encoder_input)

    def encode_projected(self, projected: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        """Rest of the encoder from :meth:`project_input`'s output: latent mean and log-variance."""
        shift = self._shift(self.encoder_condition, condition)
        h = projected if shift is None else projected + shift
        h = self.encoder_hidden(self.encoder_first(h))
        return self.latent_mean(h), self.latent_log_var(h)

    def encode(self, x_input: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean and log-variance of transformed input ``x_input``."""
        return self.encode_projected(self.project_input(x_input), condition)

    def decode_before_dsbn(
        self, z: Tensor, condition: Tensor
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Decoder up to (not including) DSBN: first hidden activation (None without hidden
        layers), last hidden activation, and output logits."""
        first_hidden = None
        last = z
        if self.decoder_input is not None:
            assert self.decoder_first is not None
            assert self.decoder_hidden is not None
            shift = self._shift(self.decoder_condition, condition)
            h0 = self.decoder_input(z)
            first_hidden = self.decoder_first(h0 if shift is None else h0 + shift)
            last = self.decoder_hidden(first_hidden)
        logits = self.output(last)
        shift = self._shift(self.output_condition, condition)
        return first_hidden, last, (logits if shift is None else logits + shift)

    def decode(self, z: Tensor, condition: Tensor) -> DecoderOutput:
        """Decoder outputs for latent ``z``."""
        first_hidden, last, logits = self.decode_before_dsbn(z, condition)
        if self.dsbn is not None:
            logits = self.dsbn(logits, condition)
        zi_logits = self.zi_head(last) if self.zi_head is not None else None
        return DecoderOutput(logits=logits, zi_logits=zi_logits, first_hidden=first_hidden)

    def theta(self, condition: Tensor) -> Tensor:
        """NB inverse dispersion, per gene (broadcast) or per cell's condition."""
        if self.log_theta is not None:
            return torch.exp(self.log_theta).unsqueeze(0)
        assert self.log_theta_condition is not None
        return torch.exp(self.log_theta_condition(condition))

    @property
    def scores_transformed_input(self) -> bool:
        """True when the likelihood scores the transformed input rather than raw counts."""
        return self.config.likelihood not in COUNT_LIKELIHOODS

    def reconstruction_nll(
        self,
        out: DecoderOutput,
        counts: Tensor,
        nonzero: NonZero,
        library: Tensor,
        condition: Tensor,
        transformed: Tensor | None = None,
        fixed_terms: Tensor | None = None,
    ) -> Tensor:
        """Per-cell negative log-likelihood of the data under the decoder's output.

        Count likelihoods score raw ``counts`` (dense, with their ``nonzero`` entries) with mean
        softmax(logits) x observed library size; Gaussian and Bernoulli score the
        ``transformed`` input (required for them, see :attr:`scores_transformed_input`).
        ``fixed_terms``: these cells' :meth:`fixed_likelihood_terms`, if computed already.
        """
        lik = self.config.likelihood
        if fixed_terms is not None and lik != "nb":
            raise ValueError(f"the {lik} likelihood has no fixed terms to pass in")
        if lik in COUNT_LIKELIHOODS:
            log_library = torch.log(library.clamp(min=1.0)).unsqueeze(-1)
            log_mu = torch.log_softmax(out.logits, dim=-1) + log_library
            if lik == "poisson":
                return likelihoods.poisson_nll(counts, nonzero, log_mu)
            theta = self.theta(condition)
            if lik == "nb":
                return likelihoods.negative_binomial_nll(
                    counts, nonzero, log_mu, theta, fixed_terms
                )
            assert out.zi_logits is not None
            return likelihoods.zero_inflated_nb_nll(counts, nonzero, log_mu, theta, out.zi_logits)
        if transformed is None:
            raise ValueError(f"the {lik} likelihood scores the transformed input; pass it")
        if lik == "gaussian":
            return likelihoods.gaussian_nll(transformed, out.logits)
        return likelihoods.bernoulli_nll(transformed, out.logits)

    @property
    def has_fixed_likelihood_terms(self) -> bool:
        """True when some likelihood terms depend on no trainable tensor, so that they can be
        computed once per cell (:meth:`fixed_likelihood_terms`): NB with a frozen per-gene
        dispersion, as a release's trunk is during mapping."""
        return (
            self.config.likelihood == "nb"
            and self.log_theta is not None
            and not self.log_theta.requires_grad
        )

    @torch.no_grad()
    def fixed_likelihood_terms(self, nonzero: NonZero, n_cells: int) -> Tensor:
        """Per cell, the NB terms the mean does not enter (its Gamma-function and dispersion
        terms) of cells whose non-zero counts are ``nonzero``; see
        :attr:`has_fixed_likelihood_terms`."""
        if not self.has_fixed_likelihood_terms or self.log_theta is None:
            raise ValueError("only an NB likelihood with a frozen per-gene dispersion has them")
        theta = torch.exp(self.log_theta).unsqueeze(0)
        return likelihoods.negative_binomial_constant(nonzero, n_cells, theta)

    # ---------------------------------------------------------------------------- freezing
    def freeze_all(self) -> None:
        """Freeze trunk parameters and every condition row (the state of a published release)."""
        for p in self.parameters():
            p.requires_grad_(False)
        for table in self.condition_tables().values():
            table.freeze()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require gradients (only new condition rows after surgery)."""
        return [p for p in self.parameters() if p.requires_grad and p.numel() > 0]

    def total_parameter_count(self) -> int:
        """Learnable values of the model: trunk parameters plus every row of learnable tables
        (statistics such as running means are not counted)."""
        tables = self.condition_tables()
        table_params = {id(t.fresh) for t in tables.values() if t.learnable}
        trunk = sum(p.numel() for p in self.parameters() if id(p) not in table_params)
        rows = sum(t.n_rows * math.prod(t.row_shape) for t in tables.values() if t.learnable)
        return trunk + rows
