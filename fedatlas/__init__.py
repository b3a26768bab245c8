"""fedatlas: federated updating of single-cell reference atlases.

The Python API (AnnData in, AnnData out; see :mod:`fedatlas.shared.api`)::

    import fedatlas

    release = fedatlas.build_reference(reference, batch_key="batch", label_key="cell_type")
    mapped = fedatlas.map_cells(query, release, batch_key="batch")

The command line is ``fedatlas`` (:mod:`fedatlas.cli`).
"""

from fedatlas.shared import __version__
from fedatlas.shared.api import (
    Adaptor,
    Release,
    build_reference,
    compose,
    extract_adaptor,
    map_cells,
)
from fedatlas.shared.model.privacy import PrivacySpec

__all__ = [
    "Adaptor",
    "PrivacySpec",
    "Release",
    "__version__",
    "build_reference",
    "compose",
    "extract_adaptor",
    "map_cells",
]
