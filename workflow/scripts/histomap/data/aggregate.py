"""Ground truth at any resolution (ingest, truth_at_scale, readers of Xenium and Visium HD): sum a
point-like high-resolution AnnData (simulated cells, Xenium transcripts, fine bins) into discs of
any size (:func:`aggregate_discs`, :func:`disc_membership`) or square bins
(:func:`aggregate_bins`). Exact for counts.
"""
from __future__ import annotations

import itertools
import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)


def disc_membership(points_px: np.ndarray, centres_px: np.ndarray,
                    radius_px: float) -> sp.csr_matrix:
    """(n_discs, n_points) 0/1 CSR: point centre within ``radius_px`` (inclusive) of a disc."""
    points_px = np.asarray(points_px, np.float64)
    centres_px = np.asarray(centres_px, np.float64).reshape(-1, 2)
    n_points = len(points_px)
    if n_points == 0 or len(centres_px) == 0:
        return sp.csr_matrix((len(centres_px), n_points), dtype=np.int8)
    hits = cKDTree(points_px).query_ball_point(centres_px, r=radius_px)
    lengths = np.fromiter((len(h) for h in hits), np.int64, len(hits))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.fromiter(itertools.chain.from_iterable(hits), np.int64, int(indptr[-1]))
    data = np.ones(len(indices), np.int8)
    m = sp.csr_matrix((data, indices, indptr), shape=(len(centres_px), n_points))
    m.sort_indices()
    return m


def _as_csr(matrix) -> sp.csr_matrix:
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))


def aggregate_discs(highres: ad.AnnData, centres_px: np.ndarray, radius_px: float, *,
                    layer: str | None = None) -> sp.csr_matrix:
    """Sum the rows (``X`` or ``layers[layer]``) of point-like ``highres`` whose centre
    (``obsm["spatial"]``, px) lies inside each disc; (n_discs, n_genes) CSR, exact for counts."""
    values = _as_csr(highres.X if layer is None else highres.layers[layer])
    member = disc_membership(highres.obsm["spatial"], centres_px, radius_px)
    return (member.astype(values.dtype) @ values).tocsr()


def aggregate_bins(highres: ad.AnnData, bin_um: float, mpp: float,
                   origin: tuple[float, float] = (0.0, 0.0),
                   shape: tuple[int, int] | None = None, *,
                   keep_empty: bool = False) -> ad.AnnData:
    """Sum point-like ``highres`` rows into square bins of side ``bin_um``.

    The grid starts at ``origin`` (x, y) level-0 px and has ``shape`` = (n_rows, n_cols) bins
    (default: enough to reach the last point). A point belongs to bin (row, col) when
    ``origin + col*side <= x < origin + (col+1)*side`` (same for y), ``side = bin_um / mpp`` px;
    points outside the grid are dropped (logged). Returns bins (only non-empty ones unless
    ``keep_empty``) with X (CSR) and every layer summed, obs row, col, n_points, diameter_um,
    obsm["spatial"] = bin centres (px), obs_names ``bin_{row}x{col}``.
    """
    if bin_um <= 0 or mpp <= 0:
        raise ValueError(f"bin_um and mpp must be positive, got {bin_um}, {mpp}")
    side = bin_um / mpp
    xy = np.asarray(highres.obsm["spatial"], np.float64)
    col = np.floor((xy[:, 0] - origin[0]) / side).astype(np.int64)
    row = np.floor((xy[:, 1] - origin[1]) / side).astype(np.int64)
    if shape is None:
        shape = (int(row.max()) + 1 if len(row) else 0, int(col.max()) + 1 if len(col) else 0)
    n_rows, n_cols = int(shape[0]), int(shape[1])
    inside = (row >= 0) & (row < n_rows) & (col >= 0) & (col < n_cols)
    if (~inside).any():
        log.info("aggregate_bins: %d of %d points lie outside the %dx%d grid of %g um bins; "
                 "dropped", int((~inside).sum()), len(xy), n_rows, n_cols, bin_um)
    bin_id = row[inside] * n_cols + col[inside]
    ids = np.arange(n_rows * n_cols) if keep_empty else np.unique(bin_id)
    member = sp.csr_matrix((np.ones(len(bin_id), np.int8),
                            (np.searchsorted(ids, bin_id), np.flatnonzero(inside))),
                           shape=(len(ids), len(xy)))
    values = _as_csr(highres.X)
    X = (member.astype(values.dtype) @ values).tocsr()
    layers = {}
    for name, layer in highres.layers.items():
        summed = member.astype(layer.dtype) @ layer
        layers[name] = summed.tocsr() if sp.issparse(summed) else np.asarray(summed)
    b_row, b_col = ids // max(n_cols, 1), ids % max(n_cols, 1)
    obs = pd.DataFrame({"row": b_row, "col": b_col,
                        "n_points": np.asarray(member.sum(axis=1)).ravel().astype(np.int64),
                        "diameter_um": float(bin_um)},
                       index=pd.Index([f"bin_{r}x{c}" for r, c in zip(b_row, b_col)]))
    bins = ad.AnnData(X=X, obs=obs, var=highres.var.copy(), layers=layers)
    bins.obsm["spatial"] = np.column_stack([origin[0] + (b_col + 0.5) * side,
                                            origin[1] + (b_row + 0.5) * side])
    bins.uns["bins"] = {"bin_um": float(bin_um), "mpp": float(mpp),
                        "origin_px": [float(origin[0]), float(origin[1])],
                        "shape": [n_rows, n_cols]}
    return bins
