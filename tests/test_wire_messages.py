"""Everything a site sends is in the wire table, and nothing of it grows with the site's cells.

Two sites of the same design (two batches, three labelled types) but 137 and 1,370 cells run
every workflow for real: on Flower (a SuperLink and two SuperNodes with TLS and node
authentication) an adaptor campaign, a federated build whose sites name only their public genes
and a federated build with a gene list, recorded by a ServerApp that keeps every reply it
receives (``tests/flower_apps/recording``); over gRPC the site client's every call, recorded by
an interceptor in the real coordinator server. Each message type and field must be one of
:data:`~fedatlas.shared.wire.messages.SITE_MESSAGES`, and each field the same size at both sites.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from anndata import AnnData
from conftest import cells_of
from google.protobuf.message import Message as ProtoMessage

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.coordinator.flower_runs import flower_dir, run_campaign, run_federated_build
from fedatlas.coordinator.registry import Registry
from fedatlas.coordinator.server import start_server
from fedatlas.deploy.launcher import LocalLauncher
from fedatlas.shared.hashing import digest
from fedatlas.shared.model.federated import FederatedPlan
from fedatlas.shared.model.federated_genes import held_genes
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.wire.codec import decode_tensors
from fedatlas.shared.wire.messages import SCALES, SITE_MESSAGES, render_site_messages
from fedatlas.site_client.client import CoordinatorClient, CoordinatorError
from fedatlas.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.slow

SIZES = {"s137": 137, "s1370": 1_370}  # cell counts that no dimension of the network shares
PRIVATE = 3  # genes of each site that are not in the public universe
RECORDING_APP = Path(__file__).parent / "flower_apps" / "recording"
RENDERING = Path(__file__).parents[1] / "shared" / "wire" / "MESSAGES.md"
PLAN = FederatedPlan(preset="scpoli", rounds=1, local_epochs=1, n_top_genes=100,
                     label_level="cell_type", finish_epochs=1)  # fmt: skip
TEXT_SLACK = 64  # bytes: numbers written as text (cell counts, losses) differ in length


class RequestRecorder(grpc.ServerInterceptor):
    """Keeps every request the coordinator's gRPC server receives, as its handler gets it."""

    def __init__(self) -> None:
        self.requests: list[ProtoMessage] = []
        self._lock = threading.Lock()

    def _keep(self, inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: Any) -> Any:
            with self._lock:
                self.requests.append(request)
            return inner(request, context)

        return handle

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler.unary_unary is not None:
            make, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.unary_stream is not None:
            make, inner = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        else:
            raise AssertionError(f"{details.method}: a streaming request the table cannot cover")
        return make(
            self._keep(inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def proto_fields(message: ProtoMessage) -> dict[str, int]:
    """A protobuf message's set fields and their sizes in bytes."""
    return {fd.name: _size(value) for fd, value in message.ListFields()}


def _size(value: Any) -> int:
    if isinstance(value, bytes | str):
        return len(value.encode() if isinstance(value, str) else value)
    if isinstance(value, ProtoMessage):
        return value.ByteSize()
    if isinstance(value, list | tuple) or hasattr(value, "__len__"):
        return sum(_size(v) for v in value)
    return 8  # a number


def record_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """A recorded Flower reply's fields (``record.field``) with their values (bytes decoded)."""
    out = {}
    for name, record in entry["records"].items():
        assert record["kind"] == "ConfigRecord", f"{entry['type']}: {name} is {record['kind']}"
        for key, value in record["fields"].items():
            out[f"{name}.{key}"] = _decoded(value)
    return out


def _decoded(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["bytes"])
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def check_listed(kind: str, fields: dict[str, int]) -> None:
    """``kind`` is in the table, its fields are listed, and those always sent are there."""
    assert kind in SITE_MESSAGES, f"a site sent {kind}, which the wire table does not list"
    spec = SITE_MESSAGES[kind].fields
    assert set(fields) <= set(spec), f"{kind}: unlisted fields {sorted(set(fields) - set(spec))}"
    always = {name for name, f in spec.items() if not f.only}
    assert always <= set(fields), f"{kind}: listed fields not sent {sorted(always - set(fields))}"


def bundle_fields(raw: bytes) -> dict[str, dict[str, int]]:
    """The fields of a bundle and of its signed body, checked against the table."""
    bundle = pb.Bundle.FromString(raw)
    body = pb.BundleBody.FromString(bundle.body)
    for tensor in body.tensors:
        assert not set(SIZES.values()) & set(tensor.shape), (tensor.name, list(tensor.shape))
    out = {"fedatlas.v1.Bundle": proto_fields(bundle), "fedatlas.v1.BundleBody": proto_fields(body)}
    for kind, fields in out.items():
        check_listed(kind, fields)
    return out


def assert_same_sizes(sizes: dict[str, dict[str, int]], what: str) -> None:
    """Per field, the two sites' sizes differ by no more than numbers written as text."""
    small, large = sizes["s137"], sizes["s1370"]
    assert small.keys() == large.keys(), what
    for name in small:
        assert abs(large[name] - small[name]) <= TEXT_SLACK, (what, name, small[name], large[name])


@pytest.fixture(scope="module")
def site_files(world: SyntheticWorld, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both sites' data (each with PRIVATE genes of its own) and the public gene universe."""
    root = tmp_path_factory.mktemp("wire")
    files: dict[str, Any] = {"root": root}
    for site, n in SIZES.items():
        adata = world.sample(n, batches=("b1", "b2"), cell_types=("A", "B", "C"), seed=3)
        public = [str(g) for g in adata.var_names]
        adata.var_names = [f"private-{site}-{i}" for i in range(PRIVATE)] + public[PRIVATE:]
        adata.write_h5ad(root / f"{site}.h5ad")
        files[site] = [str(g) for g in adata.var_names]
    files["universe"] = public
    (root / "universe.txt").write_text("# public genes\n" + "\n".join(public) + "\n")
    return files


@pytest.fixture(scope="module")
def sent(site_files: dict[str, Any], reference_adata: AnnData) -> dict[str, Any]:
    """Every message the two sites send in every workflow: the Flower replies per run (an
    adaptor campaign on a published release, a build on public genes, a build with a gene
    list) and the gRPC requests."""
    root = site_files["root"]
    store = root / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    release = train_reference(cells_of(reference_adata), preset="scpoli", epochs=2,
                              n_top_genes=100, seed=0, progress=False).release  # fmt: skip
    release.save(root / "release")
    assert main(["-q", "admin", "release", "publish", "--store", str(store),
                 "--release", str(root / "release")]) == 0  # fmt: skip
    for site in SIZES:
        assert main(["-q", "site", "keygen", "--out", str(root / site)]) == 0
        assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", site,
                     "--public-key", str(root / site / "site.pub")]) == 0  # fmt: skip
    runs: dict[str, Any] = {}
    with LocalLauncher(root / "logs") as launcher:
        address = launcher.superlink(store)
        for site in SIZES:
            launcher.site_node(
                site, superlink=address, ca=store / "ca.pem", key=root / site / "site.key",
                data=root / f"{site}.h5ad", batch_key="batch", label_key="cell_type",
                coordinator_key=store / "coordinator.pub", epochs=1,
                gene_universe=root / "universe.txt", epsilon=math.inf,  # exact: same shapes
            )  # fmt: skip
        runs["campaign"] = _recorded(store, lambda: run_campaign(
            store, None, min_sites=2, timeout=120, app=RECORDING_APP))  # fmt: skip
        requests = _grpc_requests(store, root)
        runs["public"] = _recorded(store, lambda: run_federated_build(
            store, None, PLAN, min_sites=2, timeout=120, app=RECORDING_APP))  # fmt: skip
        with Registry(store) as registry:
            released = registry.current_release().genes
        listed = [*released, "private-s137-0", "held-by-no-site"]
        runs["listed"] = _recorded(store, lambda: run_federated_build(
            store, None, PLAN, min_sites=2, timeout=120, gene_list=listed,
            app=RECORDING_APP))  # fmt: skip
    runs["listed"]["genes"] = listed
    return {"flower": runs, "grpc": requests}


def _recorded(store: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A run's report, and the replies its ServerApp received (by type, then site)."""
    before = set((flower_dir(store) / "campaigns").glob("*.messages.json"))
    report = run()
    assert report["status"] == "finished:completed", report
    assert report["completed"], report
    (path,) = set((flower_dir(store) / "campaigns").glob("*.messages.json")) - before
    replies: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in json.loads(path.read_text()):
        assert not entry["error"], entry
        replies.setdefault(entry["type"], {})[entry["node"]] = entry
    return {"report": report, "replies": replies}


def _grpc_requests(store: Path, root: Path) -> list[ProtoMessage]:
    """Each site's every gRPC call to the real server: ``site pull``, ``site send`` of a bundle
    prepared on the release (its conditions are registered already: the coordinator refuses it,
    after receiving it), then status, health and the listings (refused without mutual TLS)."""
    recorder = RequestRecorder()
    server, port, registry = start_server(store, "127.0.0.1:0", interceptors=[recorder])
    address = f"127.0.0.1:{port}"
    try:
        for site in SIZES:
            connection = ["--coordinator", address, "--ca", str(store / "ca.pem"),
                          "--coordinator-key", str(store / "coordinator.pub"),
                          "--known-coordinators", str(root / site / "known.json")]  # fmt: skip
            assert (
                main(["-q", "site", "pull", *connection, "--out", str(root / f"{site}.pulled")])
                == 0
            )
            bundle = root / f"{site}.bundle"
            assert main(["-q", "site", "prepare", "--reference", str(root / "release"),
                         "--site-id", site, "--key", str(root / site / "site.key"),
                         "--data", str(root / f"{site}.h5ad"), "--batch-key", "batch",
                         "--label-key", "cell_type", "--epochs", "1",
                         "--out", str(root / f"{site}.grpc.h5ad"),
                         "--bundle-out", str(bundle), "--epsilon", "inf"]) == 0  # fmt: skip
            main(["-q", "site", "send", *connection, "--bundle", str(bundle)])
            with CoordinatorClient(address, store / "ca.pem", retries=0) as client:
                client.health()
                client.status(digest(bundle.read_bytes()))
                with pytest.raises(CoordinatorError, match="PERMISSION_DENIED"):
                    client.list_adaptors(site)
                with pytest.raises(CoordinatorError, match="PERMISSION_DENIED"):
                    client.list_sites()
    finally:
        server.stop(grace=None)
        registry.close()
    return recorder.requests


def test_the_table_names_known_scales_and_its_rendering_is_current() -> None:
    for name, message in SITE_MESSAGES.items():
        for field_name, spec in message.fields.items():
            assert set(spec.scales) <= set(SCALES), (name, field_name, spec.scales)
    assert RENDERING.read_text() == render_site_messages(), (
        "shared/wire/MESSAGES.md is stale: write render_site_messages() into it"
    )


def test_every_flower_reply_is_listed_and_does_not_grow_with_cells(
    sent: dict[str, Any],
) -> None:
    build = {"query.genes", "query.votes", "train.round", "train.finish"}
    expected = {"public": build, "campaign": {"train"}, "listed": build}
    for run, info in sent["flower"].items():
        assert set(info["replies"]) == expected[run], run
        workflow = "campaign" if run == "campaign" else "build"
        for message_type, by_node in info["replies"].items():
            kind = f"{workflow}/{message_type}"
            assert len(by_node) == 2, (run, kind)
            sizes, inner = {}, {}
            for entry in by_node.values():
                fields = record_fields(entry)
                check_listed(kind, {name: _size(value) for name, value in fields.items()})
                site = fields.get("federated.site-id") or fields["bundle.site-id"]
                sizes[site] = {name: _size(value) for name, value in fields.items()}
                if "trunk.tensors" in fields:
                    tensors = decode_tensors(fields["trunk.tensors"], source=kind)
                    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
                    assert not any(set(SIZES.values()) & set(s) for s in shapes.values()), shapes
                    sizes[site].update({f"shape {n}": len(s) for n, s in shapes.items()})
                if "bundle.bundle" in fields:
                    for part, part_sizes in bundle_fields(fields["bundle.bundle"]).items():
                        inner.setdefault(site, {}).update(
                            {f"{part}.{k}": v for k, v in part_sizes.items()}
                        )
            assert_same_sizes(sizes, f"{run} {kind}")
            if inner:
                assert_same_sizes(inner, f"{run} {kind} bundle")


def test_grpc_requests_are_listed_and_do_not_grow_with_cells(sent: dict[str, Any]) -> None:
    requests = sent["grpc"]
    kinds = [r.DESCRIPTOR.full_name for r in requests]
    grpc_kinds = {k for k, m in SITE_MESSAGES.items() if m.workflow == "gRPC"}
    assert set(kinds) == grpc_kinds, "every listed gRPC request is sent, and no other"
    per_site: dict[str, dict[str, int]] = {}
    for request in requests:
        fields = proto_fields(request)
        check_listed(request.DESCRIPTOR.full_name, fields)
        if isinstance(request, pb.SubmitBundleRequest):
            parts = bundle_fields(request.bundle)
            site = pb.Bundle.FromString(request.bundle).site_id
            per_site[site] = {f"{p}.{k}": v for p, f in parts.items() for k, v in f.items()}
            per_site[site]["bundle"] = fields["bundle"]
    assert_same_sizes(per_site, "SubmitBundleRequest")


def test_without_a_gene_list_a_site_names_only_its_public_genes(
    sent: dict[str, Any], site_files: dict[str, Any]
) -> None:
    run = sent["flower"]["public"]
    public = set(site_files["universe"])
    for entry in run["replies"]["query.genes"].values():
        fields = record_fields(entry)
        site = fields["federated.site-id"]
        assert set(fields) == {"federated.site-id", "federated.genes"}
        assert fields["federated.genes"] == sorted(set(site_files[site]) & public)
        assert not [g for g in fields["federated.genes"] if g.startswith("private-")]
    # neither site's private genes, and the public genes only one of them lacks, were voted on
    assert run["report"]["universe"] == len(public) - PRIVATE
    assert run["report"]["gene_list"] is None
    assert run["report"]["genes"] == PLAN.n_top_genes


def test_with_a_gene_list_a_site_says_only_which_listed_genes_it_holds(
    sent: dict[str, Any], site_files: dict[str, Any]
) -> None:
    run = sent["flower"]["listed"]
    listed = run["genes"]
    for entry in run["replies"]["query.genes"].values():
        fields = record_fields(entry)
        site = fields["federated.site-id"]
        assert set(fields) == {"federated.site-id", "federated.held"}
        assert len(fields["federated.held"]) == (len(listed) + 7) // 8
        held = held_genes(listed, fields["federated.held"], site)
        assert held == [g for g in listed if g in set(site_files[site])]
    # the union: every listed gene but the one no site holds (s137's private gene included:
    # the operator listed it)
    assert run["report"]["gene_list"] == len(listed)
    assert run["report"]["universe"] == len(listed) - 1
