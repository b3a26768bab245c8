"""The conditional VAE core: every condition mechanism with every likelihood is one network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedatlas.shared.config import ModelConfig, PreprocessingRecipe, TrainConfig, get_preset
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.nn.vae import CondVAE
from fedatlas.shared.training import TrainingData, compute_loss, fit, make_batch

MECHANISMS = ("onehot", "embedding", "dsbn")
LIKELIHOODS = ("nb", "zinb", "gaussian", "bernoulli", "poisson")


def _data(n_cells: int = 96, n_genes: int = 30, n_conditions: int = 3) -> TrainingData:
    rng = np.random.default_rng(0)
    conditions = rng.integers(0, n_conditions, n_cells)
    rate = rng.gamma(2.0, 1.0, (1, n_genes)) * (1 + conditions[:, None])
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    scales = np.ones((n_conditions, n_genes), np.float32) * 5
    return TrainingData(
        counts, conditions.astype(np.int64), [], scales, conditions.astype(np.int64)
    )


@pytest.mark.parametrize(
    ("mechanism", "likelihood"), list(itertools.product(MECHANISMS, LIKELIHOODS))
)
def test_every_combination_trains(mechanism: str, likelihood: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        n_genes=30,
        condition=mechanism,  # type: ignore[arg-type]
        likelihood=likelihood,  # type: ignore[arg-type]
        encoder_hidden=(16,),
        decoder_hidden=(16,),
        latent_dim=4,
        embedding_dim=3,
        norm="batch" if mechanism == "dsbn" else "layer",
    )
    recipe = PreprocessingRecipe(n_top_genes=30, input_transform=config.input_transform)
    data = _data()
    model = CondVAE(config, n_conditions=3)
    train = TrainConfig(epochs=15, batch_size=32, lr=1e-2, mmd_weight=0.1)
    batch = make_batch(data, np.arange(data.n_cells), recipe)
    model.eval()
    before = compute_loss(model, batch, train, kl_weight=1.0, prototypes=None, sample=False)
    result = fit(model, data, train, recipe, mode="reference", seed=0, progress=None)
    after = compute_loss(model, batch, train, kl_weight=1.0, prototypes=None, sample=False)
    assert np.isfinite(before.monitored)
    assert np.isfinite(after.monitored)
    assert after.monitored < before.monitored, "training did not lower the loss"
    assert result.epochs == 15
    assert result.trained_parameters == model.total_parameter_count()


def test_export_load_round_trip_is_bit_identical() -> None:
    config = get_preset("scpoli").model_config(50)
    model = CondVAE(config, n_conditions=4)
    tensors = model.export_tensors()
    copy = CondVAE(config, n_conditions=4)
    copy.load_tensors(tensors)
    again = copy.export_tensors()
    assert set(again) == set(tensors)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    broken = dict(tensors)
    broken.pop("encoder_input.weight")
    with pytest.raises(ValueError, match=r"encoder_input\.weight"):
        copy.load_tensors(broken)


def test_scalex_preset_has_the_published_parameter_count() -> None:
    # SCALEX's own model on 2,000 genes and 3 batches has 2,105,572 parameters (peer table).
    model = CondVAE(get_preset("scalex").model_config(2000), n_conditions=3)
    assert model.total_parameter_count() == 2_105_572


def test_scpoli_preset_architecture() -> None:
    config = get_preset("scpoli").model_config(2000)
    assert config.encoder_hidden == (44,)  # floor(sqrt(2000)), as scPoli sets it
    assert (config.latent_dim, config.embedding_dim) == (10, 10)
    model = CondVAE(config, n_conditions=3)
    tables = model.condition_tables()
    assert list(tables) == ["embedding"]  # the only condition-specific tensor
    assert tables["embedding"].table().shape == (3, 10)


def test_condition_entry_points() -> None:
    onehot = CondVAE(get_preset("scarches").model_config(100), n_conditions=2)
    assert set(onehot.condition_tables()) == {
        "encoder_condition",
        "decoder_condition",
        "log_theta_condition",
    }
    dsbn = CondVAE(get_preset("scalex").model_config(100), n_conditions=2)
    assert set(dsbn.condition_tables()) == {
        "dsbn.weight",
        "dsbn.bias",
        "dsbn.running_mean",
        "dsbn.running_var",
    }
    # SCALEX's encoder never sees the condition: same input, different conditions, same latent.
    dsbn.eval()
    x = torch.rand(5, 100)
    mean0, _ = dsbn.encode(x, torch.zeros(5, dtype=torch.long))
    mean1, _ = dsbn.encode(x, torch.ones(5, dtype=torch.long))
    assert torch.equal(mean0, mean1)
    gene_condition = CondVAE(
        get_preset("scpoli").model_config(100, dispersion="gene-condition"), n_conditions=2
    )
    assert "log_theta_condition" in gene_condition.condition_tables()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="likelihood"):
        get_preset("scpoli").model_config(100, likelihood="gamma")
    with pytest.raises(ConfigError, match="unknown field"):
        get_preset("scpoli").model_config(100, hidden_units=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("scvi")


def test_mmd_matches_the_multi_scale_kernel_definition() -> None:
    from fedatlas.shared.nn.mmd import KERNEL_BANDWIDTHS, mmd_across_conditions, rbf_mmd

    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (7, 4)), rng.normal(0.8, 1, (5, 4))

    def k(x: np.ndarray, y: np.ndarray) -> float:
        d2 = float(((x - y) ** 2).sum())
        return sum(np.exp(-d2 / (2 * bw)) for bw in KERNEL_BANDWIDTHS)

    def mean_k(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean([k(p, q) for p in x for q in y]))

    expected = mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b)
    got = rbf_mmd(torch.tensor(a), torch.tensor(b)).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert expected > 0.05  # the shifted samples differ
    assert rbf_mmd(torch.tensor(a), torch.tensor(a)).item() == pytest.approx(0.0, abs=1e-9)
    # summed over pairs of conditions; a condition with a single cell is ignored
    h = torch.tensor(np.vstack([a, b, rng.normal(0, 1, (1, 4))]))
    condition = torch.tensor([0] * 7 + [1] * 5 + [2])
    assert mmd_across_conditions(h, condition).item() == pytest.approx(got, rel=1e-9)
