"""Which coordinator signing keys a site trusts, and the one check of a received composite.

Keys are pinned on first contact, like ssh host keys: pins live in
``$FEDATLAS_HOME/known_coordinators.json`` (``~/.fedatlas`` by default), keyed by the
coordinator's address. A key given explicitly (``--coordinator-key``) is pinned too. Every
composite a site uses, pulled over gRPC or received in a Flower campaign or federated build,
passes :func:`accept`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path

from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.composite import SignedComposite
from fedatlas.shared.wire.signing import fingerprint

log = logging.getLogger(__name__)

KNOWN_FILE = "known_coordinators.json"


class TrustError(FedatlasError):
    """A coordinator's key differs from the one this site trusts."""


def default_known_file() -> Path:
    """``$FEDATLAS_HOME/known_coordinators.json`` (``~/.fedatlas`` when unset)."""
    home = Path(os.environ.get("FEDATLAS_HOME", Path.home() / ".fedatlas"))
    return home / KNOWN_FILE


def trusted_key(
    address: str, offered: bytes, *, known_file: Path, explicit: bytes | None = None
) -> bytes:
    """The key to verify ``address``'s composites with; pins ``offered`` on first contact.

    Raises TrustError when ``offered`` differs from the explicit or pinned key.
    """
    known = _read(known_file)
    pinned = bytes.fromhex(known[address]["key"]) if address in known else None
    expected = explicit if explicit is not None else pinned
    if expected is not None and offered != expected:
        source = "--coordinator-key" if explicit is not None else f"the key pinned in {known_file}"
        raise TrustError(
            f"coordinator {address} signs with key {fingerprint(offered)}, but {source} is "
            f"{fingerprint(expected)}; refusing its composite. If the operator really rotated "
            f"the key, remove the entry for {address} from {known_file} (or pass the new key "
            "with --coordinator-key)"
        )
    if pinned != offered:
        known[address] = {
            "key": offered.hex(),
            "fingerprint": fingerprint(offered),
            "pinned_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        _write(known_file, known)
        log.info("pinned coordinator %s key %s in %s", address, fingerprint(offered), known_file)
    return offered


def accept(
    composite: SignedComposite, address: str, *, known_file: Path, explicit: bytes | None = None
) -> Release:
    """The composite's release, once its signature is checked against the key this site trusts
    for ``address`` (``explicit``, else the pinned key, else the offered one, then pinned)."""
    key = trusted_key(
        address, composite.statement.coordinator_key, known_file=known_file, explicit=explicit
    )
    return composite.verify(key, source=f"composite from {address}")


def _read(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrustError(f"{path}: cannot read the pinned coordinator keys ({exc})") from None
    if not isinstance(data, dict):
        raise TrustError(f"{path}: not a pinned-keys file")
    return data


def _write(path: Path, data: dict[str, dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
