"""Architecture surgery: a network split into its frozen trunk and its condition tables.

Every tensor of a :class:`~fedatlas.shared.model.nn.vae.CondVAE` is either part of the *trunk*
(encoder, decoder and their statistics: trained once, when the reference is built, and frozen
ever after) or a *condition table* (axis 0 = condition: embedding rows, one-hot columns, DSBN
branches, per-condition dispersions), named ``MODULE.table``. That split is the system's central
invariant: a site trains only new rows of the tables, a federated build averages only the trunk,
adaptors carry only rows, and composing adaptors appends rows. This module is the one place that
names the split (:func:`is_condition_table`) and operates on it:

* naming: :func:`export_tensors` / :func:`load_tensors`, :func:`split`, :func:`trunk_of` and
  :func:`load_trunk`;
* surgery: :func:`operate` adds trainable rows for new conditions to a release's frozen network,
  :func:`new_rows` cuts them out again (the adaptor), :func:`append_rows` composes rows onto a
  release's tables;
* the proof: :func:`moved_tensors` / :func:`assert_frozen` check that the release survived.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedatlas.shared.hashing import bit_identical
from fedatlas.shared.model.nn.vae import CondVAE

if TYPE_CHECKING:  # the release builds its network with load_tensors below
    from fedatlas.shared.model.release import Release

TABLE_SUFFIX = ".table"

Tensors = dict[str, Tensor]


def is_condition_table(name: str) -> bool:
    """True for the name of a condition table (rows per condition), False for a trunk tensor."""
    return name.endswith(TABLE_SUFFIX)


def split(tensors: Mapping[str, Tensor]) -> tuple[Tensors, Tensors]:
    """``tensors`` divided into (trunk, condition tables)."""
    trunk = {k: v for k, v in tensors.items() if not is_condition_table(k)}
    tables = {k: v for k, v in tensors.items() if is_condition_table(k)}
    return trunk, tables


# ------------------------------------------------------------------------------------ naming
def export_tensors(model: CondVAE) -> Tensors:
    """Every tensor of ``model`` by stable name: its trunk state, then each condition table
    (frozen and fresh rows together) as ``MODULE.table``."""
    tables = model.condition_tables()
    out: Tensors = {}
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in tables:
            out[key] = value.detach().clone().contiguous()
    for name, table in tables.items():
        out[name + TABLE_SUFFIX] = table.table().detach().clone().contiguous()
    return out


def load_tensors(model: CondVAE, tensors: Mapping[str, Tensor]) -> None:
    """Load tensors named as by :func:`export_tensors`; every table row becomes frozen.

    A table may hold any number of rows (conditions). Raises ValueError naming any missing,
    unexpected or mis-shaped tensor.
    """
    expected = export_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensor names differ: missing {missing}, unexpected {unexpected}")
    for name, ref in expected.items():
        got = tensors[name]
        if is_condition_table(name):
            if tuple(got.shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(
                    f"{name}: rows of shape {tuple(got.shape[1:])}, expected {tuple(ref.shape[1:])}"
                )
        elif tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise ValueError(
                f"{name}: {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
    trunk, tables = split(tensors)
    for name, table in model.condition_tables().items():
        table.load_table(tables[name + TABLE_SUFFIX])
    model.load_state_dict(trunk, strict=False)


def trunk_of(model: CondVAE) -> Tensors:
    """The shared part of ``model``: every exported tensor except the condition tables."""
    return split(export_tensors(model))[0]


def load_trunk(model: CondVAE, trunk: Mapping[str, Tensor]) -> None:
    """Overwrite ``model``'s trunk in place (its condition tables untouched); ValueError when
    ``trunk`` has other tensor names or shapes."""
    state = model.state_dict()
    expected = set(trunk_of(model))
    if set(trunk) != expected:
        raise ValueError(
            f"trunk tensors differ: missing {sorted(expected - set(trunk))}, "
            f"unexpected {sorted(set(trunk) - expected)}"
        )
    with torch.no_grad():
        for name, value in trunk.items():
            if state[name].shape != value.shape:
                raise ValueError(
                    f"trunk tensor {name}: shape {tuple(value.shape)} expected "
                    f"{tuple(state[name].shape)}"
                )
            state[name].copy_(value)


# ----------------------------------------------------------------------------------- surgery
def add_conditions(model: CondVAE, n_new: int, initial: Mapping[str, Tensor] | None = None) -> None:
    """Append ``n_new`` trainable rows to every condition table of a frozen ``model``.

    New rows start from ``initial[MODULE]`` where given (rows a site kept, e.g. from federated
    training), else at the mean of the known rows (an "average known condition"); tables with
    neither keep their default initialisation.
    """
    initial = initial or {}
    for name, table in model.condition_tables().items():
        init = initial.get(name)
        if init is not None and tuple(init.shape) != (n_new, *table.row_shape):
            raise ValueError(
                f"initial rows of {name} have shape {tuple(init.shape)}, "
                f"expected {(n_new, *table.row_shape)}"
            )
        if init is None and table.n_frozen:
            init = table.frozen.mean(dim=0, keepdim=True).expand(n_new, *table.row_shape)
        table.add_rows(n_new, init)


def operate(
    release: Release, n_new_conditions: int, initial: Mapping[str, Tensor] | None = None
) -> CondVAE:
    """The release's frozen network with trainable rows for ``n_new_conditions`` conditions
    (starting from ``initial`` rows per table where given)."""
    model = release.build_model()
    if n_new_conditions:
        add_conditions(model, n_new_conditions, initial)
    return model


def new_rows(model: CondVAE, n_known: int) -> Tensors:
    """The rows of the conditions after the first ``n_known`` of every table (a site's own
    conditions after surgery), by table name (``MODULE.table``)."""
    return {
        name + TABLE_SUFFIX: table.table().detach()[n_known:].clone().contiguous()
        for name, table in model.condition_tables().items()
    }


def append_rows(tables: Mapping[str, Tensor], rows: Sequence[Mapping[str, Tensor]]) -> Tensors:
    """``tables`` with every mapping of ``rows`` (one row block per table name) appended in
    order; each block must fit its table's row shape and dtype."""
    out: Tensors = {}
    for name, base in tables.items():
        blocks = [base]
        for block in rows:
            part = block[name]
            if tuple(part.shape[1:]) != tuple(base.shape[1:]) or part.dtype != base.dtype:
                raise ValueError(
                    f"rows of {name}: {part.dtype} {tuple(part.shape)}, expected {base.dtype} "
                    f"rows of shape {tuple(base.shape[1:])}"
                )
            blocks.append(part)
        out[name] = torch.cat(blocks, dim=0).contiguous()
    return out


# ------------------------------------------------------------------------------------ proof
def moved_tensors(release: Release, model: CondVAE) -> list[str]:
    """Names (sorted) of release tensors that are no longer bit-identical in ``model``.

    Trunk tensors are compared whole; condition tables on the release's rows (rows appended for
    new conditions are the site's own).
    """
    current = export_tensors(model)
    moved = []
    for name, original in release.model_tensors().items():
        now = current.get(name)
        if now is None:
            moved.append(name)
            continue
        if is_condition_table(name):
            now = now[: original.shape[0]]
        if not bit_identical(original, now):
            moved.append(name)
    return sorted(moved)


def assert_frozen(release: Release, model: CondVAE) -> None:
    """Raise RuntimeError if any release tensor moved (a bug, never a user error)."""
    moved = moved_tensors(release, model)
    if moved:
        raise RuntimeError(f"frozen release tensors changed during mapping: {', '.join(moved)}")
