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
  ``note`` says when the image is not the full-resolution one (Visium hires/lowres PNG);
  ``dropped`` (where a reader dropped spots it could not match): {what: dict(file, n, of,
  examples)}, checked against ``ingest.max_dropped_fraction`` by :func:`check_dropped`.
* ``highres`` (optional): point-like high-resolution measurements (synthetic cells, Xenium
  transcript bins) as AnnData of raw counts with ``obsm["spatial"]`` in level-0 pixels; summing
  its rows inside any disc or bin gives ground truth at that scale. Measured bins (Visium HD)
  carry ``obs["bin_size_um"]``: the rows of each bin size are ground truth at that size as they
  are, and the finest ones serve as the points for any other size.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.errors import InputError

log = logging.getLogger(__name__)

UNS_KEY = "histomap"
SHAPES = ("disc", "square")
MAX_DROPPED_FRACTION = 0.05  # default of config ingest.max_dropped_fraction


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


def source_image(spots_h5ad: str | Path) -> str | None:
    """The user's image recorded in an ingested ``spots.h5ad`` (``uns["histomap"]["image"]``),
    read without loading the table; None when the file or the record is missing."""
    import h5py

    try:
        with h5py.File(spots_h5ad, "r") as h5:
            value = h5[f"uns/{UNS_KEY}/image"][()]
    except (OSError, KeyError):
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def user_source(spots: ad.AnnData, path: str | Path) -> str:
    """Name for errors about ``spots`` read from the intermediate ``path``: the user's sample
    (``uns["histomap"]["source"]``, its sheet path, recorded at ingest) when known."""
    source = spots.uns.get(UNS_KEY, {}).get("source")
    return f"{source} (ingested as {path})" if source else str(path)


def dropped_entry(file: str | Path, n: int, of: int, examples: Sequence[str]) -> dict:
    """One kind of drop: ``n`` of ``of`` items of ``file`` lost (with a few example names)."""
    return {"file": str(file), "n": int(n), "of": int(of),
            "examples": [str(e) for e in list(examples)[:5]]}


def check_dropped(spots: ad.AnnData, max_fraction: float = MAX_DROPPED_FRACTION) -> dict:
    """Fail when a reader dropped more than ``max_fraction`` of any kind of item.

    ``spots.uns["histomap"]["dropped"]`` ({what: dict(file, n, of, examples)}, written by the
    readers) names the user's file; above the threshold an :class:`InputError` names it with the
    counts and examples, below it the drops are logged. Returns {what: n} (the per-sample counts
    the report shows).
    """
    meta = spots.uns.get(UNS_KEY, {})
    dropped: Mapping = meta.get("dropped", {}) or {}
    sample = meta.get("sample", "")
    for what, entry in dropped.items():
        n, of = int(entry["n"]), int(entry["of"])
        if not n:
            continue
        fraction = n / max(of, 1)
        examples = ", ".join(map(str, entry.get("examples", [])))
        if fraction > max_fraction:
            raise InputError(entry["file"], (
                f"{n} of {of} {what} ({100 * fraction:.1f}%, e.g. {examples}): more than "
                f"ingest.max_dropped_fraction = {max_fraction:g} would be lost. Check that the "
                "files belong to one section, or raise the threshold"))
        log.warning("%s: dropped %d of %d %s (%.1f%%, at most %g allowed) in %s, e.g. %s", sample,
                    n, of, what, 100 * fraction, max_fraction, entry["file"], examples)
    return {what: int(entry["n"]) for what, entry in dropped.items()}
