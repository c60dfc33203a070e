"""The one in-memory sample type every platform reader returns, and its on-disk form.

Geometry contract
-----------------
* ``spots.obsm["spatial"]``: float64 (n, 2) spot centres as (x, y) in **level-0 pixels** of the
  slide image (x = column, y = row).
* ``spots.obs["diameter_um"]``: spot diameter (discs) or side length (square bins) in
  micrometres; ``spots.obs["shape"]``: ``"disc"`` or ``"square"`` (axis-aligned in level-0
  pixels, e.g. Visium HD bins). A table without the column holds discs.
* ``spots.X``: raw integer counts (scipy CSR, int32/int64 values); ``obs_names`` are the source
  spot names (``{x}x{y}`` for legacy ST, barcodes for Visium); ``var_names`` unique gene symbols.
* ``spots.uns["histomap"]``: dict(sample, platform, mpp, spot_diameter_um, spot_shape, image)
  where ``mpp`` is micrometres per level-0 pixel and ``image`` the source image path; a
  ``note`` says when the image is not the full-resolution one (Visium hires/lowres PNG).
* ``highres`` (optional): point-like high-resolution measurements (synthetic cells, Xenium
  transcript bins) as AnnData of raw counts with ``obsm["spatial"]`` in level-0 pixels; summing
  its rows inside any disc or bin gives ground truth at that scale. Measured bins (Visium HD)
  carry ``obs["bin_size_um"]``: the rows of each bin size are ground truth at that size as they
  are, and the finest ones serve as the points for any other size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

UNS_KEY = "histomap"
SHAPES = ("disc", "square")


@dataclass
class Sample:
    name: str
    platform: str
    image_path: Path
    mpp: float
    spots: ad.AnnData
    highres: ad.AnnData | None = None

    @property
    def spot_diameter_um(self) -> float:
        return float(self.spots.uns[UNS_KEY]["spot_diameter_um"])

    @property
    def spot_radius_px(self) -> float:
        return self.spot_diameter_um / 2.0 / self.mpp


def annotate_spots(spots: ad.AnnData, *, sample: str, platform: str, mpp: float,
                   spot_diameter_um: float, image: str | Path, spot_shape: str = "disc",
                   note: str | None = None) -> ad.AnnData:
    """Attach the geometry metadata of the contract above (in place) and return ``spots``.

    ``spot_shape`` ("disc" or "square") is the sample's spot shape; square bins get an
    ``obs["shape"]`` column where the table has none (tables of discs may go without).
    """
    if spot_shape not in SHAPES:
        raise ValueError(f"spot_shape must be one of {SHAPES}, got {spot_shape!r}")
    spots.uns[UNS_KEY] = {
        "sample": str(sample),
        "platform": str(platform),
        "mpp": float(mpp),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_shape": spot_shape,
        "image": str(image),
    }
    if note:
        spots.uns[UNS_KEY]["note"] = str(note)
    if "diameter_um" not in spots.obs:
        spots.obs["diameter_um"] = float(spot_diameter_um)
    if "shape" not in spots.obs and spot_shape != "disc":
        spots.obs["shape"] = spot_shape
    if "shape" in spots.obs:
        spots.obs["shape"] = pd.Categorical(spots.obs["shape"].astype(str),
                                            categories=list(SHAPES))
    spots.obsm["spatial"] = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    return spots


def square_mask(adata: ad.AnnData) -> np.ndarray:
    """(n,) bool: which rows are square bins (``obs["shape"] == "square"``; no column: discs)."""
    if "shape" not in adata.obs:
        return np.zeros(adata.n_obs, dtype=bool)
    shapes = adata.obs["shape"].astype(str).to_numpy()
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"obs['shape'] must be one of {SHAPES}, found {unknown}")
    return shapes == "square"


def geometry(adata: ad.AnnData) -> dict:
    """The ``uns["histomap"]`` geometry dict of a spots/predictions AnnData."""
    return dict(adata.uns[UNS_KEY])
