"""Spot expression preprocessing: QC, library-size normalisation, gene panels.

Output contract of :func:`normalise_spots` (``results/st/{sample}.h5ad``)
-------------------------------------------------------------------------
* ``X``: ``log1p(counts / total_counts * target_sum)`` as float32 (sparse CSR when the input is
  sparse). There is no separate ``log1p`` layer: ``X`` *is* the log-normalised expression, and
  ``uns["log1p"] = {"base": None}`` marks it so for scanpy (natural log).
* ``layers["counts"]``: the raw integer counts of the kept spots, unchanged.
* ``obs["total_counts"]``, ``obs["n_genes"]``: library size and number of detected genes per spot
  (computed on the raw counts, before normalisation).
* ``obsm["spatial"]`` (level-0 px) and ``uns["histomap"]`` are preserved;
  ``uns["histomap"]["normalisation"] = dict(target_sum=..., log1p=True)`` and
  ``uns["histomap"]["qc"] = dict(min_counts, min_genes, n_spots_in, n_spots_dropped)``.

Gene panels (``results/genes/{panel}/{fold}.tsv``, chosen by :func:`select_genes` from one
fold's training samples only) are TSV files with the columns ``gene`` and ``rank`` (1 = first),
written by :func:`write_gene_panel` and read by :func:`read_gene_panel`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.sample import UNS_KEY, user_source
from histomap.errors import InputError

log = logging.getLogger(__name__)

GENE_SELECTION_METHODS = ("top_mean", "hvg", "list")


# --------------------------------------------------------------------------- normalisation
def _check_raw_counts(x, path: str | Path) -> None:
    values = x.data if sp.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if np.isnan(values).any():
        raise InputError(path, "spot counts contain NaN; expected raw integer counts")
    if values.min() < 0:
        raise InputError(path, "spot counts contain negative values; expected raw integer counts")
    if not np.array_equal(values, np.round(values)):
        raise InputError(path, "spot counts are not integers (already normalised?); "
                               "expected raw integer counts in X")


def normalise_spots(spots: ad.AnnData, *, min_counts: int = 100, min_genes: int = 20,
                    target_sum: float = 1e4, path: str | Path = "spots.h5ad") -> ad.AnnData:
    """QC-filter spots, then library-size normalise to ``target_sum`` and log1p.

    ``spots.X`` must hold raw integer counts. Spots with fewer than ``min_counts`` total counts
    or fewer than ``min_genes`` detected genes are dropped (logged by name). Returns a new
    AnnData following the module's output contract; ``spots`` is not modified.
    """
    if target_sum <= 0:
        raise ValueError(f"target_sum must be positive, got {target_sum}")
    path = user_source(spots, path)  # errors name the user's sample, not the intermediate
    _check_raw_counts(spots.X, path)
    counts = sp.csr_matrix(spots.X) if sp.issparse(spots.X) else np.asarray(spots.X)
    total_counts = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    n_genes = (np.asarray((counts > 0).sum(axis=1)).ravel().astype(np.int64))

    # empty spots cannot be library-size normalised: always dropped, whatever the thresholds
    keep = (total_counts >= min_counts) & (n_genes >= min_genes) & (total_counts > 0)
    n_in, n_drop = spots.n_obs, int((~keep).sum())
    if n_drop:
        dropped = list(spots.obs_names[~keep])
        log.info("%s: QC dropped %d of %d spots (min_counts=%s, min_genes=%s, or no counts): %s",
                 path, n_drop, n_in, min_counts, min_genes, ", ".join(dropped))
    if not keep.any():
        raise InputError(path, f"QC removed all {n_in} spots (min_counts={min_counts}, "
                               f"min_genes={min_genes}; largest library size "
                               f"{total_counts.max() if n_in else 0:g}); lower the thresholds "
                               "or check the counts")

    out = spots[keep].copy()
    raw = counts[keep]
    out.layers["counts"] = raw.copy()
    out.obs["total_counts"] = total_counts[keep]
    out.obs["n_genes"] = n_genes[keep]

    scale = target_sum / total_counts[keep]
    if sp.issparse(raw):
        norm = sp.csr_matrix(sp.diags(scale) @ raw.astype(np.float64))
        norm.data = np.log1p(norm.data)
        out.X = norm.astype(np.float32)
    else:
        out.X = np.log1p(raw.astype(np.float64) * scale[:, None]).astype(np.float32)

    uns = dict(out.uns.get(UNS_KEY, {}))
    uns["normalisation"] = {"target_sum": float(target_sum), "log1p": True}
    uns["qc"] = {"min_counts": float(min_counts), "min_genes": int(min_genes),
                 "n_spots_in": int(n_in), "n_spots_dropped": n_drop}
    out.uns[UNS_KEY] = uns
    out.uns["log1p"] = {"base": None}
    log.info("%s: normalised %d spots x %d genes to target_sum=%g, log1p",
             path, out.n_obs, out.n_vars, target_sum)
    return out


# --------------------------------------------------------------------------- gene selection
def _check_samples(samples: Mapping[str, ad.AnnData], path: str | Path) -> None:
    for name, adata in samples.items():
        if not adata.var_names.is_unique:
            dup = sorted(set(adata.var_names[adata.var_names.duplicated()]))
            raise InputError(path, f"sample {name!r} has duplicated gene names: "
                                   f"{', '.join(dup[:20])}")
        if UNS_KEY not in adata.uns or "normalisation" not in adata.uns[UNS_KEY]:
            log.warning("%s: sample %r carries no normalisation record; select_genes expects "
                        "log-normalised X (normalise_spots)", path, name)


def shared_genes(samples: Mapping[str, ad.AnnData], *, path: str | Path = "gene panel"
                 ) -> list[str]:
    """Genes present in every sample, in the order of the first sample; logs what is dropped."""
    if not samples:
        raise InputError(path, "no samples given for gene selection")
    names = list(samples)
    shared = set(samples[names[0]].var_names)
    for name in names[1:]:
        shared &= set(samples[name].var_names)
    for name in names:
        n_only = samples[name].n_vars - len(shared)
        if n_only:
            log.info("%s: %d of %d genes of sample %r are not shared by every sample and are "
                     "not candidates", path, n_only, samples[name].n_vars, name)
    if not shared:
        raise InputError(path, f"samples {', '.join(names)} share no gene")
    return [g for g in samples[names[0]].var_names if g in shared]


def _exclude(genes: list[str], patterns: Sequence[str], path: str | Path) -> list[str]:
    if not patterns:
        return genes
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    excluded = [g for g in genes if regex.search(g)]
    if excluded:
        log.info("%s: excluded %d genes matching %s: %s", path, len(excluded), list(patterns),
                 ", ".join(excluded[:50]) + (" ..." if len(excluded) > 50 else ""))
    return [g for g in genes if not regex.search(g)]


def _column_sums(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    x = adata[:, genes].X
    return np.asarray(x.sum(axis=0, dtype=np.float64)).ravel()


def _top_mean(samples: Mapping[str, ad.AnnData], genes: list[str], n_genes: int) -> list[str]:
    """Highest mean log-normalised expression pooled over all spots of all samples."""
    total = sum(_column_sums(adata, genes) for adata in samples.values())
    n_spots = sum(adata.n_obs for adata in samples.values())
    table = pd.DataFrame({"gene": genes, "mean": total / max(n_spots, 1)})
    table = table.sort_values(["mean", "gene"], ascending=[False, True], kind="mergesort")
    return list(table["gene"].iloc[:n_genes])


def _hvg(samples: Mapping[str, ad.AnnData], genes: list[str], n_genes: int) -> list[str]:
    """scanpy seurat highly variable genes on log data, one batch per sample."""
    import scanpy as sc

    parts = []
    for name, adata in samples.items():
        part = ad.AnnData(X=adata[:, genes].X.copy(),
                          obs=pd.DataFrame(index=[f"{name}:{o}" for o in adata.obs_names]),
                          var=pd.DataFrame(index=genes))
        part.obs["sample"] = name
        parts.append(part)
    pooled = ad.concat(parts, axis=0)
    pooled.obs["sample"] = pd.Categorical(pooled.obs["sample"])
    pooled.uns["log1p"] = {"base": None}
    table = sc.pp.highly_variable_genes(pooled, flavor="seurat", n_top_genes=n_genes,
                                        batch_key="sample", inplace=False)
    table = table.assign(gene=genes)
    table = table[table["highly_variable"].astype(bool)]
    table = table.sort_values(["highly_variable_nbatches", "dispersions_norm", "gene"],
                              ascending=[False, False, True], kind="mergesort",
                              na_position="last")
    return list(table["gene"].iloc[:n_genes])


def _listed(samples: Mapping[str, ad.AnnData], genes: Sequence[str] | None,
            path: str | Path) -> list[str]:
    if not genes:
        raise InputError(path, "method 'list' needs a non-empty gene list")
    genes = [str(g) for g in genes]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise InputError(path, f"gene panel lists genes more than once: {', '.join(dup)}")
    problems = []
    for name, adata in samples.items():
        present = set(adata.var_names)
        missing = [g for g in genes if g not in present]
        if missing:
            problems.append(f"sample {name!r} lacks {len(missing)} panel gene(s): "
                            f"{', '.join(missing)}")
    if problems:
        raise InputError(path, "gene panel genes absent from samples: " + "; ".join(problems))
    return genes


def select_genes(samples: Mapping[str, ad.AnnData], *, method: str = "top_mean",
                 n_genes: int = 250, genes: Sequence[str] | None = None,
                 exclude_patterns: Sequence[str] = (),
                 measured: Mapping[str, Sequence[str]] | None = None,
                 path: str | Path = "gene panel") -> list[str]:
    """Choose the gene panel from ``samples`` (``X`` = log-normalised expression): in the
    workflow, one fold's training samples only, so no test section enters the choice.

    ``method``: ``"top_mean"`` (highest mean expression pooled over all spots of all samples,
    ties broken by gene name), ``"hvg"`` (scanpy ``flavor="seurat"`` highly variable genes with
    one batch per sample) or ``"list"`` (exactly ``genes``, each of which must exist in every
    sample). ``exclude_patterns`` (regexes, e.g. ``["^MT-", "^RP[SL]"]``) remove matching
    candidates for ``top_mean``/``hvg``; an explicit list is used as given. Returns genes in rank
    order (most expressed / most variable first).

    ``measured``: sample name -> gene names of further sections (in the workflow the fold's test
    sections) that the panel must be scorable on: candidates (and a listed panel) are limited to
    genes those tables hold. Only the names are used, never an expression value, so the ranking
    comes from ``samples`` alone.
    """
    if method not in GENE_SELECTION_METHODS:
        raise InputError(path, f"unknown gene selection method {method!r}; "
                               f"choose one of {', '.join(GENE_SELECTION_METHODS)}")
    if not samples:
        raise InputError(path, "no samples given for gene selection")
    _check_samples(samples, path)
    if method == "list":
        if exclude_patterns:
            log.info("%s: exclude_patterns are not applied to an explicit gene list", path)
        panel = _listed(samples, genes, path)
        for name, names in (measured or {}).items():
            missing = [g for g in panel if g not in set(names)]
            if missing:
                raise InputError(path, f"gene panel genes absent from sample {name!r}: "
                                       f"{', '.join(missing)}")
        log.info("%s: using the given list of %d genes", path, len(panel))
        return panel

    if n_genes < 1:
        raise InputError(path, f"n_genes must be at least 1, got {n_genes}")
    candidates = _exclude(shared_genes(samples, path=path), exclude_patterns, path)
    for name, names in (measured or {}).items():
        names = set(names)
        lacking = [g for g in candidates if g not in names]
        if lacking:
            log.info("%s: %d candidate genes are not in the table of sample %r and cannot be "
                     "scored there; not candidates", path, len(lacking), name)
        candidates = [g for g in candidates if g in names]
    if not candidates:
        raise InputError(path, "no candidate gene left after exclude_patterns")
    if n_genes > len(candidates):
        log.warning("%s: asked for %d genes but only %d shared candidates exist; using all",
                    path, n_genes, len(candidates))
        n_genes = len(candidates)
    panel = (_top_mean if method == "top_mean" else _hvg)(samples, candidates, n_genes)
    log.info("%s: selected %d genes by %s from %d shared candidates over %d samples",
             path, len(panel), method, len(candidates), len(samples))
    return panel


# --------------------------------------------------------------------------- panel files
def write_gene_panel(genes: Sequence[str], path: str | Path) -> None:
    """Write a gene panel TSV with columns ``gene`` and ``rank`` (1-based)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"gene": [str(g) for g in genes],
                          "rank": np.arange(1, len(genes) + 1)})
    table.to_csv(path, sep="\t", index=False)


def read_gene_panel(path: str | Path) -> list[str]:
    """Read a gene panel TSV (column ``gene``, optional ``rank``); genes in rank order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "gene panel file not found")
    table = pd.read_csv(path, sep="\t", comment="#", dtype={"gene": str})
    if "gene" not in table.columns:
        raise InputError(path, f"gene panel needs a 'gene' column; found {list(table.columns)}")
    if table["gene"].isna().any():
        raise InputError(path, "gene panel has empty gene names")
    if "rank" in table.columns:
        table = table.sort_values("rank", kind="mergesort")
    genes = [g.strip() for g in table["gene"]]
    if not genes:
        raise InputError(path, "gene panel is empty")
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise InputError(path, f"gene panel lists genes more than once: {', '.join(dup)}")
    return genes


def expression_matrix(adata: ad.AnnData, genes: Sequence[str], *,
                      path: str | Path = "spots.h5ad") -> np.ndarray:
    """Dense float32 (n_spots, n_genes) of ``adata.X`` restricted to ``genes``, in that order."""
    genes = list(genes)
    present = set(adata.var_names)
    missing = [g for g in genes if g not in present]
    if missing:
        raise InputError(path, f"{len(missing)} panel gene(s) missing: {', '.join(missing)}")
    x = adata[:, genes].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)
