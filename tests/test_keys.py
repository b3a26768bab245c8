"""Site keys: bundle-signing and Flower node keys, their files, and how enrolment uses them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedatlas.cli import main
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.wire.signing import (
    KeyFileError,
    check_node_private_key,
    load_node_public_key,
    load_public_key,
    load_signing_key,
    public_bytes,
    sign,
    verify_signature,
)


def test_keygen_writes_a_signing_key_and_a_flower_node_key(tmp_path: Path) -> None:
    assert main(["-q", "site", "keygen", "--out", str(tmp_path / "keys")]) == 0
    keys = tmp_path / "keys"
    for private in ("site.key", "flower_node.key"):
        assert stat.S_IMODE((keys / private).stat().st_mode) == 0o600
    signing = load_signing_key(keys / "site.key")
    assert load_public_key(keys / "site.pub") == public_bytes(signing)
    signature = sign(signing, b"statement")
    assert verify_signature(public_bytes(signing), b"statement", signature)
    assert not verify_signature(public_bytes(signing), b"statement!", signature)
    # the node key is what Flower's SuperNode authentication reads: EC P-384, OpenSSH format
    node = serialization.load_ssh_private_key((keys / "flower_node.key").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey)
    assert node.curve.name == "secp384r1"
    assert load_node_public_key(keys / "flower_node.pub").startswith("ecdsa-sha2-nistp384 ")
    assert main(["-q", "site", "keygen", "--out", str(keys)]) == 2  # never replaced silently


def test_unusable_key_files_are_refused(tmp_path: Path) -> None:
    assert main(["-q", "site", "keygen", "--out", str(tmp_path)]) == 0
    os.chmod(tmp_path / "site.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(tmp_path / "site.key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(tmp_path / "flower_node.pub")  # an OpenSSH line, not a PEM Ed25519 key
    with pytest.raises(KeyFileError, match="EC P-384"):
        load_node_public_key(_ed25519_openssh(tmp_path))
    with pytest.raises(KeyFileError, match="no such"):
        load_public_key(tmp_path / "absent.pub")
    check_node_private_key(tmp_path / "flower_node.key")
    os.chmod(tmp_path / "flower_node.key", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        check_node_private_key(tmp_path / "flower_node.key")
    # `site node` refuses before it starts anything
    args = ["site", "node", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"),
            "--site-id", "h1", "--key", str(tmp_path / "site.key"), "--data", "x.h5ad",
            "--batch-key", "batch"]  # fmt: skip
    os.chmod(tmp_path / "site.key", 0o600)
    assert main(args) == 2
    with pytest.raises(KeyFileError, match="not an OpenSSH private key"):
        check_node_private_key(tmp_path / "site.key")  # an Ed25519 PEM key, not an OpenSSH one


def _ed25519_openssh(directory: Path) -> Path:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = directory / "wrong_node.pub"
    path.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path


def test_enrolment_records_both_keys(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    for site in ("h1", "h2"):
        assert main(["-q", "site", "keygen", "--out", str(tmp_path / site)]) == 0
    (tmp_path / "h2" / "flower_node.pub").unlink()
    for site in ("h1", "h2"):
        assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", site,
                     "--public-key", str(tmp_path / site / "site.pub")]) == 0  # fmt: skip
    refused = ["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", "h3",
               "--public-key", str(tmp_path / "h1" / "site.pub"),
               "--node-public-key", str(tmp_path / "missing.pub")]  # fmt: skip
    assert main(refused) == 2
    with SQLiteStore.open(store / "registry.sqlite") as db:
        h1, h2 = db.get_site("h1"), db.get_site("h2")
        assert h1 is not None
        assert h2 is not None
        assert h1.node_public_key == load_node_public_key(tmp_path / "h1" / "flower_node.pub")
        assert h2.node_public_key == ""
        assert db.get_site("h3") is None
        assert db.verify_audit() == []
