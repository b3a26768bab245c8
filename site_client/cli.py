"""``fedatlas site ...``: what a site runs on its own data.

``map`` works offline on a release directory. ``keygen`` makes the site's signing key;
``pull`` downloads and verifies the coordinator's composite; ``prepare`` trains the adaptor
and writes a signed bundle file without any network (for compute with no network); ``send``
sends such a file; ``submit`` is pull + prepare + send in one step; ``node`` runs the site's
Flower SuperNode. Every mapping goes through the site workflow
(:mod:`fedatlas.site_client.workflow`) with one set of mapping options.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedatlas.shared.data.dataset import DataSource
from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.errors import ConfigError, InputDataError
from fedatlas.shared.model.mapping import DEFAULT_TRAIN_CELLS, MappingOptions, MappingResult
from fedatlas.shared.model.privacy import DEFAULT_DELTA, DEFAULT_EPSILON, PrivacySpec
from fedatlas.shared.model.release import Release
from fedatlas.shared.runtime.commands import (
    add_data_arguments,
    add_subcommand,
    data_source,
    print_result,
)
from fedatlas.shared.runtime.flower import flower_bin, flower_env, supervise
from fedatlas.shared.wire.codec import state_from_wire
from fedatlas.shared.wire.signing import (
    NODE_KEY_STEM,
    check_node_private_key,
    fingerprint,
    load_public_key,
    load_signing_key,
    write_keypair,
    write_node_keypair,
)
from fedatlas.site_client.client import CoordinatorClient
from fedatlas.site_client.node import NodeSettings
from fedatlas.site_client.report import (
    INDEX_HTML,
    MAX_QUERY_CELLS,
    MAX_REFERENCE_CELLS,
    check_mapped,
    write_report,
)
from fedatlas.site_client.trust import accept, default_known_file
from fedatlas.site_client.workflow import SiteMapping, map_site, prepare_bundle, write_bundle
from fedatlas.v1.coordinator_pb2 import SubmissionStatus

EXIT_REJECTED = 3  # the coordinator refused the bundle (exit 2 stays "bad input")


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``site`` command group."""
    site = groups.add_parser(name, help=help_text, description=help_text)
    commands = site.add_subparsers(
        dest="site_command", metavar="{map,report,keygen,pull,prepare,send,submit,node}"
    )
    commands.required = True
    mapping = add_subcommand(
        commands,
        "map",
        _map,
        "map a site's cells onto a release and write the results into a copy of its .h5ad",
        "Batches the release already knows (as SITE_ID/BATCH) are embedded without training; "
        "for every other batch the release's network gets new condition parameters, only those "
        "are trained, and they form the site's adaptor (--adaptor-out). The output is the input "
        "plus obsm['X_fedatlas'], obs['fedatlas_label'], obs['fedatlas_uncertainty'], "
        "obs['fedatlas_unknown'] and uns['fedatlas']. Large files are streamed in chunks with "
        "bounded memory (see --chunk-size; progress shows cells mapped and cells per second).",
    )
    mapping.add_argument("--reference", required=True, type=Path, help="release directory")
    _add_mapping_arguments(mapping, site_default="query")
    mapping.add_argument("--adaptor-out", type=Path, help="write the site's adaptor to this file")

    report = add_subcommand(
        commands, "report", _report, "draw a mapping's results: UMAPs, uncertainty, embeddings",
        "Reads the .h5ad that `site map` wrote and writes into --out: UMAPs of the query cells "
        "by predicted label and by uncertainty (with the reference cells in grey and the "
        "prototypes when --reference is given), a histogram of uncertainties with the unknown "
        "threshold, a PCA of the learnt condition embeddings (scpoli preset), index.html with "
        "all of them embedded, and report.json with the numbers.",
    )  # fmt: skip
    report.add_argument("--data", required=True, type=Path, help=".h5ad written by `site map`")
    report.add_argument(
        "--out", required=True, type=Path, help="folder for index.html, report.json and PNGs"
    )
    report.add_argument(
        "--reference",
        type=Path,
        help="the release or composite the cells were mapped onto: draws its reference cells, "
        "prototypes and condition embeddings (default: the query cells only)",
    )
    report.add_argument(
        "--label-key", help="obs column with the cells' true labels: adds accuracy and a confusion "
        "table",
    )  # fmt: skip
    report.add_argument(
        "--max-reference-cells",
        type=int,
        default=MAX_REFERENCE_CELLS,
        help=f"reference cells drawn at most (random subset; {MAX_REFERENCE_CELLS:,})",
    )
    report.add_argument(
        "--max-cells",
        type=int,
        default=MAX_QUERY_CELLS,
        help=f"query cells drawn at most; numbers use all cells ({MAX_QUERY_CELLS:,})",
    )
    report.add_argument("--seed", type=int, default=0, help="random seed of the UMAP (default 0)")
    report.add_argument("--json", action="store_true", help="print report.json to stdout")

    keygen = add_subcommand(
        commands, "keygen", _keygen, "make this site's signing key pair",
        "Writes DIR/site.key (Ed25519, signs bundles; readable by its owner only) and "
        "DIR/site.pub, and the Flower SuperNode key pair DIR/flower_node.key and "
        "flower_node.pub (EC P-384, OpenSSH). Give site.pub (flower_node.pub beside it is "
        "enrolled with it) to the coordinator's operator.",
    )  # fmt: skip
    keygen.add_argument("--out", required=True, type=Path, help="directory for the keys")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing keys")
    keygen.add_argument("--json", action="store_true", help="print the result as JSON")

    pull = add_subcommand(
        commands, "pull", _pull, "download and verify the coordinator's current composite",
        "Checks the composite's content hash and the coordinator's signature (the key is "
        "pinned on first contact) and writes a release directory that `site map` accepts.",
    )  # fmt: skip
    _add_coordinator_arguments(pull)
    pull.add_argument("--out", required=True, type=Path, help="release directory to write")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")

    prepare = add_subcommand(
        commands, "prepare", _prepare, "train this site's adaptor and write a signed bundle file",
        "Fully offline: maps the data onto --reference like `site map`, signs the adaptor with "
        "--key and writes the bundle to --bundle-out (send it later with `site send`).",
    )  # fmt: skip
    prepare.add_argument("--reference", required=True, type=Path, help="release directory")
    _add_signing_arguments(prepare)
    _add_mapping_arguments(prepare, site_default=None)
    prepare.add_argument("--bundle-out", required=True, type=Path, help="bundle file to write")

    send = add_subcommand(
        commands, "send", _send, "send a prepared bundle file to the coordinator",
        "Exit status 0 when the bundle is accepted or held for approval, 3 when rejected.",
    )  # fmt: skip
    _add_coordinator_arguments(send)
    send.add_argument("--bundle", required=True, type=Path, help="bundle file from prepare")
    send.add_argument("--json", action="store_true", help="print the result as JSON")

    submit = add_subcommand(
        commands, "submit", _submit, "pull, train, sign and send in one step",
        "Pulls and verifies the current composite, maps the data onto it (training this "
        "site's adaptor), signs and sends the bundle, and writes the mapped cells to --out. "
        "The bundle is also kept in --bundle-out (default: OUT with .bundle) so a failed send "
        "can be repeated with `site send`; exit status as for `site send`.",
    )  # fmt: skip
    _add_coordinator_arguments(submit)
    _add_signing_arguments(submit)
    _add_mapping_arguments(submit, site_default=None)
    submit.add_argument("--bundle-out", type=Path, help="where to keep the bundle file")
    submit.add_argument(
        "--reference-out", type=Path, help="keep the pulled composite in this directory"
    )

    node = add_subcommand(
        commands, "node", _node,
        "run this site's Flower SuperNode for campaigns and federated builds",
        "flower-supernode that connects out to the SuperLink (TLS, authenticated with "
        "KEYDIR/flower_node.key beside --key). In a campaign it trains this site's adaptor on "
        "--data and answers with the signed bundle; in a federated reference build it sends "
        "gene-level statistics, trains the shared trunk with its own condition rows each "
        "round (the rows stay here) and finally its adaptor. The data path and keys stay in "
        "this node's own configuration. Stops with its children on SIGTERM or Ctrl-C.",
    )  # fmt: skip
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--ca", required=True, type=Path, help="the coordinator's CA certificate")
    node.add_argument("--site-id", required=True, help="this site's enrolled id")
    _add_signing_arguments(node)
    node.add_argument("--data", required=True, type=Path, help=".h5ad file with raw counts")
    node.add_argument("--batch-key", required=True, help="obs column with each cell's batch")
    node.add_argument("--label-key", default="", help="obs column with known labels")
    node.add_argument("--out", type=Path, help="also write the mapped cells to this .h5ad")
    node.add_argument(
        "--coordinator-key", type=Path, help="coordinator.pub (default: pinned on first contact)"
    )
    node.add_argument(
        "--known-coordinators",
        type=Path,
        help="file of pinned coordinator keys (default $FEDATLAS_HOME/known_coordinators.json)",
    )
    node.add_argument(
        "--gene-universe", type=Path,
        help="public gene names, one per line (e.g. the union of public annotations): in a "
        "federated build without a gene list this site sends only its genes that are in it",
    )  # fmt: skip
    node.add_argument(
        "--port", type=int, default=9094, help="the node's local Flower API port (9094)"
    )
    node.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    node.add_argument("--epochs", type=int, help="override the release's mapping epochs")
    _add_reading_arguments(node)
    _add_privacy_arguments(node)


def _add_mapping_arguments(parser: argparse.ArgumentParser, *, site_default: str | None) -> None:
    add_data_arguments(
        parser,
        label_help="obs column with known labels, matched in order to the release's label "
        "levels; labelled cells guide adaptor training and give the site's prototypes",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .h5ad")
    parser.add_argument("--epochs", type=int, help="override the release's mapping epochs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if site_default is None:
        parser.add_argument(
            "--site-id", required=True, help="this site's enrolled id; batches become SITE/BATCH"
        )
    else:
        parser.add_argument(
            "--site-id",
            default=site_default,
            help=f"this site's id; its batches become conditions SITE_ID/BATCH ({site_default})",
        )
    parser.add_argument(
        "--min-gene-overlap",
        type=float,
        default=MappingOptions.min_gene_overlap,
        help="refuse if fewer than this share of the release's genes are present (0.5)",
    )
    parser.add_argument(
        "--transfer",
        choices=("prototype", "knn"),
        help="label transfer: nearest prototype or weighted kNN on reference latents "
        "(default: the release's)",
    )
    parser.add_argument(
        "--unknown-threshold", type=float, help="uncertainty above which a cell is unknown"
    )
    parser.add_argument(
        "--min-prototype-cells",
        type=int,
        default=MappingOptions.min_prototype_cells,
        help="labels with fewer cells get no prototype in the adaptor (default 10)",
    )
    _add_reading_arguments(parser)
    _add_privacy_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epsilon",
        type=_epsilon,
        default=DEFAULT_EPSILON,
        metavar="E|inf",
        help="the adaptor that leaves the site is (E, delta)-differentially private per cell: "
        f"DP-SGD rows, noisy prototypes and counts (default {DEFAULT_EPSILON:g}, where "
        "membership inference measured at most AUC 0.53 for sites of 50-5,000 cells; 'inf' "
        "sends exact aggregates). Only for an adaptor or bundle: `site map` alone ignores it",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=DEFAULT_DELTA,
        metavar="D",
        help=f"the delta of --epsilon (default {DEFAULT_DELTA:g})",
    )


def _epsilon(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or 'inf', got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be positive (or 'inf'), got {text!r}")
    return value


def _privacy(args: argparse.Namespace) -> PrivacySpec | None:
    """The DP spec of a command that makes an adaptor (None: exact aggregates, ``inf``)."""
    return None if math.isinf(args.epsilon) else PrivacySpec(args.epsilon, args.delta)


def _add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        help="read, map and label the file N cells at a time in bounded memory (streaming; "
        "the output is a copy of the input with the results added, X never loaded); 0 loads "
        "the file whole. Default: chunks of 10,000 cells when the count matrix stores more than "
        "10^8 values (about 300,000 cells of 330 detected genes), else load it whole",
    )
    parser.add_argument(
        "--train-cells",
        type=int,
        default=DEFAULT_TRAIN_CELLS,
        metavar="N",
        help="when streaming, train the new batches' condition rows on at most N of their "
        "cells, drawn at random and shared equally among the new batches (default 50,000); "
        "loaded whole, every cell is used",
    )


def _add_signing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, type=Path, help="the site's site.key")


def _add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    parser.add_argument("--ca", required=True, type=Path, help="the coordinator's CA certificate")
    parser.add_argument("--client-cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--client-key", type=Path, help="client certificate's key (mutual TLS)")
    parser.add_argument(
        "--coordinator-key",
        type=Path,
        help="the coordinator's public signing key (coordinator.pub); default: pinned on "
        "first contact",
    )
    parser.add_argument(
        "--known-coordinators",
        type=Path,
        help="file of pinned coordinator keys (default $FEDATLAS_HOME/known_coordinators.json)",
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="retries of transient network errors (5)"
    )


def _options(args: argparse.Namespace, *, adaptor_leaves: bool = True) -> MappingOptions:
    """The mapping options of a command (differential privacy only where an adaptor leaves
    the command: a file or a bundle)."""
    return MappingOptions(
        site_id=args.site_id,
        epochs=args.epochs,
        seed=args.seed,
        min_gene_overlap=args.min_gene_overlap,
        transfer=args.transfer,
        unknown_threshold=args.unknown_threshold,
        min_prototype_cells=args.min_prototype_cells,
        chunk_size=args.chunk_size,
        train_cells=args.train_cells,
        privacy=_privacy(args) if adaptor_leaves else None,
    )


# ---------------------------------------------------------------------------------- map
def _map(args: argparse.Namespace) -> int:
    release = Release.load(args.reference)
    mapped = map_site(
        release, data_source(args), _options(args, adaptor_leaves=args.adaptor_out is not None),
        out=args.out, require_adaptor=args.adaptor_out is not None, progress=not args.quiet,
    )  # fmt: skip
    adaptor = mapped.result.adaptor
    payload, lines = _mapping_report(args, mapped)
    payload.update(adaptor_file=str(args.adaptor_out or ""), adaptor_bytes=0)
    if adaptor is not None and args.adaptor_out is not None:
        adaptor.save(args.adaptor_out)
        payload["adaptor_bytes"] = args.adaptor_out.stat().st_size
        lines.append(
            f"  adaptor         {adaptor.content_hash} -> {args.adaptor_out} "
            f"({payload['adaptor_bytes']:,} bytes)"
        )
    print_result(payload, args.json, lines)
    return 0


def _mapping_report(
    args: argparse.Namespace, mapped: SiteMapping
) -> tuple[dict[str, Any], list[str]]:
    """JSON payload and readable lines describing a mapping."""
    result: MappingResult = mapped.result
    n_cells = int(result.latent.shape[0])
    payload: dict[str, Any] = {
        "out": str(args.out),
        "n_cells": n_cells,
        "chunk_cells": mapped.chunk_cells,
        **result.provenance(),
    }
    alignment = result.alignment
    lines = [
        f"mapped {n_cells:,} cells onto release {result.release.content_hash}",
        f"  written to      {args.out}",
        f"  genes           {alignment.n_found:,} of {alignment.n_release_genes:,} "
        f"release genes present ({alignment.n_missing:,} zero-filled)",
    ]
    for a in result.assignments:
        status = "known, embedded only" if a.known else "new, adaptor trained"
        lines.append(f"  batch {a.batch!r:<14} -> {a.condition} ({status}, {a.n_cells:,} cells)")
    lines.append(
        f"  parameters      {result.trained_parameters:,} trained of "
        f"{result.total_parameters:,} (release tensors verified bit-identical)"
    )
    for level, transfer in result.transfers.items():
        n_unknown = int(transfer.unknown.sum())
        lines.append(
            f"  labels ({level}) {n_unknown:,} cells unknown "
            f"(uncertainty > {transfer.threshold:.3g})"
        )
    return payload, lines


# ------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    if args.max_reference_cells < 0 or args.max_cells < 1:
        raise ConfigError("--max-reference-cells must be >= 0 and --max-cells >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a folder")
    adata = read_h5ad(args.data)
    check_mapped(adata, str(args.data))
    release = Release.load(args.reference) if args.reference is not None else None
    summary = write_report(
        adata,
        args.out,
        release,
        label_key=args.label_key,
        source=str(args.data),
        seed=args.seed,
        max_reference_cells=args.max_reference_cells,
        max_query_cells=args.max_cells,
    )
    lines = [
        f"report of {summary.n_cells:,} mapped cells written to {args.out / INDEX_HTML}",
        f"  called unknown  {summary.n_unknown:,} ({summary.unknown_share:.1%}; uncertainty > "
        f"{summary.unknown_threshold:g}), mean uncertainty {summary.mean_uncertainty:.3f}",
        "  labels          "
        + ", ".join(f"{k} {v:,}" for k, v in list(summary.label_counts.items())[:8])
        + (" ..." if len(summary.label_counts) > 8 else ""),
    ]
    if summary.truth is not None and summary.truth["accuracy"] is not None:
        lines.append(
            f"  accuracy        {summary.truth['accuracy']:.3f} on types the reference knows "
            f"({summary.truth['n_known_type_cells']:,} cells)"
        )
    lines.append(f"  figures         {', '.join(summary.figures.values())}")
    lines += [f"  note            {n}" for n in summary.notes]
    print_result(summary.to_dict(), args.json, lines)
    return 0


# ----------------------------------------------------------------------- keys and network
def _keygen(args: argparse.Namespace) -> int:
    pair = write_keypair(args.out, "site", overwrite=args.overwrite)
    node = write_node_keypair(args.out, overwrite=args.overwrite)
    key_id = fingerprint(load_public_key(pair.public))
    print_result(
        {
            "private_key": str(pair.private),
            "public_key": str(pair.public),
            "fingerprint": key_id,
            "node_private_key": str(node.private),
            "node_public_key": str(node.public),
        },
        args.json,
        [
            f"site signing key {key_id}",
            f"  private key     {pair.private} (keep it here; mode 0600)",
            f"  public key      {pair.public} (give it to the coordinator's operator)",
            f"  Flower node key {node.private} (0600) and {node.public}, enrolled with site.pub",
        ],
    )
    return 0


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return CoordinatorClient(
        args.coordinator,
        args.ca,
        client_certificate=args.client_cert,
        client_key=args.client_key,
        retries=args.retries,
    )


def _pull_verified(args: argparse.Namespace, out: Path) -> tuple[Release, int]:
    """Pull the composite, check hash and signature against the trusted key, write ``out``."""
    with _client(args) as client:
        pulled = client.pull()
    release = accept(
        pulled,
        args.coordinator,
        known_file=args.known_coordinators or default_known_file(),
        explicit=load_public_key(args.coordinator_key) if args.coordinator_key else None,
    )
    release.save(out, overwrite=True)
    pulled.statement.save(out)
    return release, pulled.generation


def _pull(args: argparse.Namespace) -> int:
    release, generation = _pull_verified(args, args.out)
    n_adaptors = len(release.content.get("lineage", {}).get("adaptors", []))
    print_result(
        {
            "reference": str(args.out),
            "content_hash": release.content_hash,
            "generation": generation,
            "adaptors": n_adaptors,
            "conditions": release.condition_names,
        },
        args.json,
        [
            f"composite generation {generation}: {release.content_hash}",
            f"  written to      {args.out} (signature verified)",
            f"  conditions      {len(release.condition_names)} ({n_adaptors} site adaptors)",
        ],
    )
    return 0


def _prepare_bundle(
    args: argparse.Namespace, release: Release, bundle_out: Path
) -> tuple[bytes, dict[str, Any], list[str]]:
    """Map, sign the adaptor and write the bundle file: its bytes and a report."""
    bundle, mapped = prepare_bundle(
        release, data_source(args), _options(args), load_signing_key(args.key), out=args.out,
        progress=not args.quiet,
    )  # fmt: skip
    write_bundle(bundle, bundle_out)
    payload, lines = _mapping_report(args, mapped)
    payload.update(bundle=str(bundle_out), bundle_id=bundle.bundle_id, bundle_bytes=len(bundle.raw))
    lines.append(
        f"  bundle          {bundle.bundle_id} -> {bundle_out} ({len(bundle.raw):,} bytes)"
    )
    return bundle.raw, payload, lines


def _prepare(args: argparse.Namespace) -> int:
    _, payload, lines = _prepare_bundle(args, Release.load(args.reference), args.bundle_out)
    print_result(payload, args.json, lines)
    return 0


def _report_status(
    status: SubmissionStatus, as_json: bool, size: int, before: dict[str, Any] | None = None
) -> int:
    """Print what the coordinator answered (after ``before``, a report of earlier steps)."""
    state = state_from_wire(status.state)
    payload = {
        **(before or {}),
        "bundle_id": status.bundle_id,
        "state": state,
        "reason_code": status.reason_code,
        "reason": status.reason,
        "composite_generation": status.composite_generation,
        "conditions": list(status.conditions),
        "bundle_bytes": size,
    }
    lines = [f"bundle {status.bundle_id}: {state.upper()}"]
    if state == "rejected":
        lines.append(f"  reason          {status.reason_code}: {status.reason}")
    elif state == "held":
        lines.append("  waiting for the coordinator's operator to approve it")
    else:
        lines.append(f"  in composite    generation {status.composite_generation}")
    lines.append(f"  conditions      {', '.join(status.conditions) or '-'}")
    print_result(payload, as_json, lines)
    return EXIT_REJECTED if state == "rejected" else 0


def _send(args: argparse.Namespace) -> int:
    try:
        raw = args.bundle.read_bytes()
    except OSError as exc:
        raise InputDataError(f"{args.bundle}: cannot read the bundle ({exc.strerror})") from None
    with _client(args) as client:
        status = client.submit(raw)
    return _report_status(status, args.json, len(raw))


def _submit(args: argparse.Namespace) -> int:
    bundle_out = args.bundle_out or args.out.with_name(args.out.name + ".bundle")
    with tempfile.TemporaryDirectory(prefix="fedatlas-composite-") as tmp:
        reference = args.reference_out or Path(tmp) / "composite"
        release, generation = _pull_verified(args, reference)
        raw, payload, lines = _prepare_bundle(args, release, bundle_out)
    payload["pulled_generation"] = generation
    if not args.json:
        print(f"pulled composite generation {generation}: {release.content_hash} (verified)")
        print("\n".join(lines))
    with _client(args) as client:
        status = client.submit(raw)
    return _report_status(status, args.json, len(raw), before=payload)


def _node(args: argparse.Namespace) -> int:
    load_signing_key(args.key)  # refuse a missing or unsafe key before anything starts
    node_key = args.key.with_name(f"{NODE_KEY_STEM}.key")
    check_node_private_key(node_key)
    settings = NodeSettings(
        source=DataSource(
            args.data.resolve(), args.batch_key, (args.label_key,) if args.label_key else ()
        ),
        options=MappingOptions(
            site_id=args.site_id,
            seed=args.seed,
            epochs=args.epochs,
            chunk_size=args.chunk_size,
            train_cells=args.train_cells,
            privacy=_privacy(args),
        ),
        key=args.key.resolve(),
        superlink=args.superlink,
        known_coordinators=(args.known_coordinators or default_known_file()).resolve(),
        coordinator_key=args.coordinator_key.resolve() if args.coordinator_key else None,
        out=args.out.resolve() if args.out else None,
        gene_universe=args.gene_universe.resolve() if args.gene_universe else None,
    )
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.node_config().items())
    home = args.key.resolve().parent / "flower-home"
    process = subprocess.Popen(
        [flower_bin("flower-supernode"), "--root-certificates", str(args.ca),
         "--superlink", args.superlink, "--port", str(args.port),
         "--auth-supernode-private-key", str(node_key), "--node-config", node_config],
        env=flower_env(home),
    )  # fmt: skip
    print(f"supernode of site {args.site_id} connecting to {args.superlink}", flush=True)
    return supervise(process)
