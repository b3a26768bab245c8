"""Real-data checks on CellBench (scenarios S1 and S2 of ../shared/data/README.md).

For each preset a reference is built on the three reference datasets and both query plates are
mapped *unlabelled* (their ground-truth labels are only used for scoring). The settings are the
presets' own recipes, shortened where a full recipe takes many minutes on two CPU cores (see
TEST_EPOCHS); ``bench/cellbench.py`` runs the full recipes and prints the peers beside ours.

Every threshold below was derived from measurements of exactly these settings (seed 0) on this
kind of machine: the measured value is noted beside each, and the threshold leaves a margin for
run-to-run variation of floating-point reductions across machines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fedatlas.benchmarks.cellbench import load_scenario
from fedatlas.benchmarks.scoring import MappedQuery, evaluate
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.privacy import PrivacySpec
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release

pytestmark = [pytest.mark.cellbench, pytest.mark.slow]

PRESETS = ("scpoli", "scarches", "scalex")
# Reference epochs per preset (None: the preset's full recipe). SCALEX's recipe runs up to 3,000
# epochs (30,000 iterations), about 15 minutes here; 300 epochs reach most of its quality.
TEST_EPOCHS: dict[str, int | None] = {"scpoli": None, "scarches": None, "scalex": 300}

# Minimum scores, per (scenario, preset). Beside each: the values measured with these settings,
# seed 0, on this two-core machine, then (in parentheses) seeds 1 and 2 for the spread a change of
# initialisation gives; margins cover run-to-run variation of floating-point reductions across
# machines. Peers (issue 2's table) in brackets. The MMD-trained scarches network varies most.
S1_BARS: dict[str, dict[str, float]] = {
    "scpoli": {
        "accuracy": 0.99,  # 1.000 (1.000, 1.000) [scPoli 0.998]
        "macro_f1": 0.99,  # 1.000 (1.000, 1.000) [0.996]
        "knn_purity": 0.98,  # 1.000 (0.998, 0.999)
        "batch_asw": 0.84,  # 0.869 (0.902, 0.874)
        "graph_connectivity": 0.97,  # 1.000
        "overall": 0.92,  # 0.948 (0.948, 0.943) [0.948]
        "seen_called_unknown_max": 0.12,  # 0.041 (0.063, 0.089)
    },
    "scarches": {
        "accuracy": 0.98,  # 1.000 (1.000, 1.000) [trVAE + kNN 0.911]
        "macro_f1": 0.98,  # 1.000 (1.000, 1.000) [0.908]
        "knn_purity": 0.95,  # 0.992 (0.982, 0.975)
        "batch_asw": 0.86,  # 0.909 (0.904, 0.907)
        "graph_connectivity": 0.95,  # 1.000
        "overall": 0.81,  # 0.874 (0.833, 0.856) [0.808]
        "seen_called_unknown_max": 0.03,  # 0.000 (0.000, 0.005)
    },
    "scalex": {
        "accuracy": 0.96,  # 0.978 (0.990, 0.993) [SCALEX + kNN 0.995 with its full recipe]
        "macro_f1": 0.96,  # 0.981 (0.994, 0.995) [0.995]
        "knn_purity": 0.95,  # 0.970 (0.987, 0.982)
        "batch_asw": 0.84,  # 0.877 (0.879, 0.875)
        "graph_connectivity": 0.95,  # 1.000
        "overall": 0.87,  # 0.893 (0.891, 0.906) [0.876]
        "seen_called_unknown_max": 0.03,  # 0.002 (0.005, 0.000)
    },
}
# The kNN presets call cells unknown above the threshold calibrated on the reference (the 99th
# percentile of reference cells' uncertainty when labelled from the other batches): 0.144 (0.211,
# 0.167) for scarches, 0.043 (0.021, 0.028) for scalex. At a fixed 0.5 they called 8 % (10 %,
# 0.4 %) and 9 % (3 %, 14 %) of the unseen cells unknown (scalex measured before it dropped its
# partial last minibatch).
S2_BARS: dict[str, dict[str, float]] = {
    "scpoli": {
        "unknown_auroc": 0.97,  # 0.998 (1.000, 0.999) [scPoli 0.812]
        "unseen_called_unknown": 0.90,  # 0.984 (1.000, 0.996)
        "accuracy": 0.98,  # 1.000 (1.000, 1.000) [0.981]
        "seen_called_unknown_max": 0.08,  # 0.013 (0.056, 0.019)
        "overall": 0.89,  # 0.922 (0.925, 0.930) [0.850]
    },
    "scarches": {
        "unknown_auroc": 0.86,  # 0.901 (0.983, 0.979) [trVAE + kNN 0.976]
        "unseen_called_unknown": 0.35,  # 0.518 (0.565, 0.431)
        "accuracy": 0.98,  # 1.000 (1.000, 1.000) [1.000]
        "seen_called_unknown_max": 0.02,  # 0.006 (0.006, 0.006)
        "overall": 0.68,  # 0.757 (0.706, 0.708) [0.713]
    },
    "scalex": {
        "unknown_auroc": 0.85,  # 0.917 (0.851, 0.875) [SCALEX + kNN 0.784]
        "unseen_called_unknown": 0.50,  # 0.671 (0.643, 0.694)
        "accuracy": 0.98,  # 1.000 (1.000, 1.000) [1.000]
        "seen_called_unknown_max": 0.02,  # 0.000 (0.000, 0.000)
        "overall": 0.78,  # 0.806 (0.807, 0.817) [0.767]
    },
}

_SCORES: dict[tuple[str, str], dict[str, Any]] = {}
_RELEASES: dict[tuple[str, str], Release] = {}


def scores_for(cellbench_dir: Path, scenario: str, preset: str) -> dict[str, Any]:
    """Build, map both query plates unlabelled, and score (computed once per session)."""
    key = (scenario, preset)
    if key not in _SCORES:
        data = load_scenario(cellbench_dir, scenario)
        cells = extract_cells(
            data.reference, source="reference", batch_key="batch", label_keys=["cell_line"]
        )
        release = train_reference(
            cells, preset=preset, epochs=TEST_EPOCHS[preset], seed=0, progress=False
        ).release
        _RELEASES[key] = release
        mapped = []
        for stem, query in data.queries.items():
            started = time.perf_counter()
            result = map_onto(
                release,
                extract_cells(query, source=stem, batch_key="batch"),
                MappingOptions(site_id=stem, seed=0),
                progress=False,
            )
            truth = query.obs["cell_line"].astype(str).to_numpy(dtype=object)
            mapped.append(MappedQuery(stem, truth, result, time.perf_counter() - started))
        _SCORES[key] = evaluate(release, mapped)
        print(f"\n{scenario} {preset}: {_SCORES[key]}")
    return _SCORES[key]


@pytest.mark.parametrize("preset", PRESETS)
def test_s1_query_plates_map_onto_their_lines(preset: str, cellbench_dir: Path) -> None:
    s = scores_for(cellbench_dir, "S1", preset)
    bars = S1_BARS[preset]
    assert s["accuracy"] >= bars["accuracy"]
    assert s["macro_f1"] >= bars["macro_f1"]
    # query cells sit among reference cells of their own line ...
    assert s["knn_purity"] >= bars["knn_purity"]
    # ... while protocols mix within a line
    assert s["integration"]["batch_asw"] >= bars["batch_asw"]
    assert s["integration"]["graph_connectivity"] >= bars["graph_connectivity"]
    assert s["integration"]["overall"] >= bars["overall"]
    # with every line known to the reference, few cells are called unknown
    assert s["seen_called_unknown"] <= bars["seen_called_unknown_max"]


@pytest.mark.parametrize("preset", PRESETS)
def test_s2_unseen_lines_are_flagged(preset: str, cellbench_dir: Path) -> None:
    s = scores_for(cellbench_dir, "S2", preset)
    bars = S2_BARS[preset]
    assert s["n_unseen_cells"] == 255  # A549 and H838 cells of plates 2 and 3
    assert s["unknown_auroc"] >= bars["unknown_auroc"]
    assert s["unseen_called_unknown"] >= bars["unseen_called_unknown"]
    # the three lines the reference knows keep their labels
    assert s["accuracy"] >= bars["accuracy"]
    assert s["seen_called_unknown"] <= bars["seen_called_unknown_max"]
    assert s["integration"]["overall"] >= bars["overall"]


def test_s1_differential_privacy_costs_the_site_nothing_and_withholds_small_lines(
    cellbench_dir: Path,
) -> None:
    """Plate 2 (163 cells, 31-35 per line) mapped onto the S1 scpoli reference with DP.

    Measured (bench/privacy.py, seeds 0-2): the DP-SGD rows move scPoli's latent by about 1e-3,
    so the plate's own labels are the exact mapping's at every epsilon (accuracy 0.951 at 0.5 and
    at infinity). A line is sent only when its noisy count reaches 4 sqrt(10) sigma cells (about
    310 at epsilon 0.5): none of the plate's lines at 0.5, all five without DP. The noise is not
    seeded, so the bars hold for any draw: the rows' effect is three orders below the margin
    and a 35-cell line would need noise of 11 sigma to be sent."""
    scores_for(cellbench_dir, "S1", "scpoli")
    release = _RELEASES[("S1", "scpoli")]
    plate = load_scenario(cellbench_dir, "S1").queries["sc_celseq2_5cl_p2"]
    truth = plate.obs["cell_line"].astype(str).to_numpy()
    outcomes = {}
    for epsilon in (None, 0.5):
        privacy = None if epsilon is None else PrivacySpec(epsilon)
        options = MappingOptions(site_id="p2", seed=0, privacy=privacy)
        labelled = extract_cells(plate, source="p2", batch_key="batch", label_keys=["cell_line"])
        unlabelled = extract_cells(plate, source="p2", batch_key="batch")
        sent = map_onto(release, labelled, options, progress=False).adaptor
        own = map_onto(release, unlabelled, options, progress=False).transfers["cell_line"]
        assert sent is not None
        outcomes[epsilon] = (float((own.called == truth).mean()), len(sent.prototypes(0)))
    exact, private = outcomes[None], outcomes[0.5]
    assert abs(private[0] - exact[0]) <= 0.01, outcomes
    assert (exact[1], private[1]) == (5, 0), outcomes
