"""deploy/: the systemd units (parsed, their command lines run through the real argument parser,
``systemd-analyze verify`` where it exists) and deploy/bootstrap run for real."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from conftest import skip_unless_ci
from processes import free_port, start_fedatlas, start_superlink, wait_for_text

from fedatlas.cli import build_parser, main
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.wire.signing import fingerprint, load_node_public_key, load_public_key

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = DEPLOY / "systemd"
ENV = DEPLOY / "env"
BOOTSTRAP = DEPLOY / "bootstrap"
INSTANCE = "hospital-a"
SPECIFIERS = {"%i": INSTANCE, "%S": "/var/lib", "%C": "/var/cache", "%%": "%"}
# unit file -> (fedatlas command it runs, example settings it reads, the file's EnvironmentFile)
SERVICES = {
    "fedatlas-coordinator.service": (
        ("coordinator", "serve"), "coordinator.env.example", "/etc/fedatlas/coordinator.env"
    ),
    "fedatlas-superlink.service": (
        ("coordinator", "superlink"), "coordinator.env.example", "/etc/fedatlas/coordinator.env"
    ),
    "fedatlas-supernode@.service": (
        ("site", "node"), "supernode.env.example", "/etc/fedatlas/supernode-%i.env"
    ),
}  # fmt: skip
REQUIRED: dict[str, dict[str, str | None]] = {
    "Unit": {"Description": None, "After": None, "StartLimitIntervalSec": None,
             "StartLimitBurst": None},
    "Service": {
        "Type": "exec", "User": "fedatlas", "Group": "fedatlas", "ExecStart": None,
        "Restart": "on-failure", "RestartSec": None, "KillMode": "control-group",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
        "ReadWritePaths": None, "StateDirectory": None,
    },
    "Install": {"WantedBy": "multi-user.target"},
}  # fmt: skip


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE"
        assert current is not None, f"{path.name}:{number}: a key outside any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile (KEY=VALUE lines, # comments)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def specifiers(text: str) -> str:
    """The unit specifiers used here, expanded as systemd does for a system unit."""
    return re.sub(r"%[iSC%]", lambda m: SPECIFIERS[m.group(0)], text)


def command_line(exec_start: str, env: dict[str, str]) -> list[str]:
    """ExecStart expanded like systemd: ``${VAR}`` is one word, a lone ``$VAR`` is split at
    whitespace into zero or more words; every variable must be set by the settings file."""
    words: list[str] = []
    for word in shlex.split(specifiers(exec_start)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            assert whole.group(1) in env, f"${whole.group(1)} is not in the settings file"
            words += env[whole.group(1)].split()
            continue
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word):
            assert name in env, f"${{{name}}} is not in the settings file"
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return words


def _inside(path: str, directories: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(d) for d in directories)


# --------------------------------------------------------------------------- units
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_unit_has_the_sections_keys_and_hardening(name: str) -> None:
    unit = parse_unit(UNITS / name)
    for section, keys in REQUIRED.items():
        assert section in unit, f"{name}: no [{section}] section"
        for key, expected in keys.items():
            assert key in unit[section], f"{name}: [{section}] has no {key}="
            if expected is not None:
                assert unit[section][key][-1] == expected, f"{name}: {key}={unit[section][key]}"
    service = unit["Service"]
    assert "network-online.target" in unit["Unit"]["After"][0]
    assert service["EnvironmentFile"] == [SERVICES[name][2]]
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert "MemoryDenyWriteExecute" not in service  # numba compiles code at run time


@pytest.mark.parametrize("name", sorted(SERVICES))
@pytest.mark.parametrize("extras", [False, True], ids=["example", "with-extra-options"])
def test_execstart_is_a_fedatlas_command_the_cli_accepts(name: str, extras: bool) -> None:
    (group, command), example, _ = SERVICES[name]
    env = parse_env(ENV / example)
    if extras:  # the extra options the settings files' comments suggest
        env["FEDATLAS_SERVE_ARGS"] = "--require-client-cert --workers 16"
        env["FEDATLAS_NODE_ARGS"] = f"--out /var/lib/fedatlas/{INSTANCE}/mapped.h5ad --seed 1"
        env["FEDATLAS_LABEL_KEY"] = "cell_type"
    service = parse_unit(UNITS / name)["Service"]
    [exec_start] = service["ExecStart"]
    argv = command_line(exec_start, env)
    executable = PurePosixPath(argv[0])
    assert executable.name == "fedatlas", argv[0]
    assert executable.is_absolute(), argv[0]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed the reason to stderr
        pytest.fail(f"{name}: fedatlas rejects {argv[1:]} (exit {exc.code})")
    assert (args.group, getattr(args, f"{group}_command")) == (group, command)
    # Flower's processes start flower-superexec by bare name: the venv's bin must be on PATH
    environment = dict(specifiers(e).split("=", 1) for e in service["Environment"])
    assert environment["PATH"].split(":")[0] == str(executable.parent)
    # what the service writes lies where it may write
    writable = [specifiers(p) for p in service["ReadWritePaths"]]
    if group == "coordinator":
        assert _inside(args.store.as_posix(), writable), f"store {args.store} not in {writable}"
    else:
        assert args.site_id == INSTANCE
        assert _inside(args.key.parent.as_posix(), writable)  # keys/flower-home is written
        assert _inside(environment["FEDATLAS_HOME"], writable)
        if args.out is not None:
            assert _inside(args.out.as_posix(), writable)


def test_settings_examples_define_exactly_what_the_units_read() -> None:
    for name, (_, example, _) in SERVICES.items():
        exec_start = parse_unit(UNITS / name)["Service"]["ExecStart"][0]
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", exec_start))
        assert used <= set(parse_env(ENV / example)), f"{name} reads undefined settings"
    defined = set(parse_env(ENV / "coordinator.env.example"))
    read = {
        v
        for name in ("fedatlas-coordinator.service", "fedatlas-superlink.service")
        for v in re.findall(r"\$\{?([A-Z_]+)", parse_unit(UNITS / name)["Service"]["ExecStart"][0])
    }
    assert defined == read, f"coordinator.env.example defines unused settings: {defined - read}"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_unless_ci("systemd-analyze is not installed (the units were only parsed)")
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "fedatlas").is_file():
        skip_unless_ci(f"no fedatlas executable beside {sys.executable} to point ExecStart at")
    files = []
    for name in SERVICES:  # ExecStart must exist: point it at this venv's fedatlas
        target = tmp_path / name.replace("@.", f"@{INSTANCE}.")
        target.write_text(
            (UNITS / name).read_text().replace("/opt/fedatlas/venv/bin", str(venv_bin))
        )
        files.append(str(target))
    run = subprocess.run(
        [analyze, "verify", "--man=no", *files], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in run.stderr.splitlines() if any(Path(f).name in line for f in files)]
    assert run.returncode == 0, run.stderr
    assert not ours, run.stderr  # warnings (unknown keys, bad values) count as failures


# --------------------------------------------------------------------------- bootstrap
def bootstrap(*args: str | Path, executable: bool = False) -> subprocess.CompletedProcess[str]:
    """Run deploy/bootstrap with this venv's Python: the fedatlas commands run in its process,
    or (``executable``) as the venv's ``fedatlas`` executable."""
    fedatlas = ["--fedatlas", str(Path(sys.executable).parent / "fedatlas")] if executable else []
    return subprocess.run(
        [sys.executable, str(BOOTSTRAP), *map(str, args), *fedatlas],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip


def tree(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file and directory under ``root``: content hash, mtime and mode."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (content, info.st_mtime_ns, info.st_mode)
    return state


def site_list(store: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    """``fedatlas admin site list --json`` (run in this process)."""
    capsys.readouterr()
    assert main(["admin", "site", "list", "--store", str(store), "--json"]) == 0
    sites: list[dict[str, object]] = json.loads(capsys.readouterr().out)["sites"]
    return sites


def test_bootstrap_makes_a_store_and_hand_over_folders_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, handover = tmp_path / "srv" / "store", tmp_path / "handover"
    made = bootstrap("--store", store, "--host", "coordinator.example.org", "--site", "hospital-a",
                     "--site", "hospital-b", "--handover", handover, "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    listed = site_list(store, capsys)
    assert {s["site_id"]: s["status"] for s in listed} == {
        "hospital-a": "enrolled",
        "hospital-b": "enrolled",
    }
    with SQLiteStore.open(store / "registry.sqlite") as db:
        node_keys = {s.site_id: s.node_public_key for s in db.list_sites()}
    for site in ("hospital-a", "hospital-b"):
        folder = handover / site
        keys = folder / "keys"
        for private in ("site.key", "flower_node.key"):
            assert stat.S_IMODE((keys / private).stat().st_mode) == 0o600
        key_id = fingerprint(load_public_key(keys / "site.pub"))
        assert {s["site_id"]: s["key_fingerprint"] for s in listed}[site] == key_id
        assert node_keys[site] == load_node_public_key(keys / "flower_node.pub")
        assert (folder / "ca.pem").read_bytes() == (store / "ca.pem").read_bytes()
        assert (folder / "coordinator.pub").read_bytes() == (store / "coordinator.pub").read_bytes()
        settings = parse_env(folder / "supernode.env")
        assert set(settings) == set(parse_env(ENV / "supernode.env.example"))
        assert settings["FEDATLAS_SUPERLINK"] == "coordinator.example.org:9092"
        assert f"fedatlas-supernode@{site}" in (folder / "README.txt").read_text()
    assert {s["site_id"] for s in result["sites"]} == {"hospital-a", "hospital-b"}
    coordinator_env = parse_env(handover / "coordinator.env")
    assert coordinator_env["FEDATLAS_STORE"] == str(store.resolve())
    assert coordinator_env["FEDATLAS_SUPERLINK_ADDRESS"] == "0.0.0.0:9092"  # the sites' port
    assert coordinator_env["FEDATLAS_SUPERLINK_CONTROL_PORT"] == "9093"
    assert set(coordinator_env) == set(parse_env(ENV / "coordinator.env.example"))
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "coordinator.key").stat().st_mode) == 0o600

    # a second run refuses and changes nothing, whether the store or a site folder exists
    before = tree(tmp_path)
    again = bootstrap("--store", store, "--host", "coordinator.example.org", "--site",
                      "hospital-a", "--handover", handover)  # fmt: skip
    assert again.returncode == 2
    assert "already exists; refusing to overwrite" in again.stderr
    other = bootstrap("--store", tmp_path / "other", "--host", "h", "--site", "hospital-b",
                      "--handover", handover)  # fmt: skip
    assert other.returncode == 2
    assert "hospital-b, coordinator.env, deployment.json already exist; refusing" in other.stderr
    assert tree(tmp_path) == before

    # more sites join the existing store; ids are never reused
    added = bootstrap("--store", store, "--add-sites", "--site", "hospital-c", "--handover",
                      handover)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert (handover / "hospital-c" / "keys" / "site.key").is_file()
    sites = site_list(store, capsys)
    assert [s["site_id"] for s in sites] == ["hospital-a", "hospital-b", "hospital-c"]
    reused = bootstrap("--store", store, "--add-sites", "--site", "hospital-c", "--handover",
                       tmp_path / "elsewhere")  # fmt: skip
    assert reused.returncode == 2
    assert "never reused" in reused.stderr


def test_a_failed_bootstrap_leaves_nothing_behind(tmp_path: Path) -> None:
    broken = tmp_path / "broken-keys"
    broken.mkdir()
    (broken / "site.pub").write_text("not a key\n")
    failed = bootstrap("--store", tmp_path / "srv" / "store", "--host", "h", "--site", "ok",
                       "--site-key", f"bad={broken}",
                       "--handover", tmp_path / "handover")  # fmt: skip
    assert failed.returncode == 2
    assert "`fedatlas admin site enroll" in failed.stderr
    assert f"{broken}/site.pub" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-keys"]

    for args, message in (
        (["--site", "a/b", "--handover", tmp_path / "h"], "site id 'a/b'"),
        (["--site", "a", "--site", "a", "--handover", tmp_path / "h"], "given twice"),
        (["--site", "a"], "--handover"),
        (["--release", tmp_path], "not a release directory"),
    ):
        refused = bootstrap("--store", tmp_path / "s", "--host", "h", *args)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-keys"]


def test_bootstrap_replace_moves_the_old_store_aside(tmp_path: Path) -> None:
    store = tmp_path / "lib" / "store"
    unknown = bootstrap("--store", store, "--host", "h", "--owner", "no-such-user-fedatlas")
    assert unknown.returncode == 2
    assert "--owner no-such-user-fedatlas: no such user or group" in unknown.stderr
    assert not (tmp_path / "lib").exists()
    user = pwd.getpwuid(os.getuid()).pw_name
    owner = ["--owner", user] if _group_exists(user) else []  # the new parent directory too
    made = bootstrap("--store", store, "--host", "h", *owner)
    assert made.returncode == 0, made.stderr
    assert store.stat().st_uid == (tmp_path / "lib").stat().st_uid == os.getuid()
    old_key = (store / "coordinator.pub").read_bytes()
    # the fedatlas commands as child processes of the venv's executable this time
    replaced = bootstrap("--store", store, "--host", "h", "--replace", "--json", executable=True)
    assert replaced.returncode == 0, replaced.stderr
    [aside] = json.loads(replaced.stdout)["replaced"]
    assert Path(aside).parent == store.parent
    assert Path(aside).name.startswith("store.replaced-")
    assert (Path(aside) / "coordinator.pub").read_bytes() == old_key
    assert (store / "coordinator.pub").read_bytes() != old_key


def test_superlink_on_every_interface_accepts_an_enrolled_sites_supernode(
    tmp_path: Path,
) -> None:
    """What the units run, without systemd: the Fleet proxy bound to 0.0.0.0 as the settings
    example has it, the SuperLink itself on loopback (which every store's certificate names),
    the enrolled site's node key registered, and that site's SuperNode logging in through the
    proxy with its keys from `site keygen`; both stop cleanly on SIGTERM."""
    store, keys = tmp_path / "store", tmp_path / "keys"
    assert main(["-q", "admin", "init", "--store", str(store), "--host", "coord.example"]) == 0
    assert main(["-q", "site", "keygen", "--out", str(keys)]) == 0
    assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", INSTANCE,
                 "--public-key", str(keys / "site.pub")]) == 0  # fmt: skip
    port = free_port()
    link_log, node_log = tmp_path / "superlink.log", tmp_path / "supernode.log"
    link = start_superlink(store, f"0.0.0.0:{port}", link_log)
    node = None
    try:
        wait_for_text(link_log, f"superlink on 0.0.0.0:{port}", link, timeout=120)
        assert INSTANCE in json.loads((store / "flower" / "nodes.json").read_text())["registered"]
        node = start_fedatlas(
            ["site", "node", "--superlink", f"127.0.0.1:{port}", "--ca", str(store / "ca.pem"),
             "--site-id", INSTANCE, "--key", str(keys / "site.key"),
             "--data", str(tmp_path / "cells.h5ad"), "--batch-key", "batch",
             "--coordinator-key", str(store / "coordinator.pub"),
             "--known-coordinators", str(tmp_path / "known.json"), "--port", str(free_port())],
            node_log,
        )  # fmt: skip
        wait_for_text(node_log, "SuperNode ID:", node, timeout=120)  # authenticated
    finally:
        statuses = []
        for process in (node, link):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                statuses.append(process.wait(timeout=60))
    assert statuses == [0, 0], link_log.read_text() + node_log.read_text()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
