"""Coordinator under load: concurrent submissions, composite rebuilds, bundle sizes.

1. A real coordinator process (TLS, SQLite store) receives signed bundles from many site
   processes at once (default 50 sites x 4 bundles, each site its own process sending its
   bundles one after another): accepted bundles per second, p50/p99 latency of a submission,
   the coordinator's peak memory (VmHWM).
2. Composite rebuild time (compose + content hash + signature) for 10, 100 and 1,000 adaptors.
3. Bytes per bundle for each preset (a site with two batches; 2,000 genes).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/coordinator_load.py [--sites 50 --bundles 4]

Writes ``bench/results/coordinator_load.json`` and ``coordinator_load.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.registry import Registry, init_store
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.adaptor import Adaptor, compose
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.bundle import make_bundle
from fedatlas.shared.wire.composite import sign_composite
from fedatlas.shared.wire.signing import load_signing_key, public_bytes, write_keypair

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_EPOCHS = {"scpoli": 5, "scarches": 5, "scalex": 3}


def trained_adaptor(world: SyntheticWorld, preset: str) -> tuple[Release, Adaptor]:
    """A small reference of ``preset`` and one site's adaptor (two batches, labelled)."""
    reference = world.sample(2_000, batches=("r1", "r2"), seed=1)
    cells = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    release = train_reference(
        cells, preset=preset, epochs=REFERENCE_EPOCHS[preset], seed=0, progress=False
    ).release
    site = world.sample(400, batches=("b1", "b2"), seed=2)
    cells = extract_cells(site, source="site", batch_key="batch", label_keys=["cell_type"])
    result = map_onto(release, cells, MappingOptions(site_id="site", epochs=2), progress=False)
    assert result.adaptor is not None
    return release, result.adaptor


def relabelled(adaptor: Adaptor, site_id: str, batch: str) -> Adaptor:
    """The adaptor's first condition row as batch ``batch`` of ``site_id``."""
    from fedatlas.shared.hashing import tensor_index
    from fedatlas.shared.model.release import MODEL_PREFIX

    tensors = {
        k: (v[:1].clone() if k.startswith(MODEL_PREFIX) else v) for k, v in adaptor.tensors.items()
    }
    content = dict(adaptor.content)
    content["site_id"] = site_id
    content["conditions"] = [{"name": f"{site_id}/{batch}", "n_cells": 200}]
    content["tensors"] = tensor_index(tensors)
    return Adaptor(content, tensors)


def site_process(address: str, ca: str, paths: list[str], start: float, out: Any) -> None:
    """One site: wait for the common start, then send its bundles one after another."""
    import grpc

    from fedatlas.shared.wire.transport import CHANNEL_OPTIONS
    from fedatlas.v1 import coordinator_pb2 as pb
    from fedatlas.v1 import coordinator_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
    with grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Health(pb.HealthRequest(), timeout=30)  # connected before the clock starts
        time.sleep(max(0.0, start - time.time()))
        for path in paths:
            raw = Path(path).read_bytes()
            t0 = time.perf_counter()
            status = stub.SubmitBundle(pb.SubmitBundleRequest(bundle=raw), timeout=300)
            out.put((time.perf_counter() - t0, int(status.state), status.reason_code, time.time()))


def load_test(release: Release, adaptor: Adaptor, n_sites: int, per_site: int) -> dict[str, Any]:
    """Concurrent submissions against a coordinator process."""
    with tempfile.TemporaryDirectory(prefix="fedatlas-load-") as tmp:
        root = Path(tmp)
        init_store(root / "store", policy=Policy())
        files: dict[str, list[str]] = {}
        with Registry(root / "store") as registry:
            registry.publish_release(release, actor="bench")
            for s in range(n_sites):
                site_id = f"site{s:03d}"
                key = load_signing_key(write_keypair(root / site_id, "site").private)
                registry.store.enroll_site(site_id, public_bytes(key), "", actor="bench")
                files[site_id] = []
                for b in range(per_site):
                    path = root / site_id / f"b{b}.bundle"
                    path.write_bytes(make_bundle(relabelled(adaptor, site_id, f"b{b}"), key).raw)
                    files[site_id].append(str(path))
        server = subprocess.Popen(
            [sys.executable, "-m", "fedatlas", "coordinator", "serve", "--store",
             str(root / "store"), "--address", "127.0.0.1:0", "--workers", "16"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        assert server.stdout is not None
        line = server.stdout.readline()
        while "serving on" not in line:
            if not line and server.poll() is not None:
                raise RuntimeError("coordinator did not start")
            line = server.stdout.readline()
        address = re.search(r"serving on (\S+)", line).group(1)  # type: ignore[union-attr]
        queue: Any = mp.Queue()
        start = time.time() + 5.0 + 0.05 * n_sites
        procs = [
            mp.Process(
                target=site_process,
                args=(address, str(root / "store" / "ca.pem"), paths, start, queue),
            )
            for paths in files.values()
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=600) for _ in range(n_sites * per_site)]
        for p in procs:
            p.join()
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak_mb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([r[0] for r in results])
    accepted = [r for r in results if r[1] == 1]
    wall = max(r[3] for r in results) - start
    return {
        "sites": n_sites,
        "bundles_per_site": per_site,
        "accepted": len(accepted),
        "rejected": {r[2]: sum(1 for x in results if x[2] == r[2]) for r in results if r[1] != 1},
        "wall_s": round(wall, 2),
        "accepted_per_s": round(len(accepted) / wall, 1),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
        "coordinator_peak_mb": round(peak_mb, 1),
    }


def rebuild_times(release: Release, adaptor: Adaptor, counts: list[int]) -> dict[int, float]:
    """Seconds to compose, hash and sign composites of ``n`` adaptors."""
    key = Ed25519PrivateKey.generate()
    adaptors = [relabelled(adaptor, f"site{i:04d}", "b0") for i in range(max(counts))]
    out = {}
    for n in counts:
        t0 = time.perf_counter()
        composite = compose(release, adaptors[:n])
        sign_composite(
            key, composite, generation=1, base_release_id=release.content_hash,
            bundle_ids=[], created_at="", audit_head=(0, ""),
        )  # fmt: skip
        out[n] = round(time.perf_counter() - t0, 3)
        print(f"[bench] composite of {n} adaptors: {out[n]} s", file=sys.stderr)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Rebuild time against adaptor count, and bundle bytes per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    counts = sorted(int(k) for k in result["rebuild_s"])
    left.plot(counts, [result["rebuild_s"][c] for c in counts], marker="o")
    left.set(xscale="log", yscale="log", xlabel="adaptors in the composite")
    left.set(ylabel="rebuild time (s)", title="composite rebuild (compose + hash + sign)")
    presets = list(result["bundle_bytes"])
    right.bar(presets, [result["bundle_bytes"][p] for p in presets], color="tab:green")
    right.set(ylabel="bytes", title="bundle size (two batches, 2,000 genes)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--bundles", type=int, default=4, help="bundles per site")
    parser.add_argument("--rebuild", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    world = SyntheticWorld(seed=0, n_genes=2000, cell_types=tuple(f"t{i}" for i in range(6)))
    built = {p: trained_adaptor(world, p) for p in ("scpoli", "scarches", "scalex")}
    bundle_bytes = {
        p: len(make_bundle(a, Ed25519PrivateKey.generate()).raw) for p, (_, a) in built.items()
    }
    release, adaptor = built["scpoli"]
    print(f"[bench] {args.sites} sites x {args.bundles} bundles", file=sys.stderr)
    result = {
        "load": load_test(release, adaptor, args.sites, args.bundles),
        "rebuild_s": rebuild_times(release, adaptor, args.rebuild),
        "bundle_bytes": bundle_bytes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coordinator_load.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "coordinator_load.png")
    load = result["load"]
    print(
        f"submissions: {load['accepted']} accepted of {args.sites * args.bundles} in "
        f"{load['wall_s']} s = {load['accepted_per_s']}/s; latency p50 {load['latency_p50_ms']} "
        f"ms, p99 {load['latency_p99_ms']} ms; coordinator peak {load['coordinator_peak_mb']} MB"
    )
    print("composite rebuild: " + ", ".join(f"{n}: {s} s" for n, s in result["rebuild_s"].items()))
    print("bundle bytes: " + ", ".join(f"{p}: {b:,}" for p, b in bundle_bytes.items()))
    print(f"written: {RESULTS / 'coordinator_load.json'}, {RESULTS / 'coordinator_load.png'}")


if __name__ == "__main__":
    main()
