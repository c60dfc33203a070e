"""The biology of a synthetic dataset and the counts of its cells (simulate_sample): gene
programmes per cell type drawn from the dataset seed (:func:`dataset_biology`), the section's
profiles, and Poisson counts that depend on the cell type and the neighbourhood
(:func:`simulate_expression`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from histomap.data.synthetic_config import (CELL_TYPES, GENE_PROGRAMMES, INDUCTIONS,
                                            PROGRAMME_TYPES, SyntheticConfig)


def gene_panel(n_genes: int) -> pd.DataFrame:
    """var table: named programme genes first, then background genes ``GENE###``."""
    names, programmes = [], []
    for programme, genes in GENE_PROGRAMMES.items():
        names += list(genes)
        programmes += [programme] * len(genes)
    for i in range(len(names), n_genes):
        names.append(f"GENE{i + 1:03d}")
        programmes.append("background")
    var = pd.DataFrame({"programme": pd.Categorical(programmes)}, index=pd.Index(names))
    return var


def type_profiles(var: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """(n_types, n_genes) expression fractions (rows sum to 1): log-normal background, strong
    type programmes, high housekeeping genes, low baseline for induced genes."""
    T, G = len(CELL_TYPES), len(var)
    w = np.exp(rng.normal(0, 0.8, G))[None, :] * np.exp(rng.normal(0, 0.4, (T, G)))
    prog = var["programme"].to_numpy()
    for programme in GENE_PROGRAMMES:
        idx = np.flatnonzero(prog == programme)
        k = len(idx)
        if programme == "housekeeping":
            level = 15 * np.exp(rng.normal(0, 0.3, k))
            w[:, idx] = level[None] * np.exp(rng.normal(0, 0.1, (T, k)))
        elif programme in INDUCTIONS:
            w[:, idx] = 0.2 * np.exp(rng.normal(0, 0.3, (T, k)))
        else:
            high = 20 * np.exp(rng.normal(0, 0.4, k))
            w[:, idx] = 0.15 * np.exp(rng.normal(0, 0.4, (T, k)))
            for t in PROGRAMME_TYPES[programme]:
                w[t, idx] = high * np.exp(rng.normal(0, 0.15, k))
    return w / w.sum(axis=1, keepdims=True)


def neighbour_fractions(xy_um: np.ndarray, cell_type: np.ndarray, radius_um: float) -> np.ndarray:
    """(n, n_types) fraction of each type among the other cells within ``radius_um``
    (zeros for a cell with no neighbour)."""
    n, T = len(xy_um), len(CELL_TYPES)
    pairs = cKDTree(xy_um).query_pairs(radius_um, output_type="ndarray")
    counts = np.zeros(n * T)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        counts += np.bincount(i * T + cell_type[j], minlength=n * T)
        counts += np.bincount(j * T + cell_type[i], minlength=n * T)
    counts = counts.reshape(n, T)
    total = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(total, 1)


@dataclass
class Biology:
    """How a dataset's cells express genes: ``profiles`` (n_types, n_genes) expression fractions
    per cell type, ``induction`` {programme: (n_programme_genes,) strength}."""
    var: pd.DataFrame
    profiles: np.ndarray
    induction: dict[str, np.ndarray]


def dataset_biology(cfg: SyntheticConfig) -> Biology:
    """The biology shared by every section of a dataset, drawn from ``cfg.dataset_seed``
    (``cfg.seed`` when None) alone: the same profiles and induction strengths for every
    section seed."""
    seed = cfg.seed if cfg.dataset_seed is None else cfg.dataset_seed
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(101,)))
    var = gene_panel(cfg.n_genes)
    profiles = type_profiles(var, rng)
    prog = var["programme"].to_numpy()
    induction = {programme: cfg.induction_strength
                 * np.exp(rng.normal(0, 0.2, int((prog == programme).sum())))
                 for programme in INDUCTIONS}
    return Biology(var, profiles, induction)


def section_profiles(biology: Biology, batch_effect_sd: float,
                     rng: np.random.Generator) -> np.ndarray:
    """The profiles one section expresses: the dataset's, times a per-section log-normal batch
    effect per (type, gene) when ``batch_effect_sd > 0`` (renormalised to sum to 1)."""
    if batch_effect_sd <= 0:
        return biology.profiles
    noisy = biology.profiles * np.exp(rng.normal(0, batch_effect_sd, biology.profiles.shape))
    return noisy / noisy.sum(axis=1, keepdims=True)


def simulate_expression(cfg: SyntheticConfig, xy_um: np.ndarray, cell_type: np.ndarray,
                        rng: np.random.Generator, *, biology: Biology | None = None,
                        profiles: np.ndarray | None = None, depth: float = 1.0,
                        level: np.ndarray | None = None):
    """Expected rates and Poisson counts per cell.

    ``biology``: the dataset's (default :func:`dataset_biology` of ``cfg``); ``profiles``: the
    section's profiles (default the dataset's); ``depth``: the section's library-size factor;
    ``level``: (n_genes,) factors every cell's rate of each gene is multiplied by (the patient's
    expression level, :mod:`histomap.data.synthetic_patient`; None: none).
    Returns (counts CSR int32 (n, G), rate float32 (n, G), var, library float (n,),
    neighbour fractions (n, T)).
    """
    biology = biology or dataset_biology(cfg)
    var = biology.var
    profiles = biology.profiles if profiles is None else profiles
    lib_type = np.array([cfg.library_size[t] for t in CELL_TYPES]) * float(depth)
    sd = cfg.library_log_sd
    library = lib_type[cell_type] * np.exp(rng.normal(-sd ** 2 / 2, sd, len(cell_type)))
    rate = library[:, None] * profiles[cell_type]
    frac = neighbour_fractions(xy_um, cell_type, cfg.neighbourhood_um)
    prog = var["programme"].to_numpy()
    for programme, (source, responders) in INDUCTIONS.items():
        idx = np.flatnonzero(prog == programme)
        strength = biology.induction[programme]
        resp = np.isin(cell_type, responders)
        rate[np.ix_(resp, idx)] += (library[resp] * frac[resp, source])[:, None] * strength[None]
    if level is not None:
        rate *= np.asarray(level, dtype=np.float64)[None, :]
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.int32))
    return counts, rate.astype(np.float32), var, library, frac
