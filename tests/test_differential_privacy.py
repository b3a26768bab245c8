"""Differential privacy of what a site sends: the zCDP accountant, the Gaussian releases' noise
and clipping, DP-SGD's per-cell gradients, and private mappings end to end (API and CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anndata import AnnData
from conftest import cells_of

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.shared.data.dataset import DataSource
from fedatlas.shared.model import mapping, training
from fedatlas.shared.model.dp_sgd import DPSGD, per_cell_rows
from fedatlas.shared.model.mapping import MappingOptions, map_onto, plan_mapping
from fedatlas.shared.model.privacy import (
    PrivacySpec,
    clip_rows,
    epsilon_for,
    noisy_mean,
    noisy_variance,
    record_problem,
    rho_for,
)
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.streaming import map_h5ad
from fedatlas.shared.model.training import TrainingData, cache_frozen, cell_terms, make_batch
from fedatlas.shared.wire.bundle import parse_bundle
from fedatlas.shared.wire.signing import write_keypair


def test_zcdp_conversion_is_bun_and_steinkes_and_round_trips() -> None:
    # epsilon = rho + 2 sqrt(rho ln(1/delta)); at (1, 1e-5): rho = (sqrt(1 + L) - sqrt(L))^2
    log_term = math.log(1e5)
    assert rho_for(1.0, 1e-5) == pytest.approx((math.sqrt(1 + log_term) - math.sqrt(log_term)) ** 2)
    assert rho_for(1.0, 1e-5) == pytest.approx(0.020822, rel=1e-4)
    for epsilon in (0.5, 1.0, 2.0, 4.0, 8.0):
        for delta in (1e-5, 1e-8):
            assert epsilon_for(rho_for(epsilon, delta), delta) == pytest.approx(epsilon)
    # composition adds rho: two epsilon-1 releases cost less than epsilon 2 (sublinear)
    assert 1.0 < epsilon_for(2 * rho_for(1.0, 1e-5), 1e-5) < 2.0
    assert rho_for(math.inf, 1e-5) == math.inf
    budget = PrivacySpec(2.0).budget(["counts", "training", "prototypes"])
    assert sum(budget.values()) == pytest.approx(PrivacySpec(2.0).rho)


def test_gaussian_releases_carry_the_stated_noise_around_the_clipped_truth() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(1.0, 0.5, size=(200, 4))
    rows[0] = 1e6  # one extreme cell: clipping bounds what it contributes
    center, radius, deviation, sigma = np.zeros(4), 3.0, 2.0, 5.0
    clipped_sum = clip_rows(rows - center, radius).sum(axis=0)
    draws = [noisy_mean(200, clipped_sum, center, radius, sigma, rng) for _ in range(3000)]
    counts = np.array([d[0] for d in draws])
    means = np.array([d[1] for d in draws])
    assert counts.mean() == pytest.approx(200, abs=0.5)
    assert counts.std() == pytest.approx(sigma, rel=0.05)
    assert np.abs(np.median(means, axis=0) - clipped_sum / 200).max() < 0.02
    squares = (clip_rows(rows - 1.0, deviation) ** 2).sum(axis=0)
    variances = np.array(
        [noisy_variance(squares, 200.0, deviation, sigma, rng) for _ in range(3000)]
    )
    # noise sigma * deviation^2 on the sum of squares, divided by the count
    assert variances[:, 0].std() == pytest.approx(sigma * deviation**2 / 200, rel=0.1)
    # the extreme cell moved the clipped sum by at most the radius
    without = clip_rows(rows[1:] - center, radius).sum(axis=0)
    with_it = clip_rows(rows - center, radius).sum(axis=0)
    assert np.linalg.norm(with_it - without) <= radius + 1e-9


@pytest.mark.parametrize("preset", ["scpoli", "scarches"])
def test_per_cell_gradients_are_each_cells_own_and_clipped_noised_as_stated(
    preset: str, tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds[preset].release
    cells = cells_of(query_adata, None)
    plan = plan_mapping(
        release, cells.genes, cells.batches, {}, MappingOptions(site_id="s", epochs=2)
    )
    model, recipe = plan.model, release.recipe
    data = TrainingData.for_recipe(plan.alignment.apply(cells.counts), plan.conditions, [], recipe)
    cache = cache_frozen(model, data, recipe)
    rows = np.arange(0, 160, 20)  # 8 cells of both new batches
    batch = make_batch(data, rows, recipe, cache)

    def loss_of(b: object) -> torch.Tensor:
        terms = cell_terms(model, b, sample=False)  # type: ignore[arg-type]
        return terms.recon + terms.kl

    with per_cell_rows(model, batch.condition) as leaves:
        grads = torch.autograd.grad(loss_of(batch).sum(), [r for _, r in leaves])
    assert len(leaves) >= 1
    for i, row in enumerate(rows):  # each cell's gradient, computed from that cell alone
        alone = make_batch(data, row[None], recipe, cache)
        with per_cell_rows(model, alone.condition) as own:
            expected = torch.autograd.grad(loss_of(alone).sum(), [r for _, r in own])
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got[i], want[0], rtol=1e-4, atol=1e-6)

    tables = [t for t, _ in leaves]
    generator = torch.Generator().manual_seed(0)
    # no noise and a bound no cell reaches: the plain mean gradient
    with per_cell_rows(model, batch.condition) as fresh_leaves:
        DPSGD(0.0, 1, 8, clip=1e9).step(loss_of(batch), fresh_leaves, batch.condition, generator)
    plain = torch.autograd.grad(
        loss_of(batch).sum() / 8, [t.fresh for t in tables], allow_unused=True
    )
    for table, want in zip(tables, plain, strict=True):
        assert want is not None
        torch.testing.assert_close(table.fresh.grad, want, rtol=1e-4, atol=1e-7)
    # a tiny bound: no cell contributes more than it
    clip = 1e-3
    with per_cell_rows(model, batch.condition) as fresh_leaves:
        DPSGD(0.0, 1, 8, clip=clip).step(loss_of(batch), fresh_leaves, batch.condition, generator)
    total = math.sqrt(sum(float((t.fresh.grad * 8).pow(2).sum()) for t in tables))
    assert total <= 8 * clip * (1 + 1e-5)
    # noise only: standard deviation noise_multiplier * clip / batch size
    with per_cell_rows(model, batch.condition) as fresh_leaves:
        DPSGD(2.0, 1, 8).step(loss_of(batch) * 0, fresh_leaves, batch.condition, generator)
    noise = torch.cat([t.fresh.grad.flatten() for t in tables])
    assert float(noise.std()) == pytest.approx(2.0 / 8, rel=0.35)


@pytest.mark.parametrize(
    ("preset", "epochs", "mechanisms"),
    [
        ("scpoli", 2, {"counts", "training", "prototypes"}),
        ("scalex", 0, {"counts", "statistics", "prototypes"}),  # the release's recipe: no training
        ("scalex", 2, {"counts", "statistics", "training", "prototypes"}),
    ],
)
def test_a_private_mapping_states_what_it_spent_and_nothing_the_data_chose(
    preset: str,
    epochs: int,
    mechanisms: set[str],
    tiny_builds: dict[str, BuildResult],
    query_adata: AnnData,
) -> None:
    release = tiny_builds[preset].release
    options = MappingOptions(site_id="s", epochs=epochs, privacy=PrivacySpec(2.0))
    first, second = (
        map_onto(release, cells_of(query_adata), options, progress=False) for _ in range(2)
    )
    assert first.adaptor is not None
    assert second.adaptor is not None
    record = first.adaptor.content["privacy"]
    assert record_problem(record) is None
    assert record["epsilon"] == pytest.approx(2.0)
    assert set(record["mechanisms"]) == mechanisms
    training = first.adaptor.content["training"]
    assert training["private"]
    assert not {"final_loss", "iterations", "stopped_early"} & set(training)
    # the noise is not drawn from the mapping's (public) seed: the same seed, other numbers
    assert first.adaptor.content_hash != second.adaptor.content_hash
    true_counts = [a.n_cells for a in first.assignments]
    assert [c["n_cells"] for c in first.adaptor.content["conditions"]] != true_counts


def test_site_prepare_with_epsilon_signs_a_private_bundle(
    tiny_builds: dict[str, BuildResult],
    query_adata: AnnData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_builds["scpoli"].release.save(tmp_path / "release")
    key = write_keypair(tmp_path, "site").private
    query_adata.write_h5ad(tmp_path / "site.h5ad")
    assert main(["-q", "site", "prepare", "--reference", str(tmp_path / "release"),
                 "--data", str(tmp_path / "site.h5ad"), "--batch-key", "batch",
                 "--label-key", "cell_type", "--site-id", "h", "--key", str(key),
                 "--epochs", "2", "--out", str(tmp_path / "mapped.h5ad"),
                 "--bundle-out", str(tmp_path / "b.bundle"),
                 "--epsilon", "4", "--delta", "1e-6"]) == 0  # fmt: skip
    content = parse_bundle((tmp_path / "b.bundle").read_bytes()).adaptor().content
    assert content["privacy"]["epsilon"] == pytest.approx(4.0)
    assert content["privacy"]["delta"] == 1e-6
    # the default spends epsilon 1; a negative epsilon is refused before any work
    assert main(["-q", "site", "prepare", "--reference", str(tmp_path / "release"),
                 "--data", str(tmp_path / "site.h5ad"), "--batch-key", "batch",
                 "--site-id", "h", "--key", str(key), "--out", str(tmp_path / "m1.h5ad"),
                 "--bundle-out", str(tmp_path / "d.bundle")]) == 0  # fmt: skip
    default = parse_bundle((tmp_path / "d.bundle").read_bytes()).adaptor().content
    assert default["privacy"]["epsilon"] == pytest.approx(1.0)
    with pytest.raises(SystemExit) as refused:
        main(["-q", "site", "prepare", "--reference", str(tmp_path / "release"),
              "--data", str(tmp_path / "site.h5ad"), "--batch-key", "batch",
              "--site-id", "h", "--key", str(key), "--out", str(tmp_path / "m2.h5ad"),
              "--bundle-out", str(tmp_path / "c.bundle"), "--epsilon", "-1"])  # fmt: skip
    assert refused.value.code == 2
    assert not (tmp_path / "c.bundle").exists()
    assert "epsilon must be positive" in capsys.readouterr().err


def test_rows_trained_without_dp_never_seed_a_private_adaptor(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds["scpoli"].release
    cells = cells_of(query_adata, None)
    kept = {"embedding": torch.full((2, 10), 0.5)}  # rows a federated build's rounds left

    def fresh_rows(privacy: PrivacySpec | None) -> torch.Tensor:
        options = MappingOptions(site_id="s", epochs=2, privacy=privacy)
        plan = plan_mapping(release, cells.genes, cells.batches, {}, options, initial_rows=kept)
        assert plan.model.embedding is not None
        return plan.model.embedding.fresh.detach()

    torch.testing.assert_close(fresh_rows(None), kept["embedding"])
    assert not torch.allclose(fresh_rows(PrivacySpec(4.0)), kept["embedding"])


def test_a_streamed_file_sizes_dp_sgd_by_its_training_sample(
    tiny_builds: dict[str, BuildResult],
    world: SyntheticWorld,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read in chunks, the rows train on a sample of at most --train-cells cells: the minibatches
    per epoch follow the sample (one of 128), not the file's 640 cells (five)."""
    seen: list[DPSGD] = []
    real_fit = training.fit

    def recording_fit(*args: object, **kwargs: object) -> training.FitResult:
        private = kwargs.get("private")
        assert isinstance(private, DPSGD)
        seen.append(private)
        return real_fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mapping, "fit", recording_fit)
    world.sample(640, batches=("q1",), seed=5).write_h5ad(tmp_path / "site.h5ad")
    options = MappingOptions(
        site_id="s", epochs=2, chunk_size=100, train_cells=40, privacy=PrivacySpec(4.0)
    )
    source = DataSource(tmp_path / "site.h5ad", "batch", ("cell_type",))
    result = map_h5ad(
        tiny_builds["scpoli"].release, source, options, chunk_cells=100, progress=False
    )
    assert result.adaptor is not None
    assert record_problem(result.adaptor.content["privacy"]) is None
    assert [dp.n_batches for dp in seen] == [1]
