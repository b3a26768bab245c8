"""``fedatlas admin ...``: the operator's commands.

``reference build`` trains a release offline. Everything else works on a coordinator store
directory (``--store``): ``init`` creates it; ``release``, ``site``, ``adaptors``, ``composite``,
``policy``, ``tls`` and ``audit`` manage what the coordinator serves; ``store`` backs it up,
restores it and rotates its signing key. They may run while ``fedatlas coordinator serve`` uses
the same store (``store rotate-key`` and ``tls server-cert`` want the services stopped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from fedatlas.coordinator.maintenance import (
    backup_store,
    renew_server_certificate,
    restore_store,
    rotate_signing_key,
)
from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.registry import Outcome, Registry, RegistryError, StoreLayout, init_store
from fedatlas.coordinator.store import StoreError
from fedatlas.coordinator.tls import DEFAULT_HOSTS, Issued, issue
from fedatlas.shared.api import build_reference
from fedatlas.shared.config import PRESETS, ModelConfig, TrainConfig
from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.errors import ReleaseError
from fedatlas.shared.model.release import Release
from fedatlas.shared.runtime.commands import (
    add_data_arguments,
    add_subcommand,
    print_result,
    settings,
    table,
)
from fedatlas.shared.wire.composite import CompositeStatement
from fedatlas.shared.wire.signing import (
    NODE_KEY_STEM,
    fingerprint,
    load_node_public_key,
    load_public_key,
)


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``admin`` command group."""
    admin = groups.add_parser(name, help=help_text, description=__doc__)
    sections = admin.add_subparsers(
        dest="admin_section",
        metavar="{init,reference,release,site,adaptors,composite,policy,tls,audit,store}",
    )
    sections.required = True
    _register_init(sections)
    _register_reference(sections)
    _register_store_sections(sections)
    _register_maintenance(sections)


def _store_command(
    commands: Any, name: str, handler: Any, help_text: str, description: str = ""
) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, name, handler, help_text, description)
    parser.add_argument("--store", required=True, type=Path, help="coordinator store directory")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _section(sections: Any, name: str, help_text: str, commands: str) -> Any:
    section = sections.add_parser(name, help=help_text, description=help_text)
    sub = section.add_subparsers(dest=f"{name}_command", metavar="{" + commands + "}")
    sub.required = True
    return sub


def _register_init(sections: Any) -> None:
    init = _store_command(
        sections, "init", _init, "create a coordinator store",
        "Creates STORE with the coordinator's signing key (coordinator.key/.pub), a local "
        "certificate authority (ca.pem: give it to sites), the server certificate and an empty "
        "registry.",
    )  # fmt: skip
    init.add_argument(
        "--host",
        action="append",
        help="name or address sites use to reach the coordinator (repeatable); localhost, "
        "127.0.0.1 and ::1 are always added (the SuperLink's own CLI connects on loopback)",
    )
    _add_policy_arguments(init)


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--approval",
        choices=("auto", "hold"),
        help="auto-accept verified bundles, or hold them for approval (default auto)",
    )
    parser.add_argument(
        "--min-prototype-cells", type=int, help="cells a prototype must aggregate (10)"
    )
    parser.add_argument(
        "--norm-factor", type=float, help="largest condition row, relative to the reference (10)"
    )
    parser.add_argument("--max-bundle-bytes", type=int, help="largest bundle accepted (16 MiB)")
    parser.add_argument(
        "--max-condition-cells", type=int, help="most cells one condition may claim (10^7)"
    )
    parser.add_argument(
        "--spread-factor",
        type=float,
        help="a prototype's spread (mean latent variance) within this factor of its label's (10)",
    )
    parser.add_argument(
        "--radius-factor",
        type=float,
        help="a prototype's radius (99 %% of its cells) within this factor of its label's (3)",
    )
    parser.add_argument(
        "--mean-radius-factor",
        type=float,
        help="a known label's mean within this many of its radius (1)",
    )
    parser.add_argument(
        "--max-composite-bytes", type=int, help="largest composite a bundle may make (2 GiB)"
    )
    parser.add_argument(
        "--new-labels",
        choices=("accept", "hold"),
        help="accept labels new to the catalogue, or hold their bundles for approval (accept)",
    )
    parser.add_argument(
        "--max-epsilon",
        type=_epsilon_or_none,
        metavar="E|none",
        help="each site's differential-privacy budget per release: bundles without DP, or "
        "beyond the budget, are refused (over_budget); 'none' removes it (default none)",
    )
    parser.add_argument(
        "--dp-delta", type=float, help="the delta budgets are stated at (default 1e-5)"
    )
    parser.add_argument(
        "--require-dp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse bundles made without differential privacy (default: no)",
    )


NO_BUDGET = "none"


def _epsilon_or_none(text: str) -> float | str:
    if text.strip().lower() == NO_BUDGET:
        return NO_BUDGET
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or 'none', got {text!r}"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"epsilon must be a positive number, got {text!r}")
    return value


def _register_reference(sections: Any) -> None:
    reference = sections.add_parser("reference", help="build reference releases offline")
    commands = reference.add_subparsers(dest="reference_command", metavar="{build}")
    commands.required = True
    build = add_subcommand(
        commands,
        "build",
        _build,
        "train a reference network on raw counts and write a release directory",
        "Select highly variable genes on the reference, train the chosen model family on all "
        "of its cells and write a release (manifest + pickle-free weights) to --out.",
    )
    add_data_arguments(
        build,
        label_help="obs column with cell-type labels; repeat for several label levels "
        "(primary first)",
    )
    build.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    build.add_argument("--out", required=True, type=Path, help="release directory to create")
    build.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument(
        "--n-top-genes", type=int, default=2000, help="highly variable genes to keep (2000)"
    )
    build.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set likelihood=zinb --set latent_dim=16",
    )
    build.add_argument(
        "--train-set",
        action="append",
        metavar="KEY=VALUE",
        help="override a training setting, e.g. --train-set prototype_weight=20",
    )
    build.add_argument(
        "--unknown-threshold",
        type=float,
        help="uncertainty above which sites call a cell unknown with the preset's transfer "
        "method (default: 0.5 for prototypes; for kNN, calibrated on the reference cells)",
    )
    build.add_argument(
        "--no-reference-latents",
        action="store_true",
        help="do not keep the reference cells' latent positions (disables kNN transfer)",
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    build.add_argument("--json", action="store_true", help="print the result as JSON")


def _build(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ReleaseError(f"{out}: already exists; choose a new --out or pass --overwrite")
    model_overrides = settings(args.set, ModelConfig)
    train_overrides = settings(args.train_set, TrainConfig)
    release = build_reference(
        read_h5ad(args.data),
        batch_key=args.batch_key,
        label_key=args.label_key,
        model=args.model,
        epochs=args.epochs,
        seed=args.seed,
        n_top_genes=args.n_top_genes,
        layer=args.layer,
        gene_key=args.gene_key,
        model_settings=model_overrides,
        train_settings=train_overrides,
        unknown_threshold=args.unknown_threshold,
        keep_reference_latents=not args.no_reference_latents,
        progress=not args.quiet,
        source=str(args.data),
    )
    release.save(out, overwrite=args.overwrite)
    trained = release.provenance
    n_cells = int(release.content["reference"]["n_cells"])
    payload = {
        "release_dir": str(out),
        "release_id": release.content_hash,
        "preset": args.model,
        "n_cells": n_cells,
        "n_genes": len(release.genes),
        "conditions": release.condition_names,
        "label_levels": release.label_levels,
        "total_parameters": release.build_model().total_parameter_count(),
        "epochs_trained": trained["epochs_trained"],
        "stopped_early": trained["stopped_early"],
        "training_seconds": round(trained["training_seconds"], 2),
        "transfer": release.content["transfer"],
    }
    transfer = release.content["transfer"]
    thresholds = "; ".join(
        f"{method} " + ", ".join(f"{level} > {t:.3g}" for level, t in by_level.items())
        for method, by_level in transfer["unknown_thresholds"].items()
    )
    labels = ", ".join(f"{lv} ({len(release.prototypes(lv))} types)" for lv in release.label_levels)
    print_result(
        payload,
        args.json,
        [
            f"release {release.content_hash}",
            f"  written to      {out}",
            f"  model           {args.model}, {payload['total_parameters']:,} parameters",
            f"  cells / genes   {n_cells:,} / {len(release.genes):,}",
            f"  conditions      {len(release.condition_names)}: "
            + ", ".join(release.condition_names),
            f"  label levels    {labels or 'none (unlabelled reference)'}",
            f"  training        {payload['epochs_trained']} epochs in "
            f"{payload['training_seconds']:.1f}s"
            + (" (stopped early)" if payload["stopped_early"] else ""),
            f"  label transfer  {transfer['method']} by default; unknown when {thresholds}",
        ],
    )
    return 0


# ------------------------------------------------------------------------- store sections
def _register_store_sections(sections: Any) -> None:
    release = _section(sections, "release", "reference releases the coordinator serves", "publish")
    publish = _store_command(
        release, "publish", _publish, "publish a release directory as the current reference",
        "Verifies the release, stores it and builds its first composite (no adaptors yet). "
        "Bundles trained against an earlier release are no longer accepted.",
    )  # fmt: skip
    publish.add_argument("--release", required=True, type=Path, help="release directory")

    site = _section(sections, "site", "enrolled sites", "enroll,revoke,list")
    enroll = _store_command(site, "enroll", _enroll, "enrol a site with its public key")
    enroll.add_argument("--site-id", required=True, help="the site's id (never reused)")
    enroll.add_argument(
        "--public-key",
        required=True,
        type=Path,
        help="the site's site.pub; flower_node.pub beside it is enrolled as its Flower node key",
    )
    enroll.add_argument(
        "--node-public-key", type=Path, help="the site's Flower node key, if kept elsewhere"
    )
    revoke = _store_command(site, "revoke", _revoke, "revoke a site: its bundles are refused")
    revoke.add_argument("--site-id", required=True)
    revoke.add_argument("--reason", default="revoked by the operator", help="recorded reason")
    _store_command(site, "list", _list_sites, "list sites")

    adaptors = _section(
        sections, "adaptors", "registered bundles", "list,show,approve,reject,withdraw"
    )
    listing = _store_command(adaptors, "list", _list_adaptors, "list registered bundles")
    listing.add_argument("--state", choices=("accepted", "held", "rejected"))
    listing.add_argument("--site-id")
    listing.add_argument(
        "--rejected",
        action="store_true",
        help="list refused submissions instead (the rejection log: site as claimed, time, "
        "reason code, bundle id; newest first)",
    )
    show = _store_command(adaptors, "show", _show_adaptor, "show one bundle")
    show.add_argument("bundle_id", help="bundle id (sha256:... or a unique prefix of its hex)")
    for name, handler, text in (
        ("approve", _approve, "accept a held bundle (it enters the next composite)"),
        ("reject", _reject, "reject a held bundle (its conditions become free again)"),
        ("withdraw", _withdraw, "withdraw an accepted bundle: a new composite without it"),
    ):
        decide = _store_command(adaptors, name, handler, text)
        decide.add_argument("bundle_id", help="bundle id (sha256:... or a unique prefix)")
        decide.add_argument("--reason", default="", help="recorded reason")

    composite = _section(sections, "composite", "the composed reference", "show")
    _store_command(composite, "show", _show_composite, "show the current composite")

    policy = _section(sections, "policy", "the acceptance policy", "show,set")
    _store_command(policy, "show", _show_policy, "show the acceptance policy")
    _add_policy_arguments(_store_command(policy, "set", _set_policy, "change the policy"))

    tls = _section(sections, "tls", "TLS material", "client-cert,server-cert")
    client = _store_command(
        tls, "client-cert", _client_cert, "issue a client certificate for mutual TLS",
        "Signed by the store's CA; give DIR/NAME.pem and DIR/NAME.key to the site, which "
        "passes them as --client-cert and --client-key.",
    )  # fmt: skip
    client.add_argument("--name", required=True, help="certificate name (e.g. the site id)")
    client.add_argument("--out", required=True, type=Path, help="directory for NAME.pem/.key")
    server = _store_command(
        tls, "server-cert", _server_cert, "renew the TLS server certificate (or the whole CA)",
        "Issues a new server.pem/server.key for --host names (default: the current "
        "certificate's; localhost, 127.0.0.1 and ::1 are always added), signed by the store's "
        "CA, or by a new CA with --new-ca (then every site needs the new ca.pem and client "
        "certificates must be issued again). The old files move to STORE/retired/. Restart "
        "the coordinator and the SuperLink afterwards.",
    )  # fmt: skip
    server.add_argument("--host", action="append", help="name or address (repeatable)")
    server.add_argument("--new-ca", action="store_true", help="also replace the CA")

    audit = _section(sections, "audit", "the hash-chained audit log", "verify")
    verify = _store_command(
        audit, "verify", _verify_audit, "check the audit chain and every stored row against it",
        "Also checks that every composite's signed statement (by this coordinator's current or "
        "a retired key) anchors an entry the chain still holds, and, with --composite, the "
        "statements of composites that sites pulled (their signature.json): a log rewritten "
        "with every later hash recomputed no longer matches them. Exit status 0 when intact, 1 "
        "when any entry or row was edited, removed or added outside fedatlas.",
    )  # fmt: skip
    verify.add_argument(
        "--composite", action="append", type=Path, default=[],
        help="a composite directory a site pulled (repeatable)",
    )  # fmt: skip


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.store)


def _policy_from(args: argparse.Namespace, base: Any) -> Any:
    changes = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Policy)
        if getattr(args, field.name) is not None
    }
    if changes.get("max_epsilon") == NO_BUDGET:
        changes["max_epsilon"] = None
    return dataclasses.replace(base, **changes)


def _init(args: argparse.Namespace) -> int:
    policy = _policy_from(args, Policy())
    hosts = list(dict.fromkeys([*(args.host or []), *DEFAULT_HOSTS]))
    layout = init_store(args.store, hosts=hosts, policy=policy)
    key_id = fingerprint(load_public_key(layout.public_key))
    print_result(
        {
            "store": str(args.store),
            "coordinator_key": key_id,
            "ca": str(layout.ca_certificate),
            "hosts": hosts,
            "policy": policy.__dict__,
        },
        args.json,
        [
            f"coordinator store {args.store}",
            f"  signing key     {key_id} ({layout.public_key})",
            f"  CA certificate  {layout.ca_certificate} (give it to every site)",
            f"  server names    {', '.join(hosts)}",
            f"  policy          {policy.approval} approval, prototypes over >= "
            f"{policy.min_prototype_cells} cells",
        ],
    )
    return 0


def _publish(args: argparse.Namespace) -> int:
    release = Release.load(args.release)
    with _registry(args) as registry:
        composite = registry.publish_release(release, actor="admin")
    print_result(
        {"release_id": release.content_hash, "composite_generation": composite.generation},
        args.json,
        [
            f"published release {release.content_hash}",
            f"  composite       generation {composite.generation}: {composite.content_hash}",
        ],
    )
    return 0


def _enroll(args: argparse.Namespace) -> int:
    key = load_public_key(args.public_key)
    node_path = args.node_public_key or args.public_key.with_name(f"{NODE_KEY_STEM}.pub")
    # an explicit --node-public-key must exist; the sibling of site.pub is optional
    node_key = load_node_public_key(node_path) if args.node_public_key or node_path.exists() else ""
    with _registry(args) as registry:
        _store_call(lambda: registry.store.enroll_site(args.site_id, key, node_key, actor="admin"))
    node_text = f"{node_key[:44]}..." if node_key else f"none ({node_path} is absent)"
    print_result(
        {"site_id": args.site_id, "key_fingerprint": fingerprint(key), "node_key": node_key},
        args.json,
        [
            f"enrolled site {args.site_id!r} with key {fingerprint(key)}",
            f"  Flower node key {node_text}",
        ],
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        site = _store_call(
            lambda: registry.store.revoke_site(args.site_id, actor="admin", reason=args.reason)
        )
    print_result(
        {"site_id": site.site_id, "status": site.status, "revoked_at": site.revoked_at},
        args.json,
        [f"revoked site {site.site_id!r} at {site.revoked_at}; its bundles are now refused"],
    )
    return 0


def _store_call(call: Any) -> Any:
    """Run a store write, turning a store refusal into a user error."""
    try:
        return call()
    except StoreError as exc:
        raise RegistryError(str(exc)) from None


def _list_sites(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        sites = registry.store.list_sites()
        counts = registry.bundles_per_site()
        ledger = registry.privacy_ledger()
        policy = registry.policy
    rows = []
    for s in sites:
        spend = ledger.get(s.site_id)
        epsilon = spend.epsilon(policy.dp_delta) if spend else 0.0
        rows.append(
            {
                "site_id": s.site_id,
                "status": s.status,
                "key_fingerprint": fingerprint(s.public_key),
                "enrolled_at": s.enrolled_at,
                "revoked_at": s.revoked_at,
                "bundles": counts.get(s.site_id, 0),
                "privacy": {  # this release: epsilon at the policy's delta (null: unbounded)
                    "epsilon": epsilon if math.isfinite(epsilon) else None,
                    "delta": policy.dp_delta,
                    "rho": spend.rho if spend else 0.0,
                    "private_bundles": spend.private_bundles if spend else 0,
                    "other_bundles": spend.other_bundles if spend else 0,
                    "budget": policy.max_epsilon,
                },
            }
        )
    budget = "" if policy.max_epsilon is None else f" of {policy.max_epsilon:g}"

    def spent(r: dict[str, Any]) -> str:
        eps = r["privacy"]["epsilon"]
        return "unbounded" if eps is None else f"{eps:.3g}{budget}"

    print_result(
        {"sites": rows},
        args.json,
        table(
            [
                "SITE",
                "STATUS",
                "KEY",
                "ENROLLED",
                "BUNDLES",
                f"EPSILON (delta {policy.dp_delta:g})",
            ],
            [
                [
                    r["site_id"],
                    r["status"],
                    r["key_fingerprint"],
                    r["enrolled_at"],
                    r["bundles"],
                    spent(r),
                ]
                for r in rows
            ],
        )
        if rows
        else ["no sites enrolled"],
    )
    return 0


def _outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return {
        "bundle_id": outcome.bundle_id,
        "site_id": outcome.site_id,
        "state": outcome.state,
        "conditions": list(outcome.conditions),
        "received_at": outcome.received_at,
        "decided_at": outcome.decided_at,
        "reason": outcome.reason,
        "composite_generation": outcome.generation,
    }


def _list_adaptors(args: argparse.Namespace) -> int:
    if args.rejected:
        return _list_rejections(args)
    with _registry(args) as registry:
        records = registry.store.list_bundles(state=args.state, site_id=args.site_id)
        rows = [_outcome_dict(Outcome.of(r, registry.generation_of(r.bundle_id))) for r in records]
    print_result(
        {"adaptors": rows},
        args.json,
        table(
            ["BUNDLE", "SITE", "STATE", "CONDITIONS", "RECEIVED", "GENERATION"],
            [
                [
                    r["bundle_id"][:19],
                    r["site_id"],
                    r["state"],
                    ",".join(r["conditions"]),
                    r["received_at"],
                    r["composite_generation"] or "-",
                ]
                for r in rows
            ],
        )
        if rows
        else ["no bundles registered"],
    )
    return 0


def _list_rejections(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        logged = registry.store.rejections(site_id=args.site_id)
    print_result(
        {"rejections": [dataclasses.asdict(r) for r in logged]},
        args.json,
        table(
            ["BUNDLE", "SITE (CLAIMED)", "CODE", "RECEIVED", "REASON"],
            [
                [r.bundle_id[:19], r.site_id[:24], r.reason_code, r.received_at, r.reason[:60]]
                for r in logged
            ],
        )
        if logged
        else ["no rejected submissions logged"],
    )
    return 0


def _show_adaptor(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        record = registry.bundle(args.bundle_id)
        adaptor = registry.adaptor(record.bundle_id)
        info = _outcome_dict(Outcome.of(record, registry.generation_of(record.bundle_id)))
    info.update(
        bundle_bytes=len(record.blob),
        release_id=record.release_id,
        adaptor_id=adaptor.content_hash,
        training=adaptor.content.get("training", {}),
        prototypes={k: v["labels"] for k, v in adaptor.content.get("prototypes", {}).items()},
        tensors={k: v["shape"] for k, v in adaptor.content["tensors"].items()},
    )
    lines = [f"bundle {record.bundle_id}"] + [
        f"  {key:<20} {value}" for key, value in info.items() if key != "bundle_id"
    ]
    print_result(info, args.json, lines)
    return 0


def _decide(args: argparse.Namespace, state: str) -> int:
    with _registry(args) as registry:
        outcome = registry.decide(args.bundle_id, state, actor="admin", reason=args.reason)
    print_result(
        _outcome_dict(outcome),
        args.json,
        [f"bundle {outcome.bundle_id}: {outcome.state}"]
        + (
            [f"  composite       generation {outcome.generation}"]
            if outcome.state == "accepted"
            else []
        ),
    )
    return 0


def _approve(args: argparse.Namespace) -> int:
    return _decide(args, "accepted")


def _reject(args: argparse.Namespace) -> int:
    return _decide(args, "rejected")


def _withdraw(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        outcome = registry.withdraw(args.bundle_id, actor="admin", reason=args.reason)
    print_result(
        _outcome_dict(outcome),
        args.json,
        [
            f"bundle {outcome.bundle_id}: withdrawn (now rejected)",
            f"  composite       generation {outcome.generation}, without it",
        ],
    )
    return 0


def _show_composite(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        record = registry.store.latest_composite()
        if record is None:
            raise RegistryError(f"{args.store}: no composite yet (admin release publish)")
        prototypes = json.loads(record.manifest_json)["content"]["prototypes"]
        labels = {level: len(entry["labels"]) for level, entry in prototypes.items()}
    info = {
        "generation": record.generation,
        "content_hash": record.content_hash,
        "base_release": record.base_release_id,
        "adaptors": list(record.bundle_ids),
        "created_at": record.created_at,
        "prototype_labels": labels,
    }
    print_result(
        info,
        args.json,
        [
            f"composite generation {record.generation}: {record.content_hash}",
            f"  base release    {record.base_release_id}",
            f"  adaptors        {len(record.bundle_ids)}",
            f"  created         {record.created_at}",
            f"  prototypes      {labels}",
        ],
    )
    return 0


def _show_policy(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        policy = registry.policy
    print_result(policy.__dict__, args.json, [f"  {k:<20} {v}" for k, v in policy.__dict__.items()])
    return 0


def _set_policy(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        policy = _policy_from(args, registry.policy)
        registry.set_policy(policy, actor="admin")
    print_result(policy.__dict__, args.json, [f"  {k:<20} {v}" for k, v in policy.__dict__.items()])
    return 0


def _client_cert(args: argparse.Namespace) -> int:
    layout = StoreLayout(args.store)
    issued = issue(
        Issued(layout.ca_certificate, layout.ca_key),
        args.out / f"{args.name}.pem",
        args.out / f"{args.name}.key",
        common_name=args.name,
        server=False,
    )
    print_result(
        {"certificate": str(issued.certificate), "key": str(issued.key)},
        args.json,
        [f"client certificate {issued.certificate} (key {issued.key})"],
    )
    return 0


def _verify_audit(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        keys = registry.layout.coordinator_keys()
        problems = registry.store.verify_audit(keys)
        for directory in args.composite:
            statement = CompositeStatement.load(directory)
            problems += [
                f"{directory}: {p}" for p in registry.store.statement_problems(statement, keys)
            ]
        n_entries = len(registry.store.audit_entries())
    print_result(
        {"intact": not problems, "entries": n_entries, "problems": problems},
        args.json,
        [f"audit log intact: {n_entries} entries, every stored row matches"]
        if not problems
        else [f"audit log NOT intact ({len(problems)} problems):", *(f"  {p}" for p in problems)],
    )
    return 0 if not problems else 1


# ------------------------------------------------------------------ backups and key rotation
def _register_maintenance(sections: Any) -> None:
    store = _section(
        sections, "store", "back up, restore and re-key a coordinator store",
        "backup,restore,rotate-key",
    )  # fmt: skip
    backup = _store_command(
        store, "backup", _backup, "write a consistent backup of the store to one file",
        "Safe while the coordinator and the SuperLink run: the registry is copied with "
        "SQLite's online backup API. The file (tar.gz, mode 0600) also holds the coordinator "
        "key, the CA and the server certificate with their private keys: keep it as safe "
        "as those.",
    )  # fmt: skip
    backup.add_argument("--out", required=True, type=Path, help="backup file to create")
    restore = _store_command(
        store, "restore", _restore, "restore a backup file as a new store directory",
        "Checks every file against the backup's manifest, writes the store beside --store and "
        "renames it into place when complete. Exit status 1 when the restored audit log does "
        "not verify.",
    )  # fmt: skip
    restore.add_argument("--backup", required=True, type=Path, help="file from store backup")
    _store_command(
        store, "rotate-key", _rotate_key, "replace the coordinator's signing key",
        "Stop the coordinator and the SuperLink first. The old key moves to STORE/retired/, "
        "the current composite is published again as the next generation signed by the new "
        "key, and the change is audited. Every site must then trust the new coordinator.pub. "
        "Run it again if it was interrupted: it finishes the job.",
    )  # fmt: skip


def _backup(args: argparse.Namespace) -> int:
    info = backup_store(args.store, args.out)
    print_result(
        info,
        args.json,
        [
            f"backup {info['backup']} ({info['bytes']:,} bytes, mode 0600: holds private keys)",
            f"  sites           {len(info['sites'])}, bundles {info['bundles']}, composite "
            f"generation {info['composite_generation']}",
            f"  audit log       {info['audit_entries']} entries, "
            + ("intact" if info["audit_intact"] else "NOT intact (see --json)"),
        ],
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    info = restore_store(args.backup, args.store)
    print_result(
        info,
        args.json,
        [
            f"restored {info['backup']} to {info['store']}",
            f"  sites           {len(info['sites'])}, bundles {info['bundles']}, composite "
            f"generation {info['composite_generation']}",
            f"  audit log       {info['audit_entries']} entries, "
            + ("intact" if info["audit_intact"] else "NOT intact:"),
            *(f"    {problem}" for problem in info["audit_problems"]),
        ],
    )
    return 0 if info["audit_intact"] else 1


def _rotate_key(args: argparse.Namespace) -> int:
    info = rotate_signing_key(args.store)
    print_result(
        info,
        args.json,
        [
            f"coordinator key {info['coordinator_key']} (was {info['previous_key']})",
            f"  composite       generation {info['composite_generation']}, signed by the new key"
            if info["composite_generation"]
            else "  composite       none yet (no release published)",
            f"  give sites      {info['public_key_file']} (site node/pull --coordinator-key), "
            "or have them drop the old pin from known_coordinators.json",
        ],
    )
    return 0


def _server_cert(args: argparse.Namespace) -> int:
    info = renew_server_certificate(args.store, args.host, new_ca=args.new_ca)
    print_result(
        info,
        args.json,
        [
            f"server certificate for {', '.join(info['hosts'])}, valid until {info['not_after']}",
            "  restart the coordinator and the SuperLink to use it",
            f"  sites           give every site the new {info['ca']}"
            if info["new_ca"]
            else "  sites           nothing to do (same CA)",
        ],
    )
    return 0
