"""One differentially private mapping: its budget, split among the mechanisms it uses, and the
record of what each spent (the ``privacy`` entry of the adaptor a site sends).

See :mod:`fedatlas.shared.model.privacy` for the accounting and the mechanisms. The split is
fixed when the mapping is planned, from public facts only: which mechanisms the preset and the
site's data need (new conditions, labels, DSBN, trainable rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedatlas.shared.config import TrainConfig
from fedatlas.shared.data.dataset import UNLABELED
from fedatlas.shared.model.dp_sgd import DPSGD, secure_generators
from fedatlas.shared.model.privacy import (
    PROTOTYPE_SENSITIVITY_SQ,
    STATISTICS_SENSITIVITY_SQ,
    LatentBounds,
    PrivacySpec,
    gaussian_sigma,
    privacy_record,
    private_counts,
    private_prototypes,
)
from fedatlas.shared.model.prototypes import PrototypeSet


class PrivateRelease:
    """The budget of one DP mapping and what its mechanisms have spent.

    Args:
        spec: the (epsilon, delta) the bundle may spend.
        n_cells: cells of each new condition (released at once, noisy: :attr:`counts`).
        label_levels: label levels the site gives labels for (0: no prototypes).
        statistics: the preset estimates per-condition normalisation statistics (DSBN).
        training_epochs: DP-SGD epochs (0: the rows are not trained).
        batch_size: DP-SGD's nominal minibatch size.
    """

    def __init__(
        self,
        spec: PrivacySpec,
        n_cells: Sequence[int],
        *,
        label_levels: int,
        statistics: bool,
        training_epochs: int,
        batch_size: int,
    ) -> None:
        self.spec = spec
        used = ["counts"]
        used += ["statistics"] if statistics else []
        used += ["training"] if training_epochs > 0 else []
        used += ["prototypes"] if label_levels > 0 else []
        self.budget = spec.budget(used)
        self.rng = secure_generators()[0]
        self.spent: dict[str, dict[str, Any]] = {}
        sigma = gaussian_sigma(1.0, self.budget["counts"])
        self.counts = private_counts(n_cells, sigma, self.rng)
        self.spent["counts"] = {"rho": self.budget["counts"], "sigma": sigma}
        self.label_levels = label_levels
        self.training_epochs = training_epochs
        self.batch_size = batch_size

    @property
    def noisy_cells(self) -> int:
        """The site's new cells as released (sum of the noisy counts)."""
        return int(sum(self.counts))

    def statistics_noise(self) -> tuple[float, np.random.Generator]:
        """Noise sigma and generator for the DSBN statistics (recorded as spent)."""
        rho = self.budget["statistics"]
        sigma = gaussian_sigma(STATISTICS_SENSITIVITY_SQ, rho)
        self.spent["statistics"] = {"rho": rho, "sigma": sigma}
        return sigma, self.rng

    def dp_sgd(self, train: TrainConfig, max_cells: int | None = None) -> DPSGD:
        """DP-SGD settings for ``train`` (recorded as spent); ``max_cells`` bounds the cells it
        trains on (a streamed file's training sample), so the minibatches per epoch follow
        the smaller of it and the released cell count."""
        if train.epochs != self.training_epochs:
            raise ValueError("the training recipe changed after the budget was split")
        rho = self.budget["training"]
        cells = self.noisy_cells if max_cells is None else min(self.noisy_cells, max_cells)
        dp = DPSGD.for_budget(rho, train.epochs, cells, self.batch_size)
        self.spent["training"] = dp.record(rho, train.epochs)
        return dp

    def prototypes(
        self,
        latent: NDArray[np.float32],
        labels: Sequence[NDArray[np.object_]],
        catalogue: Sequence[PrototypeSet],
        source: str,
        min_cells: int,
    ) -> tuple[list[PrototypeSet], dict[int, dict[str, int]]]:
        """Per label level given, the site's prototypes released with the Gaussian mechanism
        (clipping bounds from the release's ``catalogue`` of that level); the labels withheld
        per level index (nothing without labels)."""
        if not self.label_levels:
            return [], {}
        rho = self.budget["prototypes"] / self.label_levels
        sigma = gaussian_sigma(PROTOTYPE_SENSITIVITY_SQ, rho)
        sets: list[PrototypeSet] = []
        withheld: dict[int, dict[str, int]] = {}
        for i, values in enumerate(labels):
            bounds = LatentBounds.of(catalogue[i], latent.shape[1])
            vocabulary = sorted({str(v) for v in values} - {UNLABELED})
            pset, dropped = private_prototypes(
                latent, values, vocabulary, source, bounds=bounds, sigma=sigma,
                min_cells=min_cells, rng=self.rng,
            )  # fmt: skip
            sets.append(pset)
            if dropped:
                withheld[i] = dropped
        self.spent["prototypes"] = {
            "rho": self.budget["prototypes"], "sigma": sigma, "levels": self.label_levels,
        }  # fmt: skip
        return sets, withheld

    def record(self) -> dict[str, Any]:
        """The bundle's privacy record: what was spent, by mechanism."""
        return privacy_record(self.spec, self.spent)
