"""``fedatlas demo``: the whole federated story on this machine, with real processes on loopback.

1. The coordinator's operator builds a reference release and creates the store (Ed25519 key,
   local CA, TLS certificate), publishes the release and enrols three sites; each site made its
   own keys (``site keygen``).
2. ``coordinator serve`` (gRPC + TLS + SQLite), ``coordinator superlink`` (Flower, TLS, SuperNode
   authentication) and one ``site node`` per site start; each site's process is given only its
   own ``.h5ad``.
3. A Flower campaign: every site trains its adaptor on its own cells and answers with a signed
   bundle, which the coordinator verifies and composes into a new signed composite.
4. A third party pulls the composite over gRPC, checks its signature, maps its own cells (with
   a cell type nobody has contributed) and gets labels, uncertainties and a report.

Data: generated (``fedatlas.benchmarks.synthetic``), or the CellBench files with ``--data-dir``.
Everything lands in ``--out``: the data of each party, the release, the store, the logs of every
process, ``summary.json``, ``joint_embedding.png`` and ``report/`` (``index.html``). Every process
is stopped at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from fedatlas.benchmarks.cellbench import UNSEEN_IN_S2, load_scenario, load_stem
from fedatlas.benchmarks.scoring import MappedQuery, evaluate
from fedatlas.benchmarks.synthetic import DEMO_CELL_TYPES, DEMO_REFERENCE_BATCHES, SyntheticWorld
from fedatlas.coordinator.flower_runs import run_campaign
from fedatlas.deploy.launcher import LocalLauncher, interrupt_on_sigterm
from fedatlas.shared.api import build_reference
from fedatlas.shared.config import DEFAULT_PRESET, PRESETS
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.data.h5ad import read_h5ad, write_h5ad
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.evaluation.plotting import plot_joint_embedding
from fedatlas.shared.model.annotations import annotate
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.runtime.commands import add_subcommand, print_result
from fedatlas.shared.wire.signing import load_public_key
from fedatlas.site_client.client import CoordinatorClient
from fedatlas.site_client.report import write_report

THIRD_PARTY = "third-party"
Command = Callable[[Sequence[str]], int]  # a fedatlas command line -> its exit status

log = logging.getLogger(__name__)


class DemoError(FedatlasError):
    """A step of the demo failed."""


def register(groups: Any, name: str, help_text: str, *, run_command: Command) -> None:
    """Add the ``demo`` command; ``run_command`` runs a fedatlas command line in this process
    (the root command's ``main``), as the operator and the sites would."""
    parser = add_subcommand(
        groups, name, partial(_run, run_command=run_command), help_text, __doc__ or help_text
    )
    parser.add_argument(
        "--out", type=Path, default=Path("fedatlas-demo"), help="report folder (./fedatlas-demo)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="CellBench folder: run on those real files instead"
    )
    parser.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, help="override the preset's reference epochs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds each step may take (600)"
    )
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")


@dataclass
class DemoData:
    """Who holds which cells: the reference, each site (labelled or not), the third party."""

    source: str
    label_key: str
    reference: ad.AnnData
    sites: dict[str, ad.AnnData]
    labelled: dict[str, bool]
    third_party: ad.AnnData


def demo_data(data_dir: Path | None, seed: int) -> DemoData:
    """The demo's parties. Generated: a reference of five cell types in three labs, three
    sites with one batch each (two labelled), and a third party whose cells also include a
    sixth type. CellBench: reference = CEL-seq2 + Drop-seq (three lines), sites = the three
    5-line plates without A549 and H838 (plate 3 unlabelled), third party = the whole plate 3."""
    if data_dir is None:
        world = SyntheticWorld(seed=seed, n_genes=2000, cell_types=DEMO_CELL_TYPES)
        known = list(DEMO_CELL_TYPES[:-1])
        reference = world.sample(1500, batches=DEMO_REFERENCE_BATCHES, cell_types=known, seed=seed)
        layout = {"site_a": "plate1", "site_b": "run1", "site_c": "chip1"}
        sites = {
            site: world.sample(
                400, batches=(batch,), cell_types=known, seed=seed + 1 + i, site=site
            )
            for i, (site, batch) in enumerate(layout.items())
        }
        third = world.sample(500, batches=("clinic1",), seed=seed + 9, site=THIRD_PARTY)
        labelled = {"site_a": True, "site_b": True, "site_c": False}
        return DemoData("synthetic (fedatlas.benchmarks.synthetic)", "cell_type", reference, sites,
                        labelled, third)  # fmt: skip

    scenario = load_scenario(data_dir, "S1")
    reference = scenario.reference[
        scenario.reference.obs["batch"].isin(["sc_celseq2", "sc_dropseq"]).to_numpy()
    ].copy()
    plates = {"h1": "sc_celseq2_5cl_p1", "h2": "sc_celseq2_5cl_p2", "h3": "sc_celseq2_5cl_p3"}
    sites = {}
    for site, stem in plates.items():
        plate = load_stem(data_dir, stem)
        sites[site] = plate[~plate.obs["cell_line"].isin(UNSEEN_IN_S2).to_numpy()].copy()
    third = load_stem(data_dir, plates["h3"])
    labelled = {"h1": True, "h2": True, "h3": False}
    return DemoData(f"CellBench ({data_dir})", "cell_line", reference, sites, labelled, third)


def run_demo(out: Path, run_command: Command, *, data_dir: Path | None, model: str,
             epochs: int | None, seed: int, timeout: float,
             progress: bool) -> dict[str, Any]:  # fmt: skip
    """Run the demo and return the summary written to ``out/summary.json``; ``run_command``
    runs the operator's and the sites' set-up commands."""
    started = time.perf_counter()
    data = demo_data(data_dir, seed)
    _build_reference(out, data, model, epochs, seed, progress)
    store = _set_up_coordinator(out, data, out / "release", run_command)
    with interrupt_on_sigterm(), LocalLauncher(out / "logs") as launcher:
        log.info("starting the coordinator (gRPC), the Flower SuperLink and one SuperNode per site")
        grpc_address = launcher.coordinator(store)
        superlink = launcher.superlink(store)
        for site in data.sites:
            launcher.site_node(
                site, superlink=superlink, ca=store / "ca.pem",
                key=out / "sites" / site / "keys" / "site.key",
                data=out / "sites" / site / "cells.h5ad", batch_key="batch",
                label_key=data.label_key if data.labelled[site] else None,
                coordinator_key=store / "coordinator.pub",
                out=out / "sites" / site / "mapped.h5ad",
            )  # fmt: skip
        log.info(f"campaign: {len(data.sites)} sites train their adaptors on their own cells")
        campaign = _campaign(store, superlink, len(data.sites), timeout)
        log.info("third party: pulls the signed composite over gRPC and maps its own cells")
        third = _third_party(out, data, grpc_address, store, seed, progress)
    summary = _summary(out, data, model, campaign, third, time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _build_reference(out: Path, data: DemoData, model: str, epochs: int | None, seed: int,
                     progress: bool) -> None:  # fmt: skip
    """Build the operator's reference release (centrally) and save it in out/release."""
    write_h5ad(data.reference, out / "reference" / "cells.h5ad")
    release = build_reference(
        data.reference, batch_key="batch", label_key=data.label_key, model=model, seed=seed,
        epochs=epochs, progress=progress, source="reference",
    )  # fmt: skip
    release.save(out / "release", overwrite=True)


def _set_up_coordinator(out: Path, data: DemoData, release_dir: Path, run_command: Command) -> Path:
    """The store, the published release and the enrolled sites, through the real commands;
    each site's cells go to its own folder (labels only where the site has them)."""
    store = out / "coordinator" / "store"
    if store.exists():
        shutil.rmtree(store)  # a previous demo run's store
    setup_log = out / "logs" / "setup.log"

    def command(*args: str) -> None:
        _run_command(run_command, list(args), setup_log)

    command("admin", "init", "--store", str(store))
    command("admin", "release", "publish", "--store", str(store), "--release", str(release_dir))
    for site, adata in data.sites.items():
        folder = out / "sites" / site
        cells = adata if data.labelled[site] else _without(adata, data.label_key)
        write_h5ad(cells, folder / "cells.h5ad")
        keys = folder / "keys"
        command("site", "keygen", "--out", str(keys), "--overwrite")
        command("admin", "site", "enroll", "--store", str(store), "--site-id", site,
                "--public-key", str(keys / "site.pub"))  # fmt: skip
    write_h5ad(data.third_party, out / THIRD_PARTY / "cells.h5ad")
    return store


def _run_command(run_command: Command, args: list[str], log: Path) -> None:
    """Run a fedatlas command in this process, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle, contextlib.redirect_stdout(handle):
        print(f"$ fedatlas {' '.join(args)}", flush=True)
        status = run_command(["-q", *args])
    if status != 0:
        raise DemoError(f"fedatlas {' '.join(args)} failed with status {status}; see {log}")


def _without(adata: ad.AnnData, column: str) -> ad.AnnData:
    copy = adata.copy()
    del copy.obs[column]
    return copy


def _campaign(store: Path, superlink: str, n_sites: int, timeout: float) -> dict[str, Any]:
    return run_campaign(store, superlink, min_sites=n_sites, timeout=timeout)


@dataclass
class ThirdParty:
    """What the third party got: the composite, its mapping and the scores."""

    composite: Any
    result: Any
    scores: dict[str, Any]
    composite_bytes: int
    report: Any


def _third_party(out: Path, data: DemoData, address: str, store: Path, seed: int,
                 progress: bool) -> ThirdParty:  # fmt: skip

    with CoordinatorClient(address, store / "ca.pem") as client:
        pulled = client.pull()
    composite = pulled.verify(load_public_key(store / "coordinator.pub"), source=address)
    composite.save(out / THIRD_PARTY / "composite", overwrite=True)
    adata = data.third_party.copy()
    cells = extract_cells(adata, source=THIRD_PARTY, batch_key="batch")  # labels stay hidden
    t0 = time.perf_counter()
    result = map_onto(
        composite, cells, MappingOptions(site_id=THIRD_PARTY, seed=seed), progress=progress
    )
    truth = adata.obs[data.label_key].astype(str).to_numpy(dtype=object)
    mapped = MappedQuery(THIRD_PARTY, truth, result, time.perf_counter() - t0)
    annotate(adata, result)
    write_h5ad(adata, out / THIRD_PARTY / "mapped.h5ad")
    report = write_report(
        adata, out / "report", composite, label_key=data.label_key, source=THIRD_PARTY, seed=seed
    )
    size = len(composite.manifest_json().encode()) + len(composite.weights_bytes())
    return ThirdParty(composite, result, evaluate(composite, [mapped]), size, report)


def _summary(out: Path, data: DemoData, model: str, campaign: dict[str, Any],
             third: ThirdParty, seconds: float) -> dict[str, Any]:  # fmt: skip

    sites = {s["site_id"]: s for s in campaign["sites"]}
    trained = {
        site: int(
            read_h5ad(out / "sites" / site / "mapped.h5ad").uns["fedatlas"]["trained_parameters"]
        )
        for site in data.sites
        if (out / "sites" / site / "mapped.h5ad").exists()
    }
    composite = third.composite
    level = composite.label_levels[0]
    ref = composite.reference_latents()
    plot = plot_joint_embedding(
        out / "joint_embedding.png",
        reference_latent=ref[0] if ref else np.zeros((0, third.result.latent.shape[1]), np.float32),
        query_latent=third.result.latent,
        query_labels=third.result.transfers[level].called,
        query_groups=np.full(third.result.latent.shape[0], THIRD_PARTY, object),
        reference_groups=np.asarray(composite.condition_names, object)[ref[1]]
        if ref
        else np.zeros(0, object),
        title=f"fedatlas demo: {THIRD_PARTY} mapped onto the composite of {len(sites)} sites",
    )
    scores = third.scores
    return {
        "data": data.source,
        "model": model,
        "sites": sorted(data.sites),
        "accepted_adaptors": sum(s["state"] == "accepted" for s in sites.values()),
        "site_outcomes": {k: s["state"] for k, s in sorted(sites.items())},
        "bundle_bytes": {k: s.get("bundle_bytes", 0) for k, s in sorted(sites.items())},
        "composite_bytes": third.composite_bytes,
        "composite_hash": campaign["composite_hash"],
        "composite_generation": campaign["composite_generation"],
        "trainable_params": max(trained.values(), default=0),
        "trainable_params_per_site": trained,
        "total_params": int(third.result.total_parameters),
        "third_party_trainable_params": int(third.result.trained_parameters),
        "label_accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "unknown_auroc": scores.get("unknown_auroc"),
        "unseen_called_unknown": scores.get("unseen_called_unknown"),
        "overall_score": scores["integration"]["overall"],
        "scores": scores,
        "plot": str(plot),
        "report": str(out / "report" / "index.html"),
        "seconds": round(seconds, 1),
    }


def _run(args: argparse.Namespace, *, run_command: Command) -> int:
    summary = run_demo(
        args.out, run_command, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        seed=args.seed, timeout=args.timeout, progress=not args.quiet,
    )  # fmt: skip
    integ = summary["scores"]["integration"]
    auroc = summary["unknown_auroc"]
    lines = [
        f"fedatlas demo ({summary['model']}, {summary['data']}) finished in {summary['seconds']}s",
        f"  sites                 {', '.join(summary['sites'])} (one SuperNode each, own data)",
        f"  adaptors accepted     {summary['accepted_adaptors']} of {len(summary['sites'])} -> "
        f"composite generation {summary['composite_generation']} {summary['composite_hash']}",
        "  sent per site         "
        + ", ".join(f"{k}: {v:,} B" for k, v in summary["bundle_bytes"].items())
        + f" (bundle up); composite down {summary['composite_bytes']:,} B",
        f"  trained / total       {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters per site",
        f"  label accuracy        {summary['label_accuracy']:.3f} (macro F1 "
        f"{summary['macro_f1']:.3f}) for the third party's cells of known types",
        "  unknown detection     "
        + (f"AUROC {auroc:.3f} for the type no site contributed" if auroc else "n/a"),
        f"  integration           overall {integ['overall']:.3f} (bio {integ['bio']:.3f}, "
        f"batch {integ['batch']:.3f})",
        f"  report                {summary['report']}, {args.out / 'summary.json'}",
    ]
    print_result(summary, args.json, lines)
    return 0
