"""One run of the robustness suite: a split (CellBench or synthetic) through the path a user takes.

Every stem is written as a site holds it (an ``.h5ad`` of raw counts on the union of the five
datasets' genes, absent genes zero, ``obs`` batch and cell_type); the reference file holds the
split's reference stems without the dropped lines. A synthetic split's files are drawn from its
world (:func:`write_synthetic_files`). The fedatlas command line builds the release
(``admin reference build``) and maps each query file (``site map``, labels not given). The joint
reference + query latent is written in the peer harness's format and scored by its
``evaluate.py`` (``../shared/peers``), so ours and the peers' numbers come from one scorer.

Used by ``bench/robustness.py`` (the whole suite, beside the peers) and
``tests/test_robustness.py`` (the fast part).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedatlas.benchmarks.cellbench import STEMS, load_stem
from fedatlas.benchmarks.splits import Split, SyntheticSplit
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.h5ad import read_h5ad, write_h5ad
from fedatlas.shared.model.annotations import LABEL_KEY, LATENT_KEY, PROVENANCE_KEY, UNCERTAINTY_KEY
from fedatlas.shared.model.label_transfer import UNKNOWN
from fedatlas.shared.model.release import Release

Command = Callable[[Sequence[str]], int]  # a fedatlas command line -> exit status
TRUTH = "cell_type"  # obs column of the true label in every file the suite writes


def peers_dir() -> Path:
    """The peer harness's folder (``../shared/peers`` beside the project)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "peers"


def _on_genes(adata: anndata.AnnData, genes: pd.Index) -> sp.csr_matrix:
    """``adata``'s counts with its columns moved to ``genes`` (absent genes zero)."""
    matrix = sp.csr_matrix(adata.X, dtype=np.float32)
    columns = genes.get_indexer(adata.var_names)
    moved = sp.csr_matrix(
        (matrix.data, columns[matrix.indices], matrix.indptr), shape=(adata.n_obs, len(genes))
    )
    moved.sort_indices()
    return moved


def write_site_files(data_dir: Path, split: Split, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The split's reference file and one file per query stem, written as a site holds them.
    Returns the reference path and the query paths by stem."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = {stem: load_stem(data_dir, stem) for stem in STEMS}
    genes = pd.Index(sorted(set().union(*(a.var_names for a in stems.values()))), dtype=object)

    def site_file(parts: Sequence[str], name: str) -> Path:
        blocks = [stems[s] for s in parts]
        obs = pd.concat([b.obs[["batch", "cell_line"]].astype(str) for b in blocks])
        obs = obs.rename(columns={"cell_line": TRUTH})
        adata = anndata.AnnData(
            X=sp.vstack([_on_genes(b, genes) for b in blocks], format="csr"),
            obs=obs,
            var=pd.DataFrame(index=genes),
        )
        if name == "reference":
            adata = adata[~adata.obs[TRUTH].isin(split.drop).to_numpy()].copy()
        path = folder / f"{name}.h5ad"
        write_h5ad(adata, path)
        return path

    reference = site_file(split.reference, "reference")
    return reference, {stem: site_file([stem], stem) for stem in split.query}


#: Cells per file of a synthetic split: three reference batches, two query batches.
SYNTHETIC_REFERENCE_CELLS = 1500
SYNTHETIC_QUERY_CELLS = 400


def write_synthetic_files(
    split: SyntheticSplit, folder: Path, seed: int
) -> tuple[Path, dict[str, Path]]:
    """A synthetic split's reference file and its two query files (one batch each), drawn from
    the split's world with ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    queries = ("query_a", "query_b")
    if split.world == "protocol":
        world = SyntheticWorld(seed=seed, batch_effect_strength=0.8)
        query_world = SyntheticWorld(seed=seed, batch_effect_strength=0.8, library_size=800 / 3)
    elif split.world == "stimulation":
        world = query_world = SyntheticWorld(seed=seed, stimulated=queries)
    else:
        raise ValueError(f"unknown synthetic world {split.world!r}")
    known = [t for t in world.cell_types if t not in split.drop]
    reference = world.sample(
        SYNTHETIC_REFERENCE_CELLS, batches=("ref_a", "ref_b", "ref_c"), cell_types=known,
        seed=seed + 1,
    )  # fmt: skip
    paths = {}
    for i, batch in enumerate(queries):
        query = query_world.sample(SYNTHETIC_QUERY_CELLS, batches=(batch,), seed=seed + 2 + i)
        paths[batch] = folder / f"{batch}.h5ad"
        write_h5ad(query, paths[batch])
    reference_path = folder / "reference.h5ad"
    write_h5ad(reference, reference_path)
    return reference_path, paths


@dataclass(frozen=True)
class SplitRun:
    """What one split's run produced: the release, each query's mapped file and its seconds."""

    release: Path
    mapped: dict[str, Path]
    build_seconds: float
    map_seconds: dict[str, float]


def run_split(
    run: Command,
    reference: Path,
    queries: dict[str, Path],
    folder: Path,
    *,
    preset: str,
    seed: int,
    epochs: int | None = None,
    map_epochs: int | None = None,
) -> SplitRun:
    """Build the release with ``admin reference build`` and map every query with ``site map``
    (one site per query stem); ``epochs``/``map_epochs`` shorten the recipes (tests)."""
    release = folder / "release"
    build = [
        "admin", "reference", "build", "--data", str(reference), "--batch-key", "batch",
        "--label-key", TRUTH, "--model", preset, "--out", str(release), "--seed", str(seed),
        "--overwrite",
    ]  # fmt: skip
    if epochs is not None:
        build += ["--epochs", str(epochs)]
    started = time.perf_counter()
    _check(run, build)
    build_seconds = time.perf_counter() - started
    mapped, seconds = {}, {}
    for i, (stem, path) in enumerate(queries.items()):
        out = folder / f"mapped_{stem}.h5ad"
        command = [
            "site", "map", "--reference", str(release), "--data", str(path), "--batch-key",
            "batch", "--out", str(out), "--site-id", f"site{i + 1}", "--seed", str(seed),
        ]  # fmt: skip
        if map_epochs is not None:
            command += ["--epochs", str(map_epochs)]
        _check(run, command)
        mapped[stem] = out
        seconds[stem] = float(sum(read_h5ad(out).uns[PROVENANCE_KEY]["seconds"].values()))
    return SplitRun(release, mapped, build_seconds, seconds)


def _check(run: Command, args: list[str]) -> None:
    status = run(["-q", *args])
    if status != 0:
        raise RuntimeError(f"fedatlas {' '.join(args[:3])} failed with status {status}")


def joint_latent(split_run: SplitRun, reference: Path) -> anndata.AnnData:
    """Reference and query cells in the harness's format: ``obsm['X_latent']``, obs batch,
    cell_type, is_query, pred_label, pred_uncertainty (reference cells first)."""
    release = Release.load(split_run.release)
    kept = release.reference_latents()
    if kept is None:
        raise ValueError(f"{split_run.release}: the release keeps no reference latents")
    ref_obs = read_h5ad(reference).obs
    frames = [
        pd.DataFrame({
            "batch": ref_obs["batch"].astype(str).to_numpy(),
            "cell_type": ref_obs[TRUTH].astype(str).to_numpy(),
            "is_query": False,
            "pred_label": "",
            "pred_uncertainty": np.nan,
        }, index=ref_obs.index.astype(str))
    ]  # fmt: skip
    latents = [kept[0]]
    for path in split_run.mapped.values():
        mapped = read_h5ad(path)
        frames.append(pd.DataFrame({
            "batch": mapped.obs["batch"].astype(str).to_numpy(),
            "cell_type": mapped.obs[TRUTH].astype(str).to_numpy(),
            "is_query": True,
            "pred_label": mapped.obs[LABEL_KEY].astype(str).to_numpy(),
            "pred_uncertainty": mapped.obs[UNCERTAINTY_KEY].to_numpy(dtype=float),
        }, index=mapped.obs_names.astype(str)))  # fmt: skip
        latents.append(mapped.obsm[LATENT_KEY])
    obs = pd.concat(frames)
    joint = anndata.AnnData(obs=obs)
    joint.obsm["X_latent"] = np.vstack(latents).astype(np.float32)
    return joint


def unknown_shares(joint: anndata.AnnData, novel: frozenset[str]) -> dict[str, float | None]:
    """Share of the query's known-line cells and of its novel-line cells called unknown."""
    query = joint.obs[joint.obs["is_query"].to_numpy(dtype=bool)]
    is_novel = query["cell_type"].isin(sorted(novel)).to_numpy()
    called = (query["pred_label"] == UNKNOWN).to_numpy()
    return {
        "known_called_unknown": float(called[~is_novel].mean()) if (~is_novel).any() else None,
        "novel_called_unknown": float(called[is_novel].mean()) if is_novel.any() else None,
    }


def score(
    joint_path: Path, python: Path | None = None, harness: Path | None = None
) -> dict[str, Any]:
    """The harness's ``evaluate.py`` on a joint file, run by ``python`` (the harness's scoring
    environment, with scib-metrics) or by this interpreter (its scikit-learn implementation).
    The result is also kept beside the file (``.eval.json``)."""
    evaluate = (harness or peers_dir()) / "evaluate.py"
    if not evaluate.is_file():
        raise FileNotFoundError(f"{evaluate}: the peer harness is not beside the project")
    out = joint_path.with_suffix(".eval.json")
    command = [str(python or sys.executable), str(evaluate), str(joint_path), "--out", str(out)]
    if python is None:
        command += ["--impl", "sklearn"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"evaluate.py on {joint_path} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result
