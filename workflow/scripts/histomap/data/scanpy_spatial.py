"""scanpy's ``uns["spatial"]`` for every spot or bin table the pipeline writes.

Arrow of the DESIGN.md picture: ingest (and every later table) -> files that open in scanpy and
squidpy. With it, ``sc.pl.spatial(adata, color=gene)`` and
``squidpy.pl.spatial_scatter(adata, color=gene)`` draw the spots over the H&E with no other
argument.

Convention (scanpy's, as ``sc.read_visium`` writes it): ``obsm["spatial"]`` holds (x, y) in
full-resolution image pixels (here: level-0 slide pixels, as everywhere in histomap), and

``uns["spatial"][library_id] = {"images": {"hires": (h, w, 3) uint8},
"scalefactors": {"tissue_hires_scalef": s, "spot_diameter_fullres": d},
"metadata": {...}}``

where ``s`` = hires pixels per level-0 pixel (the H&E downsampled so its longer side is at most
``HIRES_MAX_PX``) and ``d`` the table's spot (or bin) diameter in level-0 pixels. The library id
is the sample name. Tables derived from another (normalised spots, predictions, re-measured
truth) carry the source's image and set their own spot diameter (:func:`carry_scanpy_spatial`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from histomap.data.slide import open_slide, read_region

log = logging.getLogger(__name__)

HIRES_MAX_PX = 2000


def slide_thumbnail(slide_path: str | Path, max_px: int = HIRES_MAX_PX
                    ) -> tuple[np.ndarray, float]:
    """The whole slide as RGB uint8 with its longer side <= ``max_px`` (read from the
    pyramid, never at full resolution), and its scale factor (thumbnail px per level-0 px)."""
    with open_slide(slide_path) as slide:
        w0, h0 = slide.dimensions
        scalef = min(1.0, max_px / max(w0, h0))
        out_w, out_h = max(1, round(w0 * scalef)), max(1, round(h0 * scalef))
        image = read_region(slide, 0, 0, w0, h0, out_w, out_h)
    return np.ascontiguousarray(image), out_w / w0


def scanpy_spatial(image: np.ndarray, scalef: float, spot_diameter_px: float,
                   metadata: Mapping | None = None) -> dict:
    """One library's entry of ``uns["spatial"]`` (see the module docstring)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"hires image must be (h, w, 3|4), got {image.shape}")
    if not (scalef > 0 and spot_diameter_px > 0):
        raise ValueError(f"scale factor and spot diameter must be positive, got {scalef}, "
                         f"{spot_diameter_px}")
    return {"images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": float(scalef),
                             "spot_diameter_fullres": float(spot_diameter_px)},
            "metadata": {str(k): str(v) for k, v in (metadata or {}).items()}}


def add_scanpy_spatial(adata: ad.AnnData, slide_path: str | Path, *, library_id: str,
                       spot_diameter_um: float, mpp: float,
                       max_px: int = HIRES_MAX_PX) -> ad.AnnData:
    """Set ``adata.uns["spatial"]`` from the slide (in place; returns ``adata``)."""
    image, scalef = slide_thumbnail(slide_path, max_px)
    adata.uns["spatial"] = {str(library_id): scanpy_spatial(
        image, scalef, float(spot_diameter_um) / float(mpp),
        {"source_image_path": str(slide_path), "mpp": float(mpp)})}
    return adata


def carry_scanpy_spatial(dst: ad.AnnData, src: ad.AnnData | Mapping | None, *,
                         spot_diameter_um: float, mpp: float) -> ad.AnnData:
    """Copy the H&E of ``src``'s ``uns["spatial"]`` (an AnnData or that dict) into ``dst``,
    with ``spot_diameter_fullres`` set to ``dst``'s own spot diameter (in place).

    A source without ``uns["spatial"]`` (written before this contract) leaves ``dst`` as it
    is, with a warning: the table is still valid, scanpy then needs ``img_key=None``.
    """
    spatial = src.uns.get("spatial") if isinstance(src, ad.AnnData) else src
    if not spatial:
        log.warning("source table has no uns['spatial']: the output has no H&E for scanpy")
        return dst
    out = {}
    for library_id, entry in spatial.items():
        out[str(library_id)] = {
            "images": dict(entry.get("images", {})),
            "scalefactors": {**dict(entry.get("scalefactors", {})),
                             "spot_diameter_fullres": float(spot_diameter_um) / float(mpp)},
            "metadata": dict(entry.get("metadata", {})),
        }
    dst.uns["spatial"] = out
    return dst
