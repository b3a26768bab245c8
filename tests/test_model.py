"""The conditional VAE core: every condition mechanism with every likelihood is one network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedatlas.shared.config import ModelConfig, PreprocessingRecipe, TrainConfig, get_preset
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.nn.layers import SparseLinear, SparseRows
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.surgery import add_conditions, export_tensors, load_tensors
from fedatlas.shared.model.training import (
    TrainingData,
    cache_frozen,
    compute_loss,
    fit,
    iter_inputs,
    latent_means,
    make_batch,
    rows_input,
)

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


@pytest.mark.parametrize(
    ("n_cells", "drop_last", "steps"), [(100, False, 4), (100, True, 3), (20, True, 1)]
)
def test_drop_last_skips_only_a_partial_final_minibatch(
    n_cells: int, drop_last: bool, steps: int
) -> None:
    # 100 cells in minibatches of 32: 32+32+32+4; SCALEX's loader drops the 4. With 20 cells
    # there is no full minibatch, and dropping it would leave an epoch that trains nothing.
    config = get_preset("scalex").model_config(30)
    model = CondVAE(config, n_conditions=3)
    recipe = PreprocessingRecipe(n_top_genes=30, input_transform=config.input_transform)
    train = TrainConfig(epochs=2, batch_size=32, drop_last=drop_last)
    result = fit(model, _data(n_cells), train, recipe, mode="reference", seed=0, progress=None)
    assert result.iterations == 2 * steps


def test_export_load_round_trip_is_bit_identical() -> None:
    config = get_preset("scpoli").model_config(50)
    model = CondVAE(config, n_conditions=4)
    tensors = export_tensors(model)
    copy = CondVAE(config, n_conditions=4)
    load_tensors(copy, tensors)
    again = export_tensors(copy)
    assert set(again) == set(tensors)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    broken = dict(tensors)
    broken.pop("encoder_input.weight")
    with pytest.raises(ValueError, match=r"encoder_input\.weight"):
        load_tensors(copy, broken)


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


@pytest.mark.parametrize("preset", ["scpoli", "scarches", "scalex"])
def test_sparse_projection_matches_the_dense_encoder(preset: str) -> None:
    # Projection never densifies the input; the dense encoder input gives the same latents.
    rng = np.random.default_rng(1)
    n_cells, n_genes = 300, 200
    stored = rng.random((n_cells, n_genes)) < 0.1
    stored[::50] = False  # cells without counts
    counts = sp.csr_matrix(stored * rng.integers(1, 30, (n_cells, n_genes)), dtype=np.float32)
    conditions = rng.integers(0, 3, n_cells)
    config = get_preset(preset).model_config(n_genes)
    recipe = PreprocessingRecipe(n_top_genes=n_genes, input_transform=config.input_transform)
    data = TrainingData.for_recipe(counts, conditions, [], recipe)
    torch.manual_seed(0)
    model = CondVAE(config, n_conditions=3).eval()
    with torch.no_grad():
        dense = rows_input(data, slice(None), recipe)
        projected = model.project_input(dense)
        mean, log_var = model.encode(dense, torch.from_numpy(conditions))
    np.testing.assert_allclose(latent_means(model, data, recipe), mean, atol=1e-5)
    cache = cache_frozen(model, data, recipe)
    if preset == "scalex":  # the encoder never sees the condition: whole encodings are cached
        assert cache.mean is not None
        assert cache.log_var is not None
        np.testing.assert_allclose(cache.mean, mean, atol=1e-5)
        np.testing.assert_allclose(cache.log_var, log_var, atol=1e-5)
    else:
        np.testing.assert_allclose(cache.projected, projected, atol=1e-5)
    project = model.sparse_projector()
    chunked = torch.cat([project(x) for _, x, _ in iter_inputs(data, recipe, chunk_cells=64)])
    np.testing.assert_allclose(chunked, projected, atol=1e-5)


@pytest.mark.parametrize("preset", ["scpoli", "scarches", "scalex"])
def test_a_minibatch_from_the_mapping_cache_has_the_same_loss_and_gradient(preset: str) -> None:
    # Mapping computes once per cell what the frozen network yields for it alone (the encoder's
    # projection; with scpoli's frozen per-gene NB dispersion also the Gamma-function and
    # dispersion terms). Scored from that cache, a minibatch must have the loss and the
    # adaptor's gradient of the same minibatch scored from scratch.
    rng = np.random.default_rng(2)
    n_cells, n_genes = 120, 200
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, (n_cells, n_genes))), dtype=np.float32)
    conditions = rng.integers(0, 4, n_cells)  # condition 3 is the site's new one
    config = get_preset(preset).model_config(n_genes)
    recipe = PreprocessingRecipe(n_top_genes=n_genes, input_transform=config.input_transform)
    data = TrainingData.for_recipe(counts, conditions, [], recipe)
    torch.manual_seed(0)
    model = CondVAE(config, n_conditions=3)
    with torch.no_grad():
        for parameter in model.parameters():  # a trained-looking dispersion, not all ones
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.freeze_all()
    add_conditions(model, 1)
    cache = cache_frozen(model, data, recipe)
    assert (cache.fixed_likelihood_terms is not None) == (preset == "scpoli")
    train = TrainConfig(epochs=1)
    rows = np.arange(0, n_cells, 3)
    scored = []
    for source in (None, cache):
        model.zero_grad(set_to_none=True)
        batch = make_batch(data, rows, recipe, source)
        loss = compute_loss(model, batch, train, kl_weight=1.0, prototypes=None, sample=False)
        loss.total.backward()
        scored.append((loss.total.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    (fresh_loss, fresh_grads), (cached_loss, cached_grads) = scored
    torch.testing.assert_close(cached_loss, fresh_loss, rtol=1e-5, atol=1e-3)
    assert fresh_grads, "the new condition has trainable rows"
    for fresh, cached in zip(fresh_grads, cached_grads, strict=True):
        assert fresh.abs().sum() > 0
        torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-5)


def test_sparse_linear_matches_linear_across_column_blocks() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 300)  # three column blocks, the last one partial
    dense = torch.rand(6, 40) * (torch.rand(6, 40) < 0.2)
    dense[2] = 0  # a row without entries gives the bias
    csr = sp.csr_matrix(dense.numpy())
    x = SparseRows(
        torch.from_numpy(csr.indices), torch.from_numpy(csr.indptr), torch.from_numpy(csr.data)
    )
    with torch.no_grad():
        torch.testing.assert_close(SparseLinear(linear)(x), linear(dense))


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="likelihood"):
        get_preset("scpoli").model_config(100, likelihood="gamma")
    with pytest.raises(ConfigError, match="unknown field"):
        get_preset("scpoli").model_config(100, hidden_units=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("scvi")


def test_mmd_matches_the_multi_scale_kernel_definition() -> None:
    from fedatlas.shared.model.nn.mmd import KERNEL_BANDWIDTHS, mmd_across_conditions, rbf_mmd

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
