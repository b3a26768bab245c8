"""Keys and signatures: Ed25519 for bundles and composites, and a site's Flower node key.

Private keys are PKCS#8 PEM files readable only by their owner (mode 0600; looser files are
refused, as ssh does); public keys are SubjectPublicKeyInfo PEM files. On the wire a public key
is its raw 32 bytes. A site's Flower SuperNode authenticates with its own key pair, EC P-384 in
OpenSSH format (what Flower's SuperNode authentication expects), kept beside the signing key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedatlas.shared.errors import FedatlasError

PUBLIC_KEY_BYTES = 32
NODE_KEY_STEM = "flower_node"  # KEYDIR/flower_node.key and .pub beside KEYDIR/site.key
NODE_KEY_TYPE = "ecdsa-sha2-nistp384"


class KeyFileError(FedatlasError):
    """A key file is missing, unreadable, of the wrong kind or too widely readable."""


@dataclass(frozen=True)
class KeyPair:
    """Where a key pair was written."""

    private: Path
    public: Path


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_keypair(directory: Path, stem: str, *, overwrite: bool = False) -> KeyPair:
    """Generate an Ed25519 key pair as ``DIRECTORY/STEM.key`` (0600) and ``STEM.pub``."""
    pair = KeyPair(directory / f"{stem}.key", directory / f"{stem}.pub")
    for path in (pair.private, pair.public):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path}: already exists; refusing to replace a key")
    key = Ed25519PrivateKey.generate()
    write_private_file(
        pair.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    pair.public.write_bytes(public_pem(public_bytes(key)))
    return pair


def write_node_keypair(directory: Path, *, overwrite: bool = False) -> KeyPair:
    """Generate a site's Flower node key pair (EC P-384, OpenSSH format) in ``directory``."""
    pair = KeyPair(directory / f"{NODE_KEY_STEM}.key", directory / f"{NODE_KEY_STEM}.pub")
    for path in (pair.private, pair.public):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path}: already exists; refusing to replace a key")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(
        pair.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pair.public.write_bytes(public + b"\n")
    return pair


def load_node_public_key(path: Path) -> str:
    """A Flower node public key (one ``ecdsa-sha2-nistp384 ...`` OpenSSH line), validated."""
    text = _read(path, "node public key").decode("ascii", errors="replace").strip()
    try:
        key = serialization.load_ssh_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeyFileError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise KeyFileError(f"{path}: a {NODE_KEY_TYPE} (EC P-384) key is expected")
    return text


def _refuse_shared(path: Path) -> None:
    """Refuse a private key file that group or others may read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )


def check_node_private_key(path: Path) -> None:
    """Check a site's Flower node key (as ``flower-supernode`` will read it): present, readable
    by its owner only, and an EC P-384 private key in OpenSSH format."""
    data = _read(path, "node private key")
    _refuse_shared(path)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise KeyFileError(f"{path}: an EC P-384 node key is expected")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key, refusing files that group or others may read."""
    data = _read(path, "private key")
    _refuse_shared(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: an Ed25519 private key is expected")
    return key


def load_public_key(path: Path) -> bytes:
    """Raw 32-byte Ed25519 public key from a PEM file."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: an Ed25519 public key is expected")
    return public_bytes(key)


def public_pem(public_key: bytes) -> bytes:
    """A raw Ed25519 public key as the PEM file :func:`load_public_key` reads."""
    return Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw public key bytes of a private or public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature of ``message``."""
    return key.sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(public_key: bytes) -> str:
    """Short, readable identity of a public key: ``ed25519:`` + 16 hex digits of its SHA-256."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what} ({exc.strerror})") from None
