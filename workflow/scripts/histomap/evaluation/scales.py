"""Ground truth at any spot scale, for the cross-scale benchmark (train at one spot size, score
at others).

Arrow: spots or bins at any scale (ground truth side) -> metrics.

A sample whose ``highres.h5ad`` holds point-like measurements (synthetic cells, Xenium
transcript bins) can be re-measured with discs of any diameter: the discs sit on a square
lattice over the measured area (spacing ``max(diameter, min_spacing_um)``, so small discs are
not tens of thousands), each disc sums the counts of the points inside it
(:func:`histomap.data.aggregate.aggregate_discs`, exact).

**Every lattice disc whose centre lies in the H&E tissue mask is scored**, low-count and empty
ones included (a 2 um disc between cells, in adipose tissue or a lumen measures nothing, and a
model is scored on predicting that). Each disc is normalised like the training spots
(:func:`histomap.data.preprocess.normalise_spots`: ``log1p(counts / total * target_sum)`` with
the training ``target_sum``); an empty disc has no library to divide by and is all zeros (its
log1p of zero counts). No QC removes a disc from the truth: ``obs["qc_pass"]`` only marks the
discs that pass the spot QC (``min_counts``, ``min_genes``), and :func:`qc_discs` keeps those
as the targets of mixed-scale training (``train_diameters_um``).

Measured bins (Visium HD: ``highres.obs["bin_size_um"]``) are ground truth as they are: at a size
equal to a measured bin size the truth is those square bins (every bin whose centre lies in
tissue, no lattice), and any other size is re-measured with discs from the finest bins, as from
points.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.aggregate import aggregate_discs
from histomap.data.sample import UNS_KEY, annotate_spots, geometry
from histomap.data.scanpy_spatial import carry_scanpy_spatial
from histomap.errors import InputError

log = logging.getLogger(__name__)


def lattice_centres(points_px: np.ndarray, spacing_px: float) -> tuple[np.ndarray, list[str]]:
    """Centres (level-0 px) of the cells of a square lattice anchored at the image origin
    (cell ``(r, c)`` spans ``[c, c + 1) x [r, r + 1)`` spacings) that cover the bounding box
    of ``points_px``, and their names ``r{row}_c{col}``."""
    points_px = np.asarray(points_px, dtype=np.float64)
    first = np.floor(points_px.min(axis=0) / spacing_px).astype(np.int64)
    last = np.floor(points_px.max(axis=0) / spacing_px).astype(np.int64)
    cols, rows = np.arange(first[0], last[0] + 1), np.arange(first[1], last[1] + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    centres = np.column_stack([(cc.ravel() + 0.5) * spacing_px, (rr.ravel() + 0.5) * spacing_px])
    return centres, [f"r{r}_c{c}" for r, c in zip(rr.ravel(), cc.ravel())]


def normalise_discs(discs: ad.AnnData, *, target_sum: float, min_counts: float = 0,
                    min_genes: int = 0) -> ad.AnnData:
    """Every disc normalised like the training spots, none dropped (see module docstring).

    ``discs.X``: raw counts. Returns a copy with ``X = log1p(counts / total * target_sum)``
    (float32 CSR; an empty disc is all zeros), ``layers["counts"]``, ``obs`` ``total_counts``,
    ``n_genes`` and ``qc_pass`` (``total_counts >= min_counts``, ``n_genes >= min_genes``,
    ``total_counts > 0``), and the normalisation and QC records of :func:`normalise_spots`."""
    if target_sum <= 0:
        raise ValueError(f"target_sum must be positive, got {target_sum}")
    counts = sp.csr_matrix(discs.X)
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    n_genes = np.asarray((counts > 0).sum(axis=1)).ravel().astype(np.int64)
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    norm = sp.csr_matrix(sp.diags(scale) @ counts.astype(np.float64))
    norm.data = np.log1p(norm.data)
    out = discs.copy()
    out.X = norm.astype(np.float32)
    out.layers["counts"] = counts.copy()
    out.obs["total_counts"] = total
    out.obs["n_genes"] = n_genes
    out.obs["qc_pass"] = (total >= min_counts) & (n_genes >= min_genes) & (total > 0)
    uns = dict(out.uns.get(UNS_KEY, {}))
    uns["normalisation"] = {"target_sum": float(target_sum), "log1p": True,
                            "empty_discs": "zeros"}
    uns["qc"] = {"min_counts": float(min_counts), "min_genes": int(min_genes),
                 "n_spots_in": int(out.n_obs), "n_spots_dropped": 0,
                 "n_qc_fail_kept": int((~out.obs["qc_pass"]).sum()),
                 "n_empty": int((total == 0).sum())}
    out.uns[UNS_KEY] = uns
    out.uns["log1p"] = {"base": None}
    return out


def qc_discs(truth: ad.AnnData) -> ad.AnnData:
    """The discs of a cross-scale truth that pass the spot QC (``obs["qc_pass"]``): the targets
    of mixed-scale training, which like every training spot table holds no empty spot."""
    kept = truth[truth.obs["qc_pass"].to_numpy(bool)].copy()
    kept.uns[UNS_KEY]["qc"] = {**kept.uns[UNS_KEY]["qc"],
                               "n_spots_dropped": int(truth.n_obs - kept.n_obs)}
    return kept


def discs_in_tissue(centres_px: np.ndarray, tissue: tuple[np.ndarray, float] | None,
                    mpp: float) -> np.ndarray:
    """Bool mask of the disc centres (level-0 px of a slide with ``mpp`` um/px) on a tissue
    pixel of ``tissue`` = (mask, um per mask pixel), as
    :func:`histomap.data.tiling.tissue_mask` returns it (``None``: all)."""
    centres_px = np.asarray(centres_px, dtype=np.float64)
    if tissue is None:
        return np.ones(len(centres_px), dtype=bool)
    mask, mask_um = tissue
    px0 = float(mask_um) / float(mpp)
    col = np.floor(centres_px[:, 0] / px0).astype(np.int64)
    row = np.floor(centres_px[:, 1] / px0).astype(np.int64)
    inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    keep = np.zeros(len(centres_px), dtype=bool)
    keep[inside] = np.asarray(mask, bool)[row[inside], col[inside]]
    return keep


def truth_at_scale(highres: ad.AnnData, spots: ad.AnnData, diameter_um: float, *,
                   min_spacing_um: float, preprocess: Mapping,
                   tissue: tuple[np.ndarray, float] | None = None,
                   path: str | Path = "highres") -> ad.AnnData:
    """Normalised discs of ``diameter_um`` measured from ``highres`` (see module docstring).

    ``spots`` (the sample's normalised training-scale spots) gives the geometry (mpp, sample,
    image); ``preprocess``: ``target_sum`` as for the training spots, ``min_counts`` and
    ``min_genes`` for ``obs["qc_pass"]``; ``tissue``: the slide's tissue mask as (mask, um per
    mask pixel), :func:`histomap.data.tiling.tissue_mask`; every lattice disc whose centre lies
    in it is kept (``None``: every lattice disc over the measured area).
    """
    if diameter_um <= 0 or min_spacing_um <= 0:
        raise ValueError(f"diameter and spacing must be positive, got {diameter_um}, "
                         f"{min_spacing_um}")
    if highres.n_obs == 0:
        raise InputError(path, "has no high-resolution measurements: cross-scale ground truth "
                               "needs a platform with cells or transcripts (synthetic, xenium) "
                               "or finer bins (visium_hd)")
    geo = geometry(spots)
    mpp = float(geo["mpp"])
    if "bin_size_um" in highres.obs:
        sizes = highres.obs["bin_size_um"].to_numpy(dtype=np.float64)
        same = np.isclose(sizes, float(diameter_um), rtol=1e-6)
        if same.any():
            return _measured_bins(highres[same], spots, float(diameter_um), preprocess, tissue,
                                  path)
        highres = highres[sizes == sizes.min()]
    spacing_um = max(float(diameter_um), float(min_spacing_um))
    centres, names = lattice_centres(np.asarray(highres.obsm["spatial"]), spacing_um / mpp)
    inside = discs_in_tissue(centres, tissue, mpp)
    if not inside.any():
        raise InputError(path, f"no {diameter_um:g} um lattice disc lies in the tissue mask of "
                               "the slide: the high-resolution data and the slide do not overlap")
    centres, names = centres[inside], [n for n, k in zip(names, inside) if k]
    counts = aggregate_discs(highres, centres, diameter_um / 2 / mpp)
    discs = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"d{diameter_um:g}_{n}" for n in names]),
                       var=pd.DataFrame(index=highres.var_names.copy()))
    discs.obsm["spatial"] = centres
    annotate_spots(discs, sample=geo["sample"], platform=geo["platform"], mpp=mpp,
                   spot_diameter_um=float(diameter_um), image=geo.get("image", ""))
    out = normalise_discs(discs, target_sum=float(preprocess.get("target_sum", 1e4)),
                          min_counts=float(preprocess.get("min_counts", 1)),
                          min_genes=int(preprocess.get("min_genes", 1)))
    qc = out.uns[UNS_KEY]["qc"]
    log.info("%s: %g um discs every %g um: %d of %d lattice discs lie in tissue and are all "
             "ground truth (%d empty, scored as zeros; %d below the spot QC, scored too)",
             path, diameter_um, spacing_um, out.n_obs, len(inside), qc["n_empty"],
             qc["n_qc_fail_kept"])
    return carry_scanpy_spatial(out, spots, spot_diameter_um=float(diameter_um), mpp=mpp)


def _measured_bins(bins: ad.AnnData, spots: ad.AnnData, side_um: float, preprocess: Mapping,
                   tissue: tuple[np.ndarray, float] | None, path: str | Path) -> ad.AnnData:
    """Normalised ground truth from measured square bins of side ``side_um``: every bin whose
    centre lies in the tissue mask, normalised like the lattice discs (empty bins are zeros)."""
    geo = geometry(spots)
    mpp = float(geo["mpp"])
    centres = np.asarray(bins.obsm["spatial"], dtype=np.float64)
    inside = discs_in_tissue(centres, tissue, mpp)
    if not inside.any():
        raise InputError(path, f"no {side_um:g} um bin lies in the tissue mask of the slide")
    bins = bins[inside]
    truth = ad.AnnData(X=bins.X.copy(), obs=pd.DataFrame(index=bins.obs_names.copy()),
                       var=pd.DataFrame(index=bins.var_names.copy()))
    truth.obsm["spatial"] = centres[inside]
    annotate_spots(truth, sample=geo["sample"], platform=geo["platform"], mpp=mpp,
                   spot_diameter_um=float(side_um), image=geo.get("image", ""),
                   spot_shape="square")
    out = normalise_discs(truth, target_sum=float(preprocess.get("target_sum", 1e4)),
                          min_counts=float(preprocess.get("min_counts", 1)),
                          min_genes=int(preprocess.get("min_genes", 1)))
    log.info("%s: %g um measured square bins: %d of %d lie in tissue and are all ground truth "
             "(%d empty, scored as zeros)", path, side_um, out.n_obs, len(inside),
             out.uns[UNS_KEY]["qc"]["n_empty"])
    return carry_scanpy_spatial(out, spots, spot_diameter_um=float(side_um), mpp=mpp)
