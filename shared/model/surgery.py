"""Architecture surgery on a release's network, and the proof that it left the release intact."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedatlas.shared.hashing import bit_identical
from fedatlas.shared.model.nn.vae import TABLE_SUFFIX, CondVAE
from fedatlas.shared.model.release import Release


def operate(
    release: Release, n_new_conditions: int, initial: Mapping[str, Tensor] | None = None
) -> CondVAE:
    """The release's frozen network with trainable rows for ``n_new_conditions`` conditions
    (starting from ``initial`` rows per table where given)."""
    model = release.build_model()
    if n_new_conditions:
        model.add_conditions(n_new_conditions, initial)
    return model


def moved_tensors(release: Release, model: CondVAE) -> list[str]:
    """Names (sorted) of release tensors that are no longer bit-identical in ``model``.

    Trunk tensors are compared whole; condition tables on the release's rows (rows appended for
    new conditions are the site's own).
    """
    current = model.export_tensors()
    moved = []
    for name, original in release.model_tensors().items():
        now = current.get(name)
        if now is None:
            moved.append(name)
            continue
        if name.endswith(TABLE_SUFFIX):
            now = now[: original.shape[0]]
        if not bit_identical(original, now):
            moved.append(name)
    return sorted(moved)


def assert_frozen(release: Release, model: CondVAE) -> None:
    """Raise RuntimeError if any release tensor moved (a bug, never a user error)."""
    moved = moved_tensors(release, model)
    if moved:
        raise RuntimeError(f"frozen release tensors changed during mapping: {', '.join(moved)}")
