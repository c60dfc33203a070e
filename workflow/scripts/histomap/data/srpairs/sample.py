"""SR pairs of one sample at one factor, by platform: what the build_sr_pairs rule calls.

Arrow: ingest outputs (``spots.h5ad`` or ``highres.h5ad``, slide) -> **SR pairs**: spot grids go
to :mod:`histomap.data.srpairs.spot_grid`, point data to :mod:`histomap.data.srpairs.points`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad

from histomap.data.srpairs.points import build_sr_pairs
from histomap.data.srpairs.spot_grid import build_spot_grid_pairs
from histomap.errors import InputError

log = logging.getLogger(__name__)


SPOT_GRID_PLATFORMS = ("legacy_st", "visium")


def build_sample_pairs(platform: str, counts_h5ad: str | Path, slide: str | Path,
                       genes: Sequence[str], out_zarr: str | Path, *, scale: int,
                       pairs_cfg: Mapping[str, Any], sample: str = "",
                       n_genes: int | None = None) -> dict[str, Any]:
    """SR pairs of one sample at ``scale``: spot grids (legacy ST, Visium: ``counts_h5ad`` =
    raw spots) pool ``scale x scale`` neighbouring spots; point data (synthetic cells, Xenium
    bins: ``counts_h5ad`` = highres.h5ad) are binned at ``lr_um / scale``. ``n_genes``: keep the
    first genes of the (ranked) panel only."""
    genes = list(genes)
    if n_genes is not None and n_genes < len(genes):
        log.info("using the first %d of the panel's %d genes: %s", n_genes, len(genes),
                 ", ".join(genes[:n_genes]))
        genes = genes[:int(n_genes)]
    counts = ad.read_h5ad(counts_h5ad)
    common = {"normalisation": pairs_cfg.get("normalisation", "log1p")}
    if platform in SPOT_GRID_PLATFORMS:
        grid = dict(pairs_cfg.get("spot_grid") or {})
        return build_spot_grid_pairs(counts, slide, genes, out_zarr, factor=int(scale),
                                     patch_spots=int(grid.get("patch_spots", 16)),
                                     stride_spots=grid.get("stride_spots"),
                                     min_measured=float(grid.get("min_measured", 0.25)),
                                     image_mpp=float(grid.get("image_mpp", 8.0)),
                                     source_name=f"{sample or counts_h5ad} spots", **common)
    if counts.n_obs == 0:
        raise InputError(counts_h5ad, f"platform {platform!r} has no high-resolution "
                                      "measurements to make super-resolution pairs from")
    return build_sr_pairs(counts, slide, genes, out_zarr, patch_um=float(pairs_cfg["patch_um"]),
                          lr_um=float(pairs_cfg["lr_um"]), scale=int(scale),
                          stride_um=pairs_cfg.get("stride_um"),
                          min_tissue=float(pairs_cfg.get("min_tissue", 0.25)),
                          image_mpp=float(pairs_cfg.get("image_mpp", 2.0)),
                          edge=pairs_cfg.get("edge", "ceil"),
                          mask_mpp=float(pairs_cfg.get("mask_mpp", 8.0)),
                          source_name=f"{sample or counts_h5ad} highres", **common)
