"""The one in-memory sample type every platform reader returns, and its on-disk form.

Geometry contract
-----------------
* ``spots.obsm["spatial"]``: float64 (n, 2) spot centres as (x, y) in **level-0 pixels** of the
  slide image (x = column, y = row).
* ``spots.obs["diameter_um"]``: spot (or bin) diameter in micrometres (bins: side length).
* ``spots.X``: raw integer counts (scipy CSR, int32/int64 values); ``obs_names`` are the source
  spot names (``{x}x{y}`` for legacy ST, barcodes for Visium); ``var_names`` unique gene symbols.
* ``spots.uns["histomap"]``: dict(sample, platform, mpp, spot_diameter_um, image) where ``mpp``
  is micrometres per level-0 pixel and ``image`` the source image path.
* ``highres`` (optional): point-like high-resolution measurements (synthetic cells, Xenium
  transcript bins) as AnnData of raw counts with ``obsm["spatial"]`` in level-0 pixels; summing
  its rows inside any disc or bin gives ground truth at that scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

UNS_KEY = "histomap"


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
                   spot_diameter_um: float, image: str | Path) -> ad.AnnData:
    """Attach the geometry metadata of the contract above (in place) and return ``spots``."""
    spots.uns[UNS_KEY] = {
        "sample": str(sample),
        "platform": str(platform),
        "mpp": float(mpp),
        "spot_diameter_um": float(spot_diameter_um),
        "image": str(image),
    }
    if "diameter_um" not in spots.obs:
        spots.obs["diameter_um"] = float(spot_diameter_um)
    spots.obsm["spatial"] = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    return spots


def geometry(adata: ad.AnnData) -> dict:
    """The ``uns["histomap"]`` geometry dict of a spots/predictions AnnData."""
    return dict(adata.uns[UNS_KEY])
