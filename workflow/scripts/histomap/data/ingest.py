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
from histomap.data.sample import MAX_DROPPED_FRACTION, UNS_KEY, Sample, check_dropped
from histomap.data.scanpy_spatial import (HIRES_MAX_PX, carry_scanpy_spatial, scanpy_spatial,
                                          slide_thumbnail)
from histomap.data.slide import open_slide, prepare_slide
from histomap.data.spatial_data import sample_spatialdata, write_spatialdata
from histomap.data.tiling import tissue_fraction, tissue_mask
from histomap.disk_space import check_bin_table_space
from histomap.errors import InputError
from histomap.outputs import remove_path

log = logging.getLogger(__name__)

HIGHRES_POINT_UM = 10.0  # marker size scanpy draws a cell or fine bin of highres.h5ad with
MIN_SPOTS_ON_TISSUE = 0.5  # default of config ingest.min_spots_on_tissue
SPOT_TISSUE_FRACTION = 0.1  # a spot is on tissue when this much of its box is tissue


def check_spots_in_slide(sample: Sample, width: int, height: int) -> None:
    xy = sample.spots.obsm["spatial"]
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if outside.any():
        names = list(sample.spots.obs_names[outside][:5])
        raise InputError(sample.image_path, f"{int(outside.sum())} spot centres lie outside the "
                                            f"{width}x{height} px image (e.g. {names})")


def check_spots_on_tissue(sample: Sample, slide, *, min_fraction: float = MIN_SPOTS_ON_TISSUE,
                          mask_mpp: float = 16.0) -> float | None:
    """Fail unless at least ``min_fraction`` of the spots lie on tissue; returns that share.

    A spot is on tissue when at least :data:`SPOT_TISSUE_FRACTION` of the square around its disc
    is tissue in the slide's tissue mask (:func:`histomap.data.tiling.tissue_mask` at
    ``mask_mpp``, the tiling's mask). Spots mostly on background mean the image does not belong
    to the spots: transposed, mirrored, another section's, or the wrong scale. No tissue at all
    is left to ``tile_slide`` to report; ``min_fraction`` 0 turns the check off.
    """
    spots = sample.spots
    if min_fraction <= 0 or spots.n_obs == 0:
        return None
    mask, mask_um = tissue_mask(slide, mask_mpp=mask_mpp)
    if not mask.any():
        log.warning("%s: no tissue found in the image; the spots-on-tissue check is skipped",
                    sample.name)
        return None
    mask_px0 = mask_um / sample.mpp
    side0 = max(sample.spot_diameter_um / sample.mpp, mask_px0)
    xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    covered = tissue_fraction(mask, mask_px0, xy[:, 0] - side0 / 2, xy[:, 1] - side0 / 2, side0)
    share = float(np.mean(covered >= SPOT_TISSUE_FRACTION))
    log.info("%s: %.0f%% of %d spots lie on tissue (tissue mask at %.1f um/px)", sample.name,
             100 * share, spots.n_obs, mask_um)
    if share < min_fraction:
        raise InputError(sample.image_path, (
            f"only {100 * share:.0f}% of the {spots.n_obs} spots of sample {sample.name!r} lie "
            f"on tissue (at least {100 * min_fraction:.0f}% expected, "
            "ingest.min_spots_on_tissue): most spot centres fall on background, so this image "
            "does not match the spot coordinates. Is it transposed, mirrored, of another "
            "section, or at another scale (mpp)?"))
    return share


def ingest_sample(*, platform: str, sample: str, path: str | Path, out_dir: str | Path,
                  mpp: float | None = None, spot_diameter_um: float | None = None,
                  image: str | Path | None = None, spatialdata_mpp: float | None = 4.0,
                  sheet: str | Path = "samples.tsv",
                  reader_options: dict | None = None,
                  max_dropped_fraction: float = MAX_DROPPED_FRACTION,
                  min_spots_on_tissue: float = MIN_SPOTS_ON_TISSUE,
                  mask_mpp: float = 16.0) -> Sample:
    """Write ``slide.tif``, ``spots.h5ad``, ``highres.h5ad`` and ``sample.zarr`` to ``out_dir``.

    ``highres.h5ad`` has zero rows for platforms without high-resolution measurements.
    ``reader_options``: platform-specific reader arguments (e.g. Xenium ``min_qv``).
    ``max_dropped_fraction``: the most of a sample's spots or barcodes a reader may drop for
    lack of counts or a position (:func:`histomap.data.sample.check_dropped`);
    ``min_spots_on_tissue``: the least share of spots on the tissue mask at ``mask_mpp``
    (:func:`check_spots_on_tissue`).
    """
    out_dir = Path(out_dir)
    smp = read_sample(platform, sample, path, mpp=mpp, spot_diameter_um=spot_diameter_um,
                      image=image, sheet=sheet, **(reader_options or {}))
    smp.spots.uns[UNS_KEY].setdefault("dropped", {})
    smp.spots.uns[UNS_KEY]["source"] = str(path)  # later errors name the user's input
    check_dropped(smp.spots, max_dropped_fraction)
    if smp.highres is not None and smp.highres.n_obs:  # the 2 um bins (or cells): large
        check_bin_table_space(out_dir / "highres.h5ad", smp.highres.n_obs,
                              _nnz(smp.highres.X), _bin_um(smp.highres))
    out_dir.mkdir(parents=True, exist_ok=True)  # after reading: bad input leaves no folder
    slide_path = out_dir / "slide.tif"
    smp.mpp = prepare_slide(smp.image_path, slide_path, smp.mpp)
    smp.spots.uns[UNS_KEY]["mpp"] = smp.mpp
    try:
        with open_slide(slide_path) as slide:
            check_spots_in_slide(smp, *slide.dimensions)
            on_tissue = check_spots_on_tissue(smp, slide, min_fraction=min_spots_on_tissue,
                                              mask_mpp=mask_mpp)
    except InputError:
        remove_path(slide_path)  # nothing partial: the slide alone looks like a finished ingest
        raise
    if on_tissue is not None:
        smp.spots.uns[UNS_KEY]["on_tissue_fraction"] = on_tissue
    log.info("%s: %d spots x %d genes, mpp %.4f, spot diameter %s um", sample, smp.spots.n_obs,
             smp.spots.n_vars, smp.mpp, smp.spot_diameter_um)
    hires, scalef = slide_thumbnail(slide_path, HIRES_MAX_PX)
    # an H&E-only sample (platform `he`) has no spots: one hires pixel stands in for the spot
    # size, and every table made on it (apply) sets its own
    spot_px = smp.spot_diameter_um / smp.mpp if smp.spot_diameter_um else 1.0 / scalef
    smp.spots.uns["spatial"] = {sample: scanpy_spatial(
        hires, scalef, spot_px,
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


def _nnz(matrix) -> int:
    return int(matrix.nnz) if hasattr(matrix, "nnz") else int(np.count_nonzero(matrix))


def _bin_um(table: ad.AnnData) -> float:
    """The finest bins' side (um) where the table records it, else 0 (cells)."""
    for column in ("bin_size_um", "diameter_um"):
        if column in table.obs:
            return float(np.min(table.obs[column].to_numpy(np.float64)))
    return float(dict(table.uns.get("bins", {})).get("bin_um", 0.0))
