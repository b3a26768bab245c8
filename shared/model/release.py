"""Reference releases: a directory with a manifest and pickle-free weights.

Layout::

    RELEASE_DIR/manifest.json        {"content": {...}, "content_hash": "sha256:...",
                                      "provenance": {...}}
    RELEASE_DIR/weights.safetensors  every tensor named in content["tensors"]

``content`` holds everything that defines the release (model configuration, ordered genes,
preprocessing recipe, condition table, label levels, prototype catalogue, per-tensor hashes); its
canonical-JSON hash identifies the release. ``provenance`` (creation time, versions) is
informative and not hashed. Loading verifies every tensor hash and the content hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from numpy.typing import NDArray
from torch import Tensor

from fedatlas.shared.config import ModelConfig, PreprocessingRecipe, TrainConfig
from fedatlas.shared.errors import ConfigError, ReleaseError
from fedatlas.shared.hashing import content_hash, tensor_digest, tensor_index
from fedatlas.shared.model import surgery
from fedatlas.shared.model.artifact import HASH_TEXT, TENSOR_INDEX, Artifact
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.prototypes import PROTOTYPE_META, PrototypeSet
from fedatlas.shared.validation import (
    Bool,
    Int,
    Json,
    ListOf,
    MapOf,
    Nullable,
    Num,
    OneOf,
    Record,
    Str,
    ValidationError,
    check,
    load_json,
)

RELEASE_FORMAT = "fedatlas-release/1"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
MODEL_PREFIX = "model."
LATENT_TENSOR = "reference.latent"
CONDITION_TENSOR = "reference.condition"
EMBEDDING_TABLE = "embedding" + surgery.TABLE_SUFFIX  # condition embeddings (without MODEL_PREFIX)


MAX_MANIFEST_BYTES = 256 << 20  # genes, conditions and label vocabularies of a large atlas
_CONFIG = MapOf(Json(), 64)
_THRESHOLDS = MapOf(OneOf((Num(), MapOf(Num(), 64))), 8)  # by method: one, or by label level
RELEASE_CONTENT = Record(
    {
        "format": Str(64),
        "kind": Str(32),
        "preset": Str(64),
        "model": _CONFIG,
        "preprocessing": _CONFIG,
        "mapping": _CONFIG,
        "genes": ListOf(Str(256), 1_000_000),
        "conditions": ListOf(
            Record({"name": Str(256), "n_cells": Int(0, 2**40)}, optional={"origin": Str(256)}),
            1_000_000,
        ),
        "label_levels": ListOf(Str(256), 32),
        "prototypes": MapOf(PROTOTYPE_META, 32),
        "transfer": Record({"method": Str(32), "unknown_thresholds": _THRESHOLDS}, open=True),
        "trunk_id": HASH_TEXT,
        "tensors": TENSOR_INDEX,
    },
    optional={
        "unlabeled_prototypes": Nullable(PROTOTYPE_META),
        "reference": Record(
            {
                "n_cells": Int(0, 2**40),
                "keeps_latents": Bool(),
                "label_vocab": MapOf(ListOf(Str(256), 1_000_000), 32),
            },
        ),
        "lineage": Record({"base": Nullable(HASH_TEXT), "adaptors": ListOf(HASH_TEXT, 1_000_000)}),
    },
    open=True,  # later formats may add fields (e.g. a federated build's record)
)
MANIFEST = Record(
    {"content": RELEASE_CONTENT, "content_hash": HASH_TEXT},
    optional={"provenance": MapOf(Json(), 64)},
)


def prototype_prefix(level_index: int) -> str:
    """Tensor-name prefix of the prototypes of label level ``level_index``."""
    return f"prototypes.{level_index}"


UNLABELED_PREFIX = "prototypes.unlabeled"
#: The level under which a release without label levels labels cells: its Leiden clusters.
CLUSTER_LEVEL = "cluster"


def transfer_levels(label_levels: Sequence[str]) -> list[str]:
    """The levels cells are labelled at: the label levels, or :data:`CLUSTER_LEVEL` alone for a
    reference without any."""
    return list(label_levels) or [CLUSTER_LEVEL]


def reference_label_tensor(level_index: int) -> str:
    """Tensor name of the reference cells' label indices for level ``level_index``."""
    return f"reference.label.{level_index}"


@dataclass
class Release(Artifact):
    """An in-memory reference release (or composite)."""

    @property
    def trunk_id(self) -> str:
        """Hash of what every adaptor of this release depends on (shared by its composites)."""
        return str(self.content["trunk_id"])

    # ------------------------------------------------------------------ typed views
    @property
    def model_config(self) -> ModelConfig:
        """Network configuration."""
        return ModelConfig.from_dict(self.content["model"])

    @property
    def recipe(self) -> PreprocessingRecipe:
        """Preprocessing recipe every site must apply."""
        return PreprocessingRecipe.from_dict(self.content["preprocessing"])

    @property
    def mapping_defaults(self) -> TrainConfig:
        """The preset's recipe for training a site's adaptor."""
        return TrainConfig.from_dict(self.content["mapping"])

    @property
    def genes(self) -> list[str]:
        """Ordered gene list."""
        return list(self.content["genes"])

    @property
    def condition_names(self) -> list[str]:
        """Condition names in table order."""
        return [c["name"] for c in self.content["conditions"]]

    @property
    def label_levels(self) -> list[str]:
        """Label levels (annotation columns) with prototypes, primary level first."""
        return list(self.content["label_levels"])

    def unknown_thresholds(self, method: str) -> dict[str, float]:
        """The default unknown thresholds of a label-transfer method (``prototype``/``knn``), by
        label level (:data:`CLUSTER_LEVEL` for a release without label levels). A release
        written before thresholds were kept per level holds one number, used for every level."""
        thresholds = self.content["transfer"]["unknown_thresholds"]
        if method not in thresholds:
            raise ConfigError(
                f"{method} transfer is not available for this release (it offers "
                f"{', '.join(sorted(thresholds))}); kNN transfer needs the reference latents "
                "that a release built with --no-reference-latents or by federation lacks"
            )
        recorded = thresholds[method]
        if isinstance(recorded, int | float):
            return dict.fromkeys(transfer_levels(self.label_levels), float(recorded))
        return {level: float(t) for level, t in recorded.items()}

    def prototypes(self, level: str) -> PrototypeSet:
        """Prototype catalogue of one label level."""
        i = self.label_levels.index(level)
        return PrototypeSet.from_tensors(
            self.tensors, prototype_prefix(i), self.content["prototypes"][level]
        )

    def unlabeled_prototypes(self) -> PrototypeSet | None:
        """Prototypes of unlabelled reference clusters (Leiden), if the reference had any."""
        meta = self.content.get("unlabeled_prototypes")
        if not meta:
            return None
        return PrototypeSet.from_tensors(self.tensors, UNLABELED_PREFIX, meta)

    def reference_latents(self) -> tuple[NDArray[np.float32], NDArray[np.int64]] | None:
        """Reference cells' latent means and condition indices, if the release keeps them."""
        if LATENT_TENSOR not in self.tensors:
            return None
        return (
            self.tensors[LATENT_TENSOR].numpy(),
            self.tensors[CONDITION_TENSOR].numpy().astype(np.int64),
        )

    def reference_labels(self, level: str) -> NDArray[np.object_] | None:
        """Reference cells' labels of ``level`` ("" = unlabelled), if latents are kept."""
        name = reference_label_tensor(self.label_levels.index(level))
        if name not in self.tensors:
            return None
        vocab = np.asarray([*self.content["reference"]["label_vocab"][level], ""], dtype=object)
        return vocab[self.tensors[name].numpy().astype(np.int64)]  # -1 picks ""

    def condition_embeddings(self) -> tuple[list[str], NDArray[np.float32]] | None:
        """The learnt condition embeddings (``embedding`` mechanism): names and one row per
        condition, for analysis (e.g. a PCA of samples); None for other mechanisms."""
        table = self.tensors.get(MODEL_PREFIX + EMBEDDING_TABLE)
        if table is None:
            return None
        return self.condition_names, table.numpy().copy()

    def model_tensors(self) -> dict[str, Tensor]:
        """The network's tensors, named as :func:`surgery.export_tensors` names them."""
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}

    def build_model(self) -> CondVAE:
        """The frozen network of this release, in eval mode."""
        model = CondVAE(self.model_config, len(self.condition_names))
        try:
            surgery.load_tensors(model, self.model_tensors())
        except ValueError as exc:
            raise ReleaseError(
                f"release {self.short_id}: weights do not fit its model: {exc}"
            ) from None
        model.freeze_all()
        model.eval()
        return model

    # ------------------------------------------------------------------ construction
    @staticmethod
    def compute_trunk_id(content: dict[str, Any], tensors: dict[str, Tensor]) -> str:
        """Hash of model configuration, genes, recipe and trunk (non-condition) tensors."""
        network = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        trunk = {k: tensor_digest(v) for k, v in sorted(surgery.split(network)[0].items())}
        return content_hash(
            {
                "model": content["model"],
                "genes": content["genes"],
                "preprocessing": content["preprocessing"],
                "trunk": trunk,
            }
        )

    @classmethod
    def assemble(
        cls, content: dict[str, Any], tensors: dict[str, Tensor], provenance: dict[str, Any]
    ) -> Release:
        """Finish a release: add format, trunk id and tensor index to ``content``."""
        body = dict(content)
        body["format"] = RELEASE_FORMAT
        body["trunk_id"] = cls.compute_trunk_id(body, tensors)
        body["tensors"] = tensor_index(tensors)
        return cls(body, {k: v.contiguous() for k, v in tensors.items()}, provenance)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the release directory atomically; refuse to replace one unless ``overwrite``."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
            raise ReleaseError(f"{target}: already exists; choose a new --out or pass --overwrite")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            safetensors.torch.save_file(self.tensors, str(tmp / WEIGHTS_FILE))
            (tmp / MANIFEST_FILE).write_text(self.manifest_json())
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
        return target

    def manifest_json(self) -> str:
        """The manifest as written to ``manifest.json``."""
        manifest = {
            "content": self.content,
            "content_hash": self.content_hash,
            "provenance": self.provenance,
        }
        return json.dumps(manifest, indent=1, sort_keys=True)

    def weights_bytes(self) -> bytes:
        """The weights as written to ``weights.safetensors``."""
        return safetensors.torch.save(self.tensors)

    @classmethod
    def load(cls, directory: str | Path) -> Release:
        """Read and verify a release directory (every tensor hash and the content hash)."""
        root = Path(directory)
        manifest_path, weights_path = root / MANIFEST_FILE, root / WEIGHTS_FILE
        for path in (manifest_path, weights_path):
            if not path.is_file():
                raise ReleaseError(f"{root}: not a release directory ({path.name} is missing)")
        try:
            tensors = safetensors.torch.load_file(str(weights_path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise ReleaseError(f"{weights_path}: cannot be read ({exc})") from None
        try:
            manifest_text = manifest_path.read_text()
        except UnicodeDecodeError as exc:
            raise ReleaseError(f"{manifest_path}: malformed manifest ({exc})") from None
        return cls.from_manifest(manifest_text, tensors, source=str(root))

    @classmethod
    def from_bytes(cls, manifest_json: str, weights: bytes, *, source: str) -> Release:
        """A verified release from the contents of its two files."""
        try:
            tensors = safetensors.torch.load(weights)
        except Exception as exc:  # safetensors raises several types for damaged bytes
            raise ReleaseError(f"{source}: weights cannot be read ({exc})") from None
        return cls.from_manifest(manifest_json, tensors, source=source)

    @classmethod
    def from_manifest(
        cls, manifest_json: str, tensors: dict[str, Tensor], *, source: str
    ) -> Release:
        """A verified release from its manifest text and its tensors: strict JSON, every field
        of the declared shape, every tensor and the content matching their hashes, and the
        typed views readable (:class:`ReleaseError` for anything else)."""
        try:
            manifest = load_json(
                manifest_json, source=f"{source} manifest", max_bytes=MAX_MANIFEST_BYTES
            )
            check(manifest, MANIFEST, f"{source} manifest")
        except ValidationError as exc:
            raise ReleaseError(f"{source}: malformed manifest ({exc})") from None
        content = manifest["content"]
        if content.get("format") != RELEASE_FORMAT:
            raise ReleaseError(
                f"{source}: format {content.get('format')!r}, expected {RELEASE_FORMAT!r}"
            )
        release = cls(content, tensors, manifest.get("provenance", {}))
        release.verify(manifest["content_hash"], source=source)
        release.check_views(source)
        return release

    def check_views(self, source: str) -> None:
        """Raise :class:`ReleaseError` unless every typed view of the content reads: the
        configurations, the genes and conditions, each level's prototypes and thresholds."""
        try:
            config, _, _ = self.model_config, self.recipe, self.mapping_defaults
            if len(self.genes) != config.n_genes or len(set(self.genes)) != len(self.genes):
                raise ValueError(f"{len(self.genes)} genes for a network of {config.n_genes}")
            if len(set(self.condition_names)) != len(self.condition_names):
                raise ValueError("a condition is listed twice")
            if self.label_levels != list(self.content["prototypes"]):
                raise ValueError("the label levels and the prototype catalogue disagree")
            for level in self.label_levels:
                self.prototypes(level)
            self.unlabeled_prototypes()
            for method in self.content["transfer"]["unknown_thresholds"]:
                if not all(0.0 <= t <= 1.0 for t in self.unknown_thresholds(method).values()):
                    raise ValueError(f"{method} unknown thresholds outside [0, 1]")
        except (ConfigError, ValueError, KeyError) as exc:
            raise ReleaseError(
                f"{source}: the manifest does not describe a release ({exc})"
            ) from None

    def verify(self, claimed_hash: str, *, source: str) -> None:
        """Check tensors against the manifest's index and the content against ``claimed_hash``."""
        index = self.content.get("tensors", {})
        missing = sorted(set(index) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(index))
        if missing or extra:
            raise ReleaseError(
                f"{source}: weights do not match the manifest (missing {missing}, unlisted {extra})"
            )
        for name, entry in index.items():
            if tensor_digest(self.tensors[name]) != entry.get("sha256"):
                raise ReleaseError(
                    f"{source}: tensor {name!r} does not match its recorded hash; "
                    "the release was modified or damaged"
                )
        if self.content_hash != claimed_hash:
            raise ReleaseError(
                f"{source}: manifest content hash mismatch (recorded "
                f"{claimed_hash}, computed {self.content_hash})"
            )
        if self.compute_trunk_id(self.content, self.tensors) != self.trunk_id:
            raise ReleaseError(f"{source}: trunk id does not match the trunk tensors")
