"""Run the published peer tools (scArches scPoli and trVAE, SCALEX) on the robustness suite.

Drives the peer harness (``../shared/peers``: ``run_peers.py`` in its peer venv, ``evaluate.py``
in its eval venv) on every split of ``fedatlas.benchmarks.splits.suite_splits()``, one method ×
seed × split at a time, and merges each finished run into one JSON file keyed
``method/seed/split_name``, so our benchmark can print its scores beside the peers'.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/peers.py [--methods scpoli] [--seeds 0,1]
        [--splits NAME,...] [--work /tmp/peers_work] [--out bench/peers/cellbench_suite.json]

Each run's files go to ``WORK/seed<N>/`` (the harness's file names carry no seed); a run whose
``.eval.json`` exists is not run again, so an interrupted sweep resumes where it stopped.
Scoring is ``fedatlas.benchmarks.robustness.score`` (the harness's ``evaluate.py``), the one our
own runs use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.benchmarks import robustness
from fedatlas.benchmarks.splits import Split, suite_splits

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT.parent / "shared" / "peers"
DEFAULT_PEER_PYTHON = Path("/tmp/peerenv/bin/python")
DEFAULT_EVAL_PYTHON = Path("/tmp/evalenv/bin/python")
DEFAULT_OUT = ROOT / "bench" / "peers" / "cellbench_suite.json"
METHODS = ("scpoli", "scalex", "trvae")
#: evaluate.py's top-level keys that are bookkeeping, not integration scores
_EVAL_META = {"file", "latent", "n_cells", "n_query", "knn_k", "metrics_impl", "clustering"}


def harness_pins(harness: Path = HARNESS) -> dict[str, dict[str, str]]:
    """The ``pkg==version`` pins of ``setup_env.sh``, per environment (peer, eval)."""
    text = (harness / "setup_env.sh").read_text()
    peer, _, evalenv = text.partition("== eval env")
    pin = re.compile(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\\]*)")
    return {"peer": dict(pin.findall(peer)), "eval": dict(pin.findall(evalenv))}


def known_called_unknown(h5ad: Path) -> dict[str, Any]:
    """Query cells of lines the reference holds: how many, and the share predicted "unknown"."""
    import anndata as ad

    obs = ad.read_h5ad(h5ad).obs
    is_query = obs["is_query"].astype(bool).to_numpy()
    cell_type = obs["cell_type"].astype(str).to_numpy()
    known = is_query & np.isin(cell_type, np.unique(cell_type[~is_query]))
    called = int((obs["pred_label"].astype(str).to_numpy()[known] == "unknown").sum())
    n = int(known.sum())
    share = called / n if n else None
    return {"n_known_query": n, "n_known_called_unknown": called, "known_called_unknown": share}


def _record(
    split: Split,
    method: str,
    seed: int,
    ev: dict[str, Any],
    run: dict[str, Any],
    unknown: dict[str, Any],
) -> dict[str, Any]:
    """One JSON entry: split, headline scores, every evaluate.py score, timings and load."""
    label = ev.get("label_transfer", {})
    detect = ev.get("unknown_detection", {})
    return {
        "method": method,
        "seed": seed,
        "split": split.name,
        "family": split.family,
        "kind": split.kind,
        "reference": list(split.reference),
        "query": list(split.query),
        "drop": list(split.drop),
        "novel_lines": sorted(split.novel_lines),
        "overall": ev["overall"],
        "accuracy": label.get("accuracy"),
        "f1_macro_true_labels": label.get("f1_macro_true_labels"),
        "auroc": detect.get("auroc"),
        **unknown,
        "ref_build_s": run["ref_build_s"],
        "query_map_s": run["query_map_s"],
        "query_map_s_per_batch": run.get("query_map_s_per_batch"),
        "integration": {
            k: v for k, v in ev.items() if k not in _EVAL_META and isinstance(v, int | float)
        },
        "label_transfer": label,
        "unknown_detection": detect or None,
        "metrics_impl": ev.get("metrics_impl"),
        "n_ref": run.get("n_ref"),
        "n_query": run.get("n_query"),
        "harness_notes": run.get("split", {}).get("notes", []),
        "loadavg_start": run.get("loadavg_start"),
        "loadavg_1min_during": run.get("loadavg_1min_during"),
    }


def merge(
    out: Path,
    key: str,
    entry: dict[str, Any] | None,
    header: dict[str, Any],
    failure: str | None = None,
) -> None:
    """Merge one finished (or failed) run into ``out``: write a temporary file, then rename."""
    data = json.loads(out.read_text()) if out.exists() else {}
    runs, failed = data.get("runs", {}), data.get("failed", {})
    if entry is not None:
        runs[key] = entry
        failed.pop(key, None)
    if failure is not None:
        failed[key] = failure
    header = {
        **header,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_update": [round(x, 2) for x in os.getloadavg()],
    }
    data = {"header": header, "runs": dict(sorted(runs.items())), "failed": failed}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the committed file private
    os.replace(tmp, out)


def run_one(args: argparse.Namespace, method: str, seed: int, split: Split) -> dict[str, Any]:
    """Run one method on one split (unless its eval JSON exists), score it, return the entry."""
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    stem = f"{method}_{split.name}"  # the harness's output name
    h5ad, run_json = work / f"{stem}.h5ad", work / f"{stem}.run.json"
    eval_json, log_path = work / f"{stem}.eval.json", work / f"{stem}.log"
    if not eval_json.exists():
        if not run_json.exists():
            cmd = [str(args.peer_python), "run_peers.py", method, "--seed", str(seed)]
            cmd += ["--ref", ",".join(split.reference), "--query", ",".join(split.query)]
            cmd += ["--out", str(work)]
            if split.drop:
                cmd += ["--drop", ",".join(split.drop)]
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            with log_path.open("w") as log:
                done = subprocess.run(
                    cmd,
                    cwd=args.harness,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                    timeout=args.timeout,
                )
            if done.returncode != 0 or not run_json.exists():
                tail = log_path.read_text()[-1500:]
                raise RuntimeError(f"run_peers.py exit {done.returncode}: {tail}")
        robustness.score(h5ad, args.eval_python, args.harness)
    ev, run = json.loads(eval_json.read_text()), json.loads(run_json.read_text())
    return _record(split, method, seed, ev, run, known_called_unknown(h5ad))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON)
    ap.add_argument("--eval-python", type=Path, default=DEFAULT_EVAL_PYTHON)
    ap.add_argument("--harness", type=Path, default=HARNESS, help="the peer harness's folder")
    ap.add_argument("--methods", default=",".join(("scpoli", "scalex", "trvae")))
    ap.add_argument("--seeds", default="0", help="comma list of seeds")
    ap.add_argument("--splits", default="", help="comma list of split names (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/peers_work"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run_peers.py run")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := sorted(set(args.methods) - set(METHODS)):
        ap.error(f"unknown methods {bad}; known: {list(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    splits = {s.name: s for s in suite_splits()}
    names = [n for n in args.splits.split(",") if n] or list(splits)
    if bad := [n for n in names if n not in splits]:
        ap.error(f"not suite splits: {bad}")
    args.split_list = [splits[n] for n in names]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every method × seed × split, merging each finished run into ``--out``."""
    args = parse_args(argv)
    header = {
        "description": "Peer tools on the robustness suite's CellBench splits, scored with the "
        "harness's evaluate.py; runs keyed method/seed/split_name",
        "harness": str(args.harness),
        "harness_pins": harness_pins(args.harness),
        "cpus": os.cpu_count(),
        "omp_wait_policy": "PASSIVE",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    jobs = [(m, s, sp) for m in args.methods for s in args.seeds for sp in args.split_list]
    n_failed = 0
    for i, (method, seed, split) in enumerate(jobs, 1):
        key = f"{method}/{seed}/{split.name}"
        started = time.perf_counter()
        load = os.getloadavg()[0]
        try:
            entry = run_one(args, method, seed, split)
        except Exception as e:  # a failed run is noted, and the sweep goes on
            n_failed += 1
            msg = f"{type(e).__name__}: {e}"
            merge(args.out, key, None, header, failure=msg)
            print(f"[{i}/{len(jobs)}] FAILED {key}: {msg}", flush=True)
            continue
        merge(args.out, key, entry, header)
        e = entry
        print(
            f"[{i}/{len(jobs)}] {method} s{seed} {split.family}/{split.kind} {split.name}: "
            f"overall {_fmt(e['overall'])} acc {_fmt(e['accuracy'])} "
            f"F1 {_fmt(e['f1_macro_true_labels'])} AUROC {_fmt(e['auroc'])} "
            f"known->unknown {_fmt(e['known_called_unknown'], '.1%')} "
            f"ref {e['ref_build_s']:.1f}s map {e['query_map_s']:.1f}s "
            f"(wall {time.perf_counter() - started:.0f}s, load {load:.2f})",
            flush=True,
        )
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
