"""Per-condition tables: the only tensors a site ever trains.

Every condition-specific tensor of the network (one-hot columns, embedding rows, DSBN scale,
shift and statistics, per-condition dispersion) is a :class:`ConditionTable` whose axis 0 is the
condition. Rows of conditions a release already knows are stored as frozen buffers; rows added
for new conditions live in a separate tensor. Freezing is therefore structural: the optimiser
is never handed a frozen row, so weight decay or momentum cannot move it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConditionTable(nn.Module):
    """Rows indexed by condition: frozen rows (known conditions) followed by fresh rows.

    Args:
        row_shape: shape of one condition's row.
        n_rows: number of fresh rows to create.
        init: ``"normal"`` (std 0.1, small random), ``"zeros"`` or ``"ones"``.
        learnable: fresh rows are parameters (trained) rather than buffers (estimated statistics).
    """

    def __init__(
        self, row_shape: tuple[int, ...], n_rows: int, init: str = "normal", learnable: bool = True
    ) -> None:
        super().__init__()
        self.row_shape = row_shape
        self.init = init
        self.learnable = learnable
        self.register_buffer("frozen", torch.zeros(0, *row_shape))
        self.fresh: Tensor
        self._set_fresh(self._initial_rows(n_rows))
        # per-cell copies of the looked-up rows, set while DP-SGD takes per-cell gradients
        self.per_cell: Tensor | None = None

    @property
    def n_rows(self) -> int:
        """Number of conditions (frozen + fresh)."""
        return int(self.frozen.shape[0] + self.fresh.shape[0])

    @property
    def n_frozen(self) -> int:
        """Number of frozen rows."""
        return int(self.frozen.shape[0])

    def table(self) -> Tensor:
        """The full table, frozen rows first."""
        if self.fresh.shape[0] == 0:
            return self.frozen
        if self.frozen.shape[0] == 0:
            return self.fresh
        return torch.cat([self.frozen, self.fresh], dim=0)

    def forward(self, index: Tensor) -> Tensor:
        """Rows for a vector of condition indices (the per-cell copies while they are set)."""
        if self.per_cell is not None:
            if self.per_cell.shape[0] != index.shape[0]:
                raise RuntimeError("per-cell rows were set for another minibatch")
            return self.per_cell
        return self.table()[index]

    def freeze(self) -> None:
        """Make every row frozen (what publishing a release does)."""
        self.frozen = self.table().detach().clone()
        self._set_fresh(self._initial_rows(0))

    def add_rows(self, n_rows: int, init_rows: Tensor | None = None) -> None:
        """Append ``n_rows`` fresh rows for new conditions (architecture surgery)."""
        if self.fresh.shape[0]:
            raise RuntimeError("freeze() the table before adding rows for new conditions")
        rows = self._initial_rows(n_rows) if init_rows is None else init_rows.detach().clone()
        self._set_fresh(rows)

    def load_table(self, table: Tensor) -> None:
        """Replace all rows with ``table`` (all frozen)."""
        if tuple(table.shape[1:]) != self.row_shape:
            raise ValueError(f"row shape {tuple(table.shape[1:])} != {self.row_shape}")
        self.frozen = table.detach().clone().to(torch.float32)
        self._set_fresh(self._initial_rows(0))

    def set_fresh(self, rows: Tensor) -> None:
        """Overwrite the fresh rows (e.g. statistics estimated in a pass over the data)."""
        if rows.shape != self.fresh.shape:
            raise ValueError(f"fresh rows must have shape {tuple(self.fresh.shape)}")
        with torch.no_grad():
            self.fresh.copy_(rows)

    def _initial_rows(self, n_rows: int) -> Tensor:
        shape = (n_rows, *self.row_shape)
        if self.init == "zeros":
            return torch.zeros(shape)
        if self.init == "ones":
            return torch.ones(shape)
        return torch.randn(shape) * 0.1

    def _set_fresh(self, rows: Tensor) -> None:
        if "fresh" in self._parameters:
            del self._parameters["fresh"]
        if "fresh" in self._buffers:
            del self._buffers["fresh"]
        if self.learnable:
            self.fresh = nn.Parameter(rows)
        else:
            self.register_buffer("fresh", rows)
