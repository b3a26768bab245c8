"""The sites file of a simulated campaign and how a simulated ClientApp finds its site."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.runtime.virtual_sites import read_sites_file, virtual_site, write_federation
from fedatlas.site_client.campaign import site_settings


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
    sites = read_sites_file(_sites_file(tmp_path, [_entry("a"), _entry("b")]))
    write_federation(tmp_path / "federation.json", sites)
    context = SimpleNamespace(
        node_config={"partition-id": 1, "num-partitions": 2},
        run_config={"simulation-sites": str(tmp_path / "federation.json")},
    )
    assert site_settings(context)["site-id"] == "b"
    with pytest.raises(ConfigError, match="no virtual site for partition 2"):
        virtual_site(tmp_path / "federation.json", 2)


def test_a_real_supernodes_own_configuration_wins(tmp_path: Path) -> None:
    context = SimpleNamespace(
        node_config={"site-id": "h1", "partition-id": 0},
        run_config={"simulation-sites": str(tmp_path / "absent.json")},
    )
    assert site_settings(context)["site-id"] == "h1"
    with pytest.raises(ValueError, match="no site configuration"):
        site_settings(SimpleNamespace(node_config={}, run_config={"simulation-sites": ""}))
