"""Ingest one sample: platform reader -> OpenSlide pyramid + spots AnnData + SpatialData zarr.

Arrow of the DESIGN.md picture: raw sample -> **ingest**. ``sample.zarr`` is the sample's
SpatialData (:mod:`histomap.data.spatial_data`: multiscale H&E, spot circles in micrometres,
counts table; coordinate systems ``global`` in um and ``pixels``); ``spots.h5ad`` carries
scanpy's ``uns["spatial"]`` (:mod:`histomap.data.scanpy_spatial`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np

from histomap.data.io import read_sample
from histomap.data.sample import UNS_KEY, Sample
from histomap.data.scanpy_spatial import (HIRES_MAX_PX, carry_scanpy_spatial, scanpy_spatial,
                                          slide_thumbnail)
from histomap.data.slide import open_slide, prepare_slide
from histomap.data.spatial_data import sample_spatialdata, write_spatialdata
from histomap.errors import InputError

log = logging.getLogger(__name__)

HIGHRES_POINT_UM = 10.0  # marker size scanpy draws a cell or fine bin of highres.h5ad with


def check_spots_in_slide(sample: Sample, width: int, height: int) -> None:
    xy = sample.spots.obsm["spatial"]
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if outside.any():
        names = list(sample.spots.obs_names[outside][:5])
        raise InputError(sample.image_path, f"{int(outside.sum())} spot centres lie outside the "
                                            f"{width}x{height} px image (e.g. {names})")


def ingest_sample(*, platform: str, sample: str, path: str | Path, out_dir: str | Path,
                  mpp: float | None = None, spot_diameter_um: float | None = None,
                  image: str | Path | None = None, spatialdata_mpp: float | None = 4.0,
                  sheet: str | Path = "samples.tsv",
                  reader_options: dict | None = None) -> Sample:
    """Write ``slide.tif``, ``spots.h5ad``, ``highres.h5ad`` and ``sample.zarr`` to ``out_dir``.

    ``highres.h5ad`` has zero rows for platforms without high-resolution measurements.
    ``reader_options``: platform-specific reader arguments (e.g. Xenium ``min_qv``).
    """
    out_dir = Path(out_dir)
    smp = read_sample(platform, sample, path, mpp=mpp, spot_diameter_um=spot_diameter_um,
                      image=image, sheet=sheet, **(reader_options or {}))
    out_dir.mkdir(parents=True, exist_ok=True)  # after reading: bad input leaves no folder
    slide_path = out_dir / "slide.tif"
    smp.mpp = prepare_slide(smp.image_path, slide_path, smp.mpp)
    smp.spots.uns[UNS_KEY]["mpp"] = smp.mpp
    with open_slide(slide_path) as slide:
        check_spots_in_slide(smp, *slide.dimensions)
    log.info("%s: %d spots x %d genes, mpp %.4f, spot diameter %g um", sample, smp.spots.n_obs,
             smp.spots.n_vars, smp.mpp, smp.spot_diameter_um)
    hires, scalef = slide_thumbnail(slide_path, HIRES_MAX_PX)
    smp.spots.uns["spatial"] = {sample: scanpy_spatial(
        hires, scalef, smp.spot_diameter_um / smp.mpp,
        {"source_image_path": str(smp.image_path), "mpp": smp.mpp})}
    smp.spots.write_h5ad(out_dir / "spots.h5ad")
    highres = smp.highres if smp.highres is not None else ad.AnnData(
        np.zeros((0, 0), dtype=np.int32))
    highres.uns[UNS_KEY] = dict(smp.spots.uns[UNS_KEY])
    if highres.n_obs:
        carry_scanpy_spatial(highres, smp.spots, spot_diameter_um=HIGHRES_POINT_UM, mpp=smp.mpp)
    highres.write_h5ad(out_dir / "highres.h5ad")
    write_spatialdata(sample_spatialdata(smp.spots, slide_path, mpp=smp.mpp,
                                         image_mpp=spatialdata_mpp), out_dir / "sample.zarr")
    return smp
