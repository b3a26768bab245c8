"""Real-data checks on CellBench (scenarios S1 and S2 of ../shared/data/README.md).

For each preset a reference is built on the three reference datasets and both query plates are
mapped *unlabelled* (their ground-truth labels are only used for scoring). The settings are the
presets' own recipes, shortened where a full recipe takes many minutes on two CPU cores (see
TEST_EPOCHS); ``bench/cellbench.py`` runs the full recipes and prints the peers beside ours.

Every threshold below was derived from measurements of exactly these settings (seed 0) on this
kind of machine: the measured value is noted beside each, and the threshold leaves a margin for
run-to-run variation of floating-point reductions across thread counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fedatlas.shared.cellbench import load_scenario
from fedatlas.shared.dataset import extract_cells
from fedatlas.shared.evaluation import MappedQuery, evaluate
from fedatlas.shared.mapping import map_cells
from fedatlas.shared.reference import build_reference

pytestmark = [pytest.mark.cellbench, pytest.mark.slow]

PRESETS = ("scpoli", "scarches", "scalex")
# Reference epochs per preset (None: the preset's full recipe). SCALEX's recipe runs up to 3,000
# epochs (30,000 iterations), about 15 minutes here; 300 epochs reach most of its quality.
TEST_EPOCHS: dict[str, int | None] = {"scpoli": None, "scarches": None, "scalex": 300}

# Minimum scores, per (scenario, preset). Beside each: the values measured with these settings,
# seed 0, on two-core machines (this one and CI's; the range where repeated runs differed). scPoli
# repeats to the third decimal; the MMD-trained scarches network varies most between machines
# (S2 unknown AUROC 0.912-0.956, unseen called unknown 18-33 %), so its margins are widest.
# Peers (issue 2's table) in brackets.
S1_BARS: dict[str, dict[str, float]] = {
    "scpoli": {
        "accuracy": 0.99,  # 1.000 [scPoli 0.998]
        "macro_f1": 0.99,  # 1.000 [0.996]
        "knn_purity": 0.98,  # 1.000
        "batch_asw": 0.84,  # 0.869
        "graph_connectivity": 0.97,  # 1.000
        "overall": 0.92,  # 0.948 [0.948]
    },
    "scarches": {
        "accuracy": 0.98,  # 0.998-1.000 [trVAE + kNN 0.911]
        "macro_f1": 0.98,  # 0.996-1.000 [0.908]
        "knn_purity": 0.95,  # 0.971-0.988
        "batch_asw": 0.86,  # 0.902-0.908
        "graph_connectivity": 0.95,  # 1.000
        "overall": 0.83,  # 0.860-0.863 [0.808]
    },
    "scalex": {
        "accuracy": 0.97,  # 0.990 (kNN transfer) [SCALEX + kNN 0.995 with its full recipe]
        "macro_f1": 0.97,  # 0.993 [0.995]
        "knn_purity": 0.95,  # 0.981-0.982
        "batch_asw": 0.84,  # 0.877
        "graph_connectivity": 0.95,  # 1.000
        "overall": 0.87,  # 0.902 [0.876]
    },
}
S2_BARS: dict[str, dict[str, float]] = {
    "scpoli": {
        "unknown_auroc": 0.97,  # 0.998 [scPoli 0.812]
        "unseen_called_unknown": 0.90,  # 0.984
        "accuracy": 0.98,  # 1.000 [0.981]
        "seen_called_unknown_max": 0.05,  # 0.013
        "overall": 0.89,  # 0.922 [0.850]
    },
    "scarches": {
        "unknown_auroc": 0.86,  # 0.912-0.956 [trVAE + kNN 0.976]
        "unseen_called_unknown": 0.10,  # 0.180-0.329
        "accuracy": 0.98,  # 1.000 [1.000]
        "seen_called_unknown_max": 0.05,  # 0.000-0.013
        "overall": 0.68,  # 0.710-0.757 [0.713]
    },
    "scalex": {
        "unknown_auroc": 0.86,  # 0.913 (kNN transfer) [SCALEX + kNN 0.784]
        # SCALEX's latent puts unseen lines close to seen ones: few pass the default threshold
        "unseen_called_unknown": 0.03,  # 0.082
        "accuracy": 0.98,  # 1.000 [1.000]
        "seen_called_unknown_max": 0.05,  # 0.000
        "overall": 0.78,  # 0.812 [0.767]
    },
}

_SCORES: dict[tuple[str, str], dict[str, Any]] = {}


def scores_for(cellbench_dir: Path, scenario: str, preset: str) -> dict[str, Any]:
    """Build, map both query plates unlabelled, and score (computed once per session)."""
    key = (scenario, preset)
    if key not in _SCORES:
        data = load_scenario(cellbench_dir, scenario)
        cells = extract_cells(
            data.reference, source="reference", batch_key="batch", label_keys=["cell_line"]
        )
        release = build_reference(
            cells, preset=preset, epochs=TEST_EPOCHS[preset], seed=0, progress=False
        ).release
        mapped = []
        for stem, query in data.queries.items():
            started = time.perf_counter()
            result = map_cells(
                release,
                extract_cells(query, source=stem, batch_key="batch"),
                site_id=stem,
                seed=0,
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
