"""Ground truth at any spot scale, for the cross-scale benchmark (train at one spot size, score
at others).

A sample whose ``highres.h5ad`` holds point-like measurements (synthetic cells, Xenium
transcript bins) can be re-measured with discs of any diameter: the discs sit on a square
lattice over the measured area (spacing ``max(diameter, min_spacing_um)``, so small discs are
not tens of thousands), each disc sums the counts of the points inside it
(:func:`histomap.data.synthetic.aggregate_discs`, exact), and the result is normalised exactly as the
training spots (:func:`histomap.data.preprocess.normalise_spots`: QC, library size, log1p). Discs
that QC removes (no or too few counts, e.g. a 2 um disc between cells) are logged by
``normalise_spots``; the number kept is logged here.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.preprocess import normalise_spots
from histomap.data.sample import annotate_spots, geometry
from histomap.data.scanpy_spatial import carry_scanpy_spatial
from histomap.data.synthetic import aggregate_discs
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


def truth_at_scale(highres: ad.AnnData, spots: ad.AnnData, diameter_um: float, *,
                   min_spacing_um: float, preprocess: Mapping, path: str | Path = "highres"
                   ) -> ad.AnnData:
    """Normalised spots of ``diameter_um`` measured from ``highres`` (see module docstring).

    ``spots`` (the sample's normalised training-scale spots) gives the geometry (mpp, sample,
    image); ``preprocess``: min_counts, min_genes, target_sum as for the training spots.
    """
    if diameter_um <= 0 or min_spacing_um <= 0:
        raise ValueError(f"diameter and spacing must be positive, got {diameter_um}, "
                         f"{min_spacing_um}")
    if highres.n_obs == 0:
        raise InputError(path, "has no high-resolution measurements: cross-scale ground truth "
                               "needs a platform with cells or transcripts (synthetic, xenium)")
    geo = geometry(spots)
    mpp = float(geo["mpp"])
    spacing_um = max(float(diameter_um), float(min_spacing_um))
    centres, names = lattice_centres(np.asarray(highres.obsm["spatial"]), spacing_um / mpp)
    counts = aggregate_discs(highres, centres, diameter_um / 2 / mpp)
    discs = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"d{diameter_um:g}_{n}" for n in names]),
                       var=pd.DataFrame(index=highres.var_names.copy()))
    discs.obsm["spatial"] = centres
    annotate_spots(discs, sample=geo["sample"], platform=geo["platform"], mpp=mpp,
                   spot_diameter_um=float(diameter_um), image=geo.get("image", ""))
    out = normalise_spots(discs, min_counts=int(preprocess.get("min_counts", 1)),
                          min_genes=int(preprocess.get("min_genes", 1)),
                          target_sum=float(preprocess.get("target_sum", 1e4)), path=path)
    log.info("%s: %g um discs every %g um: %d of %d lattice discs kept as ground truth",
             path, diameter_um, spacing_um, out.n_obs, discs.n_obs)
    return carry_scanpy_spatial(out, spots, spot_diameter_um=float(diameter_um), mpp=mpp)
