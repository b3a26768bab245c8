"""Secure aggregation's plan settings and arithmetic (the Flower run itself:
``tests/test_flower_federated.py``): what a plan without it reads like, what it refuses, what a
site masks and how the unmasked mean becomes the next trunk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedatlas.cli import main
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.federated import SECURE_FIELDS, FederatedPlan, update_norm
from fedatlas.shared.model.secure_aggregation import (
    aggregated_trunk,
    clip_bound,
    noise_std,
    seed_quantisation,
    site_vector,
    updated_names,
)


def test_a_plan_without_secure_aggregation_reads_as_before_it_existed() -> None:
    plain = FederatedPlan(rounds=3)
    names = {f.name for f in dataclasses.fields(FederatedPlan)}
    assert set(plain.to_dict()) == names - set(SECURE_FIELDS)
    assert "secure" not in plain.to_json()
    secure = FederatedPlan(rounds=3, secure_aggregation=True, dp_noise_multiplier=0.5)
    assert set(secure.to_dict()) == names
    assert FederatedPlan.from_json(secure.to_json()) == secure
    assert FederatedPlan.from_json(plain.to_json()) == plain


@pytest.mark.parametrize(
    "settings",
    [
        {"secure_aggregation": True, "aggregation": "median"},
        {"secure_aggregation": True, "aggregation": "trimmed-mean"},
        {"dp_noise_multiplier": 1.0},
        {"secure_aggregation": True, "secure_clip_norm": 0.0},
        {"secure_aggregation": True, "dp_noise_multiplier": -1.0},
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FederatedPlan(**settings)  # type: ignore[arg-type]


def _trunk(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 5, generator=generator),
        "b": torch.randn(5, generator=generator),
        "counter": torch.tensor(7, dtype=torch.int64),
    }


def test_each_site_clips_its_update_and_the_weighted_mean_becomes_the_trunk() -> None:
    sent = _trunk(0)
    trained = []
    for seed, scale in [(1, 0.1), (2, 0.2), (3, 5.0)]:  # the third is far longer than the clip
        moved = _trunk(seed)
        trained.append({k: sent[k] + scale * moved[k] if k != "counter" else sent[k] + 3
                        for k in sent})  # fmt: skip
    clip = 1.0
    vectors = [site_vector(sent, t, clip) for t in trained]
    assert updated_names(sent) == ["b", "w"]
    for vector, trunk in zip(vectors, trained, strict=True):
        length = float(np.sqrt(sum((v**2).sum() for v in vector[:-1])))
        assert length == pytest.approx(min(update_norm(sent, trunk), clip))
        assert vector[-1][0] == pytest.approx(min(update_norm(sent, trunk), clip))
    assert float(vectors[2][-1][0]) == clip  # the long update was clipped
    weights = [240, 210, 156]
    mean = [sum(w * v[i] for w, v in zip(weights, vectors, strict=True)) / sum(weights)
            for i in range(3)]  # fmt: skip
    trunk, mean_norm = aggregated_trunk(sent, mean, 0.0)
    assert torch.allclose(trunk["b"], sent["b"] + torch.from_numpy(mean[0]).float())
    assert torch.allclose(trunk["w"], sent["w"] + torch.from_numpy(mean[1]).float())
    assert trunk["counter"] == sent["counter"]  # counters are not updates
    assert mean_norm == pytest.approx(float(mean[2][0]))
    with pytest.raises(ValueError, match="shape"):
        aggregated_trunk(sent, [mean[1], mean[0], mean[2]], 0.0)


def test_dp_noise_is_calibrated_to_one_sites_influence_and_fixes_the_clip() -> None:
    plan = FederatedPlan(secure_aggregation=True, secure_clip_norm=2.0, dp_noise_multiplier=1.5)
    assert noise_std(plan, 2.0, [100, 300]) == pytest.approx(1.5 * 2.0 * 300 / 400)
    assert clip_bound(plan, 0.3) == 2.0  # DP: the bound never follows the data
    no_dp = dataclasses.replace(plan, dp_noise_multiplier=0.0)
    assert noise_std(no_dp, 2.0, [100, 300]) == 0.0
    assert clip_bound(no_dp, None) == 2.0
    assert clip_bound(no_dp, 0.3) == pytest.approx(no_dp.clip_factor * 0.3)
    sent = {"w": torch.zeros(200, 50)}
    noisy, _ = aggregated_trunk(sent, [np.zeros((200, 50)), np.array([0.0])], 0.25)
    assert float(noisy["w"].std()) == pytest.approx(0.25, rel=0.05)


def test_the_operator_option_refuses_a_robust_aggregation_it_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["coordinator", "federated-build", "--store", str(tmp_path), "--rounds", "1",
                 "--secure-aggregation", "--aggregation", "median"])  # fmt: skip
    assert code == 2
    assert "secure aggregation hides each site's update" in capsys.readouterr().err


def test_the_quantisation_rounds_alike_in_every_run_of_a_plan() -> None:
    plan = FederatedPlan(secure_aggregation=True, seed=3)
    draws = []
    for site in ("a", "a", "b"):
        seed_quantisation(plan, 1, site)
        draws.append(np.random.rand(4))  # what Flower's stochastic rounding draws from
    assert np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
