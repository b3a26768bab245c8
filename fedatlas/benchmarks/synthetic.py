"""Synthetic single-cell UMI counts for tests, the demo and benchmarks (no downloads).

A `SyntheticWorld` fixes everything that must agree between the reference and the query data of
one experiment: a shared log-normal baseline expression profile, gene-wise negative-binomial
dispersions, one expression programme per cell type (up- and down-regulated gene sets) and one
batch effect per batch name (a multiplicative gene-wise log-normal factor plus its own log-normal
library-size distribution). Programmes and batch effects are deterministic functions of
(world seed, name), so any batch name works and a programme does not depend on which other cell
types the world has. `SyntheticWorld.sample` then draws cells:

    counts[c, g] ~ NB(mean = L_c * p[type(c), batch(c), g], dispersion = phi_g)
    p[t, b, :] = softmax(baseline + programme_t + batch_effect_b)
    L_c ~ LogNormal(library_log_mean_b, library_log_sd_b)

Site structure: a batch drawn for a site (``sample(..., site=NAME)``) is the batch
``NAME/BATCH`` of that site. Its effect is the site's own gene-wise log factor (lab, protocol:
shared by all of the site's batches, ``site_effect_strength``) plus the batch's own, so batches
of one site resemble each other more than batches of different sites, and two sites may both
have a batch called ``b1`` without sharing its effect.

Condition response: the batches named in ``stimulated`` also carry one response programme shared
by every cell type (``response_fraction`` of the genes raised about ``exp(response_log_fold)``-
fold, as after a stimulation or a treatment), added to the logits above: a known type
measured under a condition the reference never saw. `SyntheticWorld.write_h5ad` writes a
site's cells straight to an ``.h5ad`` file block by block (10^6 cells and more in the memory of
one block).

Cells are generated in blocks of about 2^21 matrix entries with one random stream per block, so
memory stays bounded (10^6 cells work: the CSR output is assembled from compact per-block pieces,
so peak memory is about 1.6 times the output) and the result does not depend on the number of
threads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedatlas.shared.data.h5ad import write_h5ad_blocks
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.progress import Progress

__all__ = [
    "DEFAULT_CELL_TYPES",
    "DEMO_CELL_TYPES",
    "DEMO_REFERENCE_BATCHES",
    "DEMO_SITES",
    "SyntheticWorld",
    "default_cell_types",
    "make_counts",
    "make_demo_scenario",
]

# Domain tags separating the random streams derived from one world seed.
_TAG_GENES = 1
_TAG_TYPE = 2
_TAG_BATCH = 3
_TAG_SAMPLE = 4
_TAG_BLOCK = 5
_TAG_SITE = 6
_TAG_FILE_BLOCK = 7
_TAG_RESPONSE = 8
_BLOCK_ENTRIES = 2**21  # matrix entries generated per random stream / work unit
_SMALL_MEAN = 2.0  # below this NB mean, nonzero counts are drawn by inverse CDF
_BASELINE_SD = 1.8  # spread of the shared log-normal baseline expression

DEFAULT_CELL_TYPES: tuple[str, ...] = tuple(f"type_{k}" for k in range(6))


def default_cell_types(n: int) -> tuple[str, ...]:
    """The cell-type names ``type_0`` … ``type_{n-1}``."""
    if n < 1:
        raise ConfigError(f"n_cell_types must be at least 1, got {n}")
    return tuple(f"type_{k}" for k in range(n))


def _name_key(name: str) -> int:
    """A stable 64-bit integer for a name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


@dataclass(frozen=True)
class SyntheticWorld:
    """The fixed biology and technology of one synthetic experiment (see the module docstring).

    ``batch_effect_strength`` is the standard deviation of the natural-log gene-wise batch factor;
    the default gives batch effects that are clearly visible but weaker than cell-type differences
    (a type programme raises ``de_fraction`` of the genes and lowers half as many, each by about
    ``exp(de_log_fold)``-fold). ``library_size`` is the typical number of UMIs per cell over the
    ``n_genes`` genes. ``site_effect_strength`` is the standard deviation of the natural-log
    gene-wise factor a site adds to all of its batches. Batches named in ``stimulated`` carry
    the world's response programme (:meth:`response`).
    """

    seed: int = 0
    n_genes: int = 2000
    cell_types: tuple[str, ...] = DEFAULT_CELL_TYPES
    batch_effect_strength: float = 0.3
    library_size: float = 800.0
    de_fraction: float = 0.06
    de_log_fold: float = 1.5
    site_effect_strength: float = 0.3
    stimulated: tuple[str, ...] = ()
    response_fraction: float = 0.05
    response_log_fold: float = 2.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.n_genes < 10:
            raise ConfigError(f"n_genes must be at least 10, got {self.n_genes}")
        types = tuple(str(t) for t in self.cell_types)
        if not types:
            raise ConfigError("a synthetic world needs at least one cell type")
        if len(set(types)) != len(types):
            raise ConfigError(f"cell type names repeat: {list(types)}")
        object.__setattr__(self, "cell_types", types)
        if self.batch_effect_strength < 0:
            raise ConfigError("batch_effect_strength must be >= 0")
        if self.site_effect_strength < 0:
            raise ConfigError("site_effect_strength must be >= 0")
        if self.library_size <= 0:
            raise ConfigError("library_size must be > 0")
        if not 0 < self.de_fraction <= 0.5:
            raise ConfigError("de_fraction must be in (0, 0.5]")
        if not 0 < self.response_fraction <= 0.5:
            raise ConfigError("response_fraction must be in (0, 0.5]")
        object.__setattr__(self, "stimulated", tuple(str(b) for b in self.stimulated))

    # ------------------------------------------------------------------ deterministic structure

    @cached_property
    def _gene_params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = _rng(self.seed, _TAG_GENES, self.n_genes)
        baseline = rng.normal(0.0, _BASELINE_SD, self.n_genes)  # log relative abundance
        # Dispersion: larger for lowly expressed genes, as in droplet data.
        log_phi = (
            np.log(0.25) - 0.3 * (baseline - baseline.mean()) + rng.normal(0, 0.4, self.n_genes)
        )
        dispersion = np.clip(np.exp(log_phi), 0.02, 5.0)
        return baseline, dispersion

    @property
    def baseline(self) -> np.ndarray:
        """Shared log relative abundance of every gene (natural log, before normalisation)."""
        return self._gene_params[0].copy()

    @property
    def dispersion(self) -> np.ndarray:
        """Gene-wise negative-binomial dispersion phi (variance = mu + phi mu^2)."""
        return self._gene_params[1].copy()

    def programme(self, cell_type: str) -> np.ndarray:
        """Log fold changes (natural log, one per gene) defining ``cell_type``'s expression
        programme; a deterministic function of (seed, n_genes, name, de settings)."""
        rng = _rng(self.seed, _TAG_TYPE, self.n_genes, _name_key(cell_type))
        n = self.n_genes
        n_up = max(1, round(self.de_fraction * n))
        n_down = max(1, round(0.5 * self.de_fraction * n))
        genes = rng.permutation(n)
        lfc = rng.normal(0.0, 0.1, n)  # small type-wide variation of every gene
        lfc[genes[:n_up]] += rng.lognormal(np.log(self.de_log_fold), 0.35, n_up)
        lfc[genes[n_up : n_up + n_down]] -= rng.lognormal(np.log(self.de_log_fold), 0.35, n_down)
        return lfc

    def batch_effect(self, batch: str) -> tuple[np.ndarray, float, float]:
        """``(gene log factors, library log mean, library log sd)`` of ``batch``; a deterministic
        function of (seed, n_genes, batch name, strength, library size)."""
        rng = _rng(self.seed, _TAG_BATCH, self.n_genes, _name_key(batch))
        log_factor = rng.normal(0.0, 1.0, self.n_genes) * self.batch_effect_strength
        lib_log_mean = float(np.log(self.library_size) + rng.uniform(-0.4, 0.4))
        lib_log_sd = float(rng.uniform(0.25, 0.45))
        return log_factor, lib_log_mean, lib_log_sd

    @cached_property
    def _response(self) -> np.ndarray:
        rng = _rng(self.seed, _TAG_RESPONSE, self.n_genes)
        n_up = max(1, round(self.response_fraction * self.n_genes))
        lfc = np.zeros(self.n_genes)
        lfc[rng.permutation(self.n_genes)[:n_up]] = rng.lognormal(
            np.log(self.response_log_fold), 0.35, n_up
        )
        return lfc

    def response(self) -> np.ndarray:
        """Log fold changes (natural log, one per gene) of the condition response that every
        cell type of a ``stimulated`` batch shows; a deterministic function of (seed, n_genes,
        response settings)."""
        return self._response.copy()

    @cached_property
    def _programmes(self) -> dict[str, np.ndarray]:
        return {t: self.programme(t) for t in self.cell_types}

    def site_effect(self, site: str) -> np.ndarray:
        """Gene log factors that ``site`` adds to each of its batches; a deterministic function
        of (seed, n_genes, site name, site strength)."""
        rng = _rng(self.seed, _TAG_SITE, self.n_genes, _name_key(site))
        return rng.normal(0.0, 1.0, self.n_genes) * self.site_effect_strength

    def mean_profile(self, cell_type: str, batch: str, site: str | None = None) -> np.ndarray:
        """Relative expression (sums to 1 over genes) of ``cell_type`` measured in ``batch`` (of
        ``site``: the batch ``site/batch`` with the site's effect added)."""
        if cell_type not in self._programmes:
            raise ConfigError(f"cell type {cell_type!r} is not in this world ({self.cell_types})")
        logits = (
            self._gene_params[0]
            + self._programmes[cell_type]
            + self.batch_effect(_site_batch(site, batch))[0]
        )
        if site is not None:
            logits += self.site_effect(site)
        if _site_batch(site, batch) in self.stimulated:
            logits += self._response
        p = np.exp(logits - logits.max())
        return p / p.sum()

    # ------------------------------------------------------------------------------- sampling

    def sample(
        self,
        n_cells: int,
        batches: Sequence[str] = ("batch0", "batch1", "batch2"),
        cell_types: Sequence[str] | None = None,
        proportions: Sequence[float] | Mapping[str, float] | None = None,
        seed: int = 0,
        *,
        site: str | None = None,
        n_threads: int | None = None,
    ) -> anndata.AnnData:
        """Draw ``n_cells`` cells, split as evenly as possible over ``batches`` (in order).

        Within each batch the cell type of each cell is drawn from ``cell_types`` (default: all of
        the world's) with ``proportions`` (default: equal). Returns raw counts as CSR float32
        (integer values); obs ``batch`` and ``cell_type`` (categoricals, categories in the given
        order), obs_names ``"{batch}:{index}"``, var_names ``gene_00000`` …. With ``site`` the
        batches are that site's (see the module docstring): obs also has ``site`` and obs_names
        are ``"{site}/{batch}:{index}"``. The result depends on (world, n_cells, batches,
        cell_types, proportions, seed, site) only, not on ``n_threads``.
        """
        if n_cells < 0:
            raise ConfigError(f"n_cells must be >= 0, got {n_cells}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        batches = [str(b) for b in batches]
        if not batches:
            raise ConfigError("at least one batch name is needed")
        if len(set(batches)) != len(batches):
            raise ConfigError(f"batch names repeat: {batches}")
        types = list(self.cell_types if cell_types is None else (str(t) for t in cell_types))
        unknown = [t for t in types if t not in self.cell_types]
        if unknown or not types:
            raise ConfigError(
                f"cell types {unknown or types} are not in this world ({list(self.cell_types)})"
            )
        if len(set(types)) != len(types):
            raise ConfigError(f"cell type names repeat: {types}")
        probs = _proportions(types, proportions)

        # Cell assignment: batch blocks in order; types drawn within each batch.
        stream = (seed,) if site is None else (seed, _name_key(site))
        rng = _rng(self.seed, _TAG_SAMPLE, *stream)
        per_batch = np.full(len(batches), n_cells // len(batches))
        per_batch[: n_cells % len(batches)] += 1
        batch_idx = np.repeat(np.arange(len(batches)), per_batch)
        type_idx = rng.choice(len(types), size=n_cells, p=probs)

        # Relative expression per (batch, type) combination; library-size parameters per batch.
        profiles = np.stack([self.mean_profile(t, b, site) for b in batches for t in types])
        lib_params = np.array([self.batch_effect(_site_batch(site, b))[1:] for b in batches])
        combo = batch_idx * len(types) + type_idx

        X = self._draw_counts(combo, batch_idx, profiles, lib_params, stream, n_threads)

        width = max(6, len(str(max(per_batch.max(), 1) - 1)))
        names = [
            f"{_site_batch(site, batch)}:{j:0{width}d}"
            for batch, n in zip(batches, per_batch, strict=True)
            for j in range(n)
        ]
        columns = {
            "batch": pd.Categorical.from_codes(batch_idx, categories=batches),
            "cell_type": pd.Categorical.from_codes(type_idx, categories=types),
        }
        if site is not None:
            columns["site"] = pd.Categorical.from_codes(
                np.zeros(n_cells, dtype=np.int8), categories=[site]
            )
        obs = pd.DataFrame(columns, index=pd.Index(names, dtype=object))
        gene_width = max(5, len(str(self.n_genes - 1)))
        var = pd.DataFrame(
            index=pd.Index([f"gene_{g:0{gene_width}d}" for g in range(self.n_genes)], dtype=object)
        )
        adata = anndata.AnnData(X=X, obs=obs, var=var)
        adata.uns["synthetic"] = {
            "world_seed": int(self.seed),
            "sample_seed": int(seed),
            "n_genes": int(self.n_genes),
            "world_cell_types": list(self.cell_types),
            "batch_effect_strength": float(self.batch_effect_strength),
        }
        if site is not None:
            adata.uns["synthetic"].update(
                site=site, site_effect_strength=float(self.site_effect_strength)
            )
        return adata

    def write_h5ad(
        self,
        path: str | Path,
        n_cells: int,
        batches: Sequence[str] = ("batch0", "batch1", "batch2"),
        cell_types: Sequence[str] | None = None,
        proportions: Sequence[float] | Mapping[str, float] | None = None,
        seed: int = 0,
        *,
        site: str | None = None,
        block_cells: int = 100_000,
        progress: bool = False,
    ) -> None:
        """Write ``n_cells`` cells to the ``.h5ad`` file ``path``, drawn ``block_cells`` at a
        time so that memory holds one block (and the obs table), however many cells.

        Block ``k`` is ``sample(m, batches, cell_types, proportions, seed_k, site=site)`` with
        its own seed derived from (``seed``, k): the file depends on ``block_cells`` too. The
        layout is that of :meth:`sample`; obs_names number each batch's cells across blocks.
        """
        if block_cells < 1:
            raise ConfigError(f"block_cells must be >= 1, got {block_cells}")
        reporter = Progress(f"generating {path}", n_cells, "cell", enabled=progress, rate=True)
        prefix = "" if site is None else f"{site}/"
        width = max(6, len(str(max(n_cells, 1) - 1)))
        counts_so_far = np.zeros(len(batches), dtype=np.int64)

        def blocks() -> Iterator[anndata.AnnData]:
            for k, start in enumerate(range(0, n_cells, block_cells)):
                size = min(block_cells, n_cells - start)
                block_seed = int(_rng(self.seed, _TAG_FILE_BLOCK, seed, k).integers(2**62))
                block = self.sample(size, batches, cell_types, proportions, block_seed, site=site)
                codes = block.obs["batch"].cat.codes.to_numpy()
                per_batch = np.bincount(codes, minlength=len(batches))
                first = np.concatenate([[0], np.cumsum(per_batch)[:-1]])  # batches are contiguous
                numbers = counts_so_far[codes] + np.arange(size) - first[codes]
                counts_so_far[:] += per_batch
                block.uns["synthetic"].update(sample_seed=seed, block_cells=block_cells)
                block.obs_names = [
                    f"{prefix}{batches[c]}:{j:0{width}d}"
                    for c, j in zip(codes, numbers, strict=True)
                ]
                yield block
                reporter.advance(size)

        write_h5ad_blocks(path, blocks())
        reporter.finish()

    def _draw_counts(
        self,
        combo: np.ndarray,
        batch_idx: np.ndarray,
        profiles: np.ndarray,
        lib_params: np.ndarray,
        stream: tuple[int, ...],
        n_threads: int | None,
    ) -> sp.csr_matrix:
        n_cells, n_genes = len(combo), self.n_genes
        block = max(16, _BLOCK_ENTRIES // n_genes)
        starts = list(range(0, n_cells, block))
        inv_dispersion = 1.0 / self._gene_params[1]

        def work(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            stop = min(start + block, n_cells)
            rng = _rng(self.seed, _TAG_BLOCK, stream[0], start // block, *stream[1:])
            bi = batch_idx[start:stop]
            lib = np.exp(rng.normal(lib_params[bi, 0], lib_params[bi, 1]))
            mu = profiles[combo[start:stop]]
            mu *= lib[:, None]
            return _sample_nb_csr(mu, inv_dispersion, rng)

        threads = n_threads if n_threads is not None else min(4, os.cpu_count() or 1)
        if threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                pieces = list(pool.map(work, starts))
        else:
            pieces = [work(s) for s in starts]
        return _assemble_csr(pieces, n_cells, n_genes)


def _site_batch(site: str | None, batch: str) -> str:
    """The name a batch's own effect is drawn for: ``site/batch`` when it belongs to a site."""
    return batch if site is None else f"{site}/{batch}"


def _proportions(
    types: Sequence[str], proportions: Sequence[float] | Mapping[str, float] | None
) -> np.ndarray:
    if proportions is None:
        return np.full(len(types), 1.0 / len(types))
    if isinstance(proportions, Mapping):
        extra = set(proportions) - set(types)
        if extra:
            raise ConfigError(f"proportions name cell types not sampled: {sorted(extra)}")
        values = np.array([float(proportions.get(t, 0.0)) for t in types])
    else:
        values = np.asarray(list(proportions), dtype=float)
        if values.shape != (len(types),):
            raise ConfigError(
                f"proportions has {values.size} values for {len(types)} cell types {list(types)}"
            )
    if not np.all(np.isfinite(values)) or (values < 0).any() or values.sum() <= 0:
        raise ConfigError(f"proportions must be non-negative with a positive sum, got {values}")
    return values / values.sum()


def _sample_nb_csr(
    mu: np.ndarray, inv_dispersion: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Negative-binomial counts with means ``mu`` (cells × genes) and size ``r`` (1 / dispersion)
    per gene, as compact CSR pieces ``(counts, column indices, nonzeros per row)``.

    Exact but sparse-aware: an entry is zero when a uniform ``u`` is at most P(0); given that it is
    not, small-mean entries draw from the inverse CDF on (P(0), 1) and large-mean entries from the
    zero-truncated NB by gamma–Poisson rejection (acceptance 1 - P(0) > 0.4 there).
    """
    n_rows, n_cols = mu.shape
    # P(0) = (1 + mu/r)^(-r), computed in place in a work array.
    p0 = mu * (1.0 / inv_dispersion)
    np.log1p(p0, out=p0)
    p0 *= -inv_dispersion
    np.exp(p0, out=p0)
    nz = np.flatnonzero(rng.random(mu.shape) > p0)
    genes = nz % n_cols
    r = inv_dispersion[genes]
    m = mu.ravel()[nz]
    p0_nz = p0.ravel()[nz]
    del p0
    counts = np.empty(nz.size, dtype=np.int64)

    small = np.flatnonzero(m < _SMALL_MEAN)
    if small.size:
        rr, ms, p0s = r[small], m[small], p0_nz[small]
        qq = ms / (ms + rr)  # P(k) = P(k-1) (k-1+r)/k q, mean = r q / (1 - q)
        uu = p0s + (1.0 - p0s) * rng.random(small.size)  # uniform on (P(0), 1)
        k = np.ones(small.size, dtype=np.int64)
        pmf = p0s * rr * qq  # P(1)
        cdf = p0s + pmf
        active = np.flatnonzero(uu > cdf)
        pmf, cdf = pmf[active], cdf[active]
        kk = 1
        while active.size and kk < 100_000:  # the cap only guards against rounding
            kk += 1
            pmf *= (kk - 1 + rr[active]) / kk * qq[active]
            cdf += pmf
            k[active] = kk
            still = uu[active] > cdf
            active, pmf, cdf = active[still], pmf[still], cdf[still]
        counts[small] = k
    large = np.flatnonzero(m >= _SMALL_MEAN)
    if large.size:
        rl, ml = r[large], m[large]
        out = np.zeros(large.size, dtype=np.int64)
        todo = np.arange(large.size)
        while todo.size:
            draw = rng.poisson(rng.gamma(rl[todo], ml[todo] / rl[todo]))
            out[todo] = draw
            todo = todo[draw == 0]
        counts[large] = out

    row_nnz = np.bincount(nz // n_cols, minlength=n_rows)
    count_dtype = np.uint16 if counts.size == 0 or counts.max() < 2**16 else np.float32
    col_dtype = np.int16 if n_cols < 2**15 else np.int64
    return counts.astype(count_dtype), genes.astype(col_dtype), row_nnz


def _assemble_csr(
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_rows: int, n_cols: int
) -> sp.csr_matrix:
    nnz = sum(p[0].size for p in pieces)
    index_dtype = np.int32 if max(nnz, n_cols) < 2**31 else np.int64
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=index_dtype)
    indptr = np.zeros(n_rows + 1, dtype=index_dtype)
    pos = row = 0
    while pieces:
        counts, cols, row_nnz = pieces.pop(0)  # free each compact piece once copied
        data[pos : pos + counts.size] = counts
        indices[pos : pos + cols.size] = cols
        indptr[row + 1 : row + 1 + row_nnz.size] = pos + np.cumsum(row_nnz)
        pos += counts.size
        row += row_nnz.size
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def make_counts(
    n_cells: int,
    *,
    n_genes: int = 2000,
    n_cell_types: int = 6,
    batches: Sequence[str] = ("batch0", "batch1", "batch2"),
    cell_types: Sequence[str] | None = None,
    seed: int = 0,
    proportions: Sequence[float] | Mapping[str, float] | None = None,
    batch_effect_strength: float = 0.3,
    library_size: float = 800.0,
    n_threads: int | None = None,
) -> anndata.AnnData:
    """Synthetic raw counts in one call: ``SyntheticWorld(seed, ...).sample(n_cells, ...)``.

    ``cell_types`` (names) takes precedence over ``n_cell_types`` (which gives ``type_0`` …).
    See `SyntheticWorld.sample` for the layout of the result.
    """
    types = tuple(cell_types) if cell_types is not None else default_cell_types(n_cell_types)
    world = SyntheticWorld(
        seed=seed,
        n_genes=n_genes,
        cell_types=types,
        batch_effect_strength=batch_effect_strength,
        library_size=library_size,
    )
    return world.sample(
        n_cells, batches=batches, proportions=proportions, seed=seed, n_threads=n_threads
    )


#: Cell types of the demo world; the last one is absent from the demo reference.
DEMO_CELL_TYPES: tuple[str, ...] = (
    "B cell",
    "T cell",
    "NK cell",
    "monocyte",
    "dendritic cell",
    "plasma cell",
)
DEMO_REFERENCE_BATCHES: tuple[str, ...] = ("lab1", "lab2", "lab3")
# query site -> the one batch it holds
DEMO_SITES: dict[str, str] = {"site_a": "plate1", "site_b": "run1"}


def make_demo_scenario(seed: int = 0) -> tuple[anndata.AnnData, dict[str, anndata.AnnData]]:
    """A small world for the demo: ``(reference, {site name: query})``.

    2,000 genes and six cell types (`DEMO_CELL_TYPES`, names are labels only). The reference has
    1,500 cells in three batches and lacks the last type; site ``site_a`` (batch ``plate1``, 500
    cells) has the five reference types in other proportions; site ``site_b`` (batch ``run1``,
    500 cells) also has the missing type (``uns["novel_cell_types"]`` lists it; it is an empty
    list on the other query and the reference).
    """
    world = SyntheticWorld(seed=seed, n_genes=2000, cell_types=DEMO_CELL_TYPES)
    novel = DEMO_CELL_TYPES[-1]
    known = list(DEMO_CELL_TYPES[:-1])
    (site_a, batch_a), (site_b, batch_b) = DEMO_SITES.items()
    reference = world.sample(1500, batches=DEMO_REFERENCE_BATCHES, cell_types=known, seed=seed + 1)
    query_a = world.sample(
        500,
        batches=[batch_a],
        cell_types=known,
        proportions=[0.35, 0.25, 0.1, 0.2, 0.1],
        seed=seed + 2,
    )
    query_b = world.sample(
        500,
        batches=[batch_b],
        cell_types=DEMO_CELL_TYPES,
        proportions=[0.15, 0.2, 0.15, 0.2, 0.1, 0.2],
        seed=seed + 3,
    )
    reference.uns["novel_cell_types"] = []
    query_a.uns["novel_cell_types"] = []
    query_b.uns["novel_cell_types"] = [novel]
    return reference, {site_a: query_a, site_b: query_b}
