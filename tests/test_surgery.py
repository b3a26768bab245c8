"""Architecture surgery: mapping trains only new condition rows and leaves the release intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anndata import AnnData
from conftest import cells_of

from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.surgery import assert_frozen, moved_tensors, operate

PRESETS = ("scpoli", "scarches", "scalex")


@pytest.mark.parametrize("preset", PRESETS)
def test_mapping_leaves_every_release_tensor_bit_identical(
    preset: str, tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds[preset].release
    # Train for real, with the preset's weight decay, dropout and batch-norm settings in place;
    # scalex trains its DSBN scale and shift when given epochs.
    result = map_onto(
        release, cells_of(query_adata, None), MappingOptions(epochs=6), progress=False
    )
    assert moved_tensors(release, result.model) == []
    assert result.fit is not None
    assert result.fit.epochs == 6
    n_new = 2  # q1, q2
    config = release.model_config
    if preset == "scpoli":  # one embedding row per new condition
        expected = n_new * config.embedding_dim
    elif preset == "scarches":  # one-hot columns of the first layers + a dispersion row
        expected = n_new * (config.encoder_hidden[0] + config.decoder_hidden[0] + config.n_genes)
    else:  # a DSBN scale and shift per gene
        expected = n_new * 2 * config.n_genes
    assert result.trained_parameters == expected
    assert result.total_parameters > 50 * expected  # even in this 200-gene toy network


def test_trained_rows_actually_moved(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds["scpoli"].release
    untrained = operate(release, 2).embedding
    assert untrained is not None
    result = map_onto(
        release, cells_of(query_adata, None), MappingOptions(epochs=6), progress=False
    )
    trained = result.model.embedding
    assert trained is not None
    assert not torch.equal(trained.fresh, untrained.fresh)
    assert torch.equal(trained.frozen, untrained.frozen)


def test_a_moved_tensor_is_detected(tiny_builds: dict[str, BuildResult]) -> None:
    release = tiny_builds["scarches"].release
    model = operate(release, 1)
    assert moved_tensors(release, model) == []
    with torch.no_grad():
        bias = model.output.bias
        bias[0] = torch.nextafter(bias[0], bias[0] + 1)  # one unit in the last place counts
        assert model.encoder_condition is not None
        model.encoder_condition.frozen[0, 0] += 1.0  # type: ignore[index,operator]
    assert moved_tensors(release, model) == ["encoder_condition.table", "output.bias"]
    with pytest.raises(RuntimeError, match="frozen release tensors changed"):
        assert_frozen(release, model)


def test_scalex_projection_needs_no_training(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds["scalex"].release
    result = map_onto(release, cells_of(query_adata, None), progress=False)
    assert result.trained_parameters == 0
    assert result.adaptor is not None  # the new DSBN branches (statistics estimated in one pass)
    rows = result.adaptor.table_rows()
    assert rows["dsbn.running_mean.table"].shape == (2, release.model_config.n_genes)
    assert torch.isfinite(rows["dsbn.running_var.table"]).all()
    # the encoder is condition-free: the latent does not depend on the batch assignment
    other = map_onto(
        release, cells_of(query_adata, None), MappingOptions(site_id="elsewhere"), progress=False
    )
    np.testing.assert_array_equal(result.latent, other.latent)


def test_known_batches_are_only_embedded(
    tiny_builds: dict[str, BuildResult], reference_adata: AnnData
) -> None:
    build = tiny_builds["scpoli"]
    result = map_onto(
        build.release,
        cells_of(reference_adata),
        MappingOptions(site_id="reference"),
        progress=False,
    )
    assert all(a.known for a in result.assignments)
    assert result.fit is None
    assert result.adaptor is None
    assert result.trained_parameters == 0
    # embedding the reference's own cells reproduces the reference latents exactly
    np.testing.assert_allclose(result.latent, build.latent, rtol=0, atol=1e-5)
