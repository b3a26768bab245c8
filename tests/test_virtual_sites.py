"""The sites file of a simulated campaign and how a simulated ClientApp finds its site."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.runtime.virtual_sites import read_sites_file, virtual_site, write_federation
from fedatlas.site_client.node import NodeSettings


def _sites_file(root: Path, entries: object) -> Path:
    for name in ("a.h5ad", "a.key", "b.h5ad", "b.key"):
        (root / name).write_bytes(b"")
    path = root / "sites.json"
    path.write_text(json.dumps(entries))
    return path


def _entry(site: str, **extra: object) -> dict[str, object]:
    return {"site-id": site, "data": f"{site}.h5ad", "batch-key": "batch", "key": f"{site}.key",
            **extra}  # fmt: skip


def test_sites_are_resolved_against_the_file_and_completed(tmp_path: Path) -> None:
    sites = read_sites_file(_sites_file(tmp_path, [_entry("a"), _entry("b", epochs=3)]))
    assert [s["site-id"] for s in sites] == ["a", "b"]
    assert sites[0]["data"] == str(tmp_path / "a.h5ad")
    assert sites[0]["label-key"] == ""
    assert sites[0]["epochs"] == 0
    assert sites[1]["epochs"] == 3


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty JSON list"),
        ([_entry("a"), _entry("a")], "appears more than once"),
        ([_entry("a", superlink="x")], "unknown fields ['superlink']"),
        ([{"site-id": "a", "data": "a.h5ad"}], "missing ['batch-key', 'key']"),
        ([_entry("a", epochs=-1)], "epochs must be a non-negative integer"),
        ([_entry("a", data="elsewhere.h5ad")], "data file"),
    ],
)
def test_a_bad_sites_file_is_refused_with_the_reason(
    tmp_path: Path, entries: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"sites\.json") as error:
        read_sites_file(_sites_file(tmp_path, entries))
    assert message in str(error.value)


def test_a_partition_plays_its_entry_of_the_federation(tmp_path: Path) -> None:
    sites = read_sites_file(_sites_file(tmp_path, [_entry("a"), _entry("b", **{"chunk-size": 9})]))
    for site in sites:  # what `coordinator simulate` adds to each entry
        site.update({"superlink": "simulation", "known-coordinators": str(tmp_path / "k.json")})
    write_federation(tmp_path / "federation.json", sites)
    context = SimpleNamespace(
        node_config={"partition-id": 1, "num-partitions": 2},
        run_config={"simulation-sites": str(tmp_path / "federation.json")},
    )
    played = NodeSettings.of(context)  # type: ignore[arg-type]
    assert played.site_id == "b"
    assert played.options.chunk_size == 9
    assert played.source.path == tmp_path / "b.h5ad"
    with pytest.raises(ConfigError, match="no virtual site for partition 2"):
        virtual_site(tmp_path / "federation.json", 2)


def test_a_real_supernodes_own_configuration_wins(tmp_path: Path) -> None:
    context = SimpleNamespace(
        node_config={"site-id": "h1", "partition-id": 0},
        run_config={"simulation-sites": str(tmp_path / "absent.json")},
    )
    with pytest.raises(KeyError):  # the node's own configuration is read, not the file
        NodeSettings.of(context)  # type: ignore[arg-type]
    own = {**context.node_config, "data": "d.h5ad", "batch-key": "batch", "key": "site.key",
           "superlink": "coordinator:9092", "known-coordinators": "known.json"}  # fmt: skip
    assert NodeSettings.of(SimpleNamespace(node_config=own, run_config={})).site_id == "h1"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no site configuration"):
        NodeSettings.of(SimpleNamespace(node_config={}, run_config={"simulation-sites": ""}))  # type: ignore[arg-type]
