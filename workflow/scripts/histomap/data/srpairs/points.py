"""SR pairs of point data: cells, transcripts or fine bins (synthetic, Xenium, Visium HD).

Arrow: ``highres.h5ad`` + slide -> **SR pairs** (rule build_sr_pairs for platforms with
high-resolution measurements): the counts are binned on the global HR grid (pixel side
``lr_um / scale``), LR pixels are block sums of HR pixels, and patches tile the slide, kept when
enough of them is measured tissue.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from histomap.data.slide import open_slide, read_region
from histomap.data.srpairs.counts import as_csr, check_counts, gene_columns
from histomap.data.srpairs.grid import (
    Edge,
    PairGeometry,
    block_sum,
    pair_geometry,
    patch_starts,
    slide_geometry,
)
from histomap.data.srpairs.normalisation import (
    Normalisation,
    check_normalisation,
    median_library,
    normalised_pair,
)
from histomap.data.srpairs.store import FORMAT, pair_specs, write_pairs_zarr
from histomap.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class HRBins:
    """Global HR-grid bins holding counts: (row, col) sorted by row, counts (n, G), library."""
    row: np.ndarray
    col: np.ndarray
    counts: sp.csr_matrix
    library: np.ndarray

    def window(self, r0: int, c0: int, size: int, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense (G, size, size) counts and (size, size) library of the window at (r0, c0)."""
        lo, hi = np.searchsorted(self.row, [r0, r0 + size])
        sel = np.arange(lo, hi)
        sel = sel[(self.col[sel] >= c0) & (self.col[sel] < c0 + size)]
        rr, cc = self.row[sel] - r0, self.col[sel] - c0
        maps = np.zeros((n_genes, size, size), np.float64)
        maps[:, rr, cc] = self.counts[sel].toarray().T
        library = np.zeros((size, size), np.float64)
        library[rr, cc] = self.library[sel]
        return maps, library


def hr_bins(highres: ad.AnnData, genes: list[str], side_px: float, what: str) -> HRBins:
    """Sum the rows of ``highres`` (centres ``obsm["spatial"]`` px) into global HR bins of
    ``side_px`` level-0 px: selected genes and the library (all genes)."""
    xy = np.asarray(highres.obsm["spatial"], np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise InputError(what, "obsm['spatial'] must be finite (n, 2) level-0 pixel positions")
    values = as_csr(highres.X)
    check_counts(values, what)
    col = np.floor(xy[:, 0] / side_px).astype(np.int64)
    row = np.floor(xy[:, 1] / side_px).astype(np.int64)
    outside = (row < 0) | (col < 0)
    if outside.any():
        log.warning("%s: %d of %d rows lie at negative pixel positions; dropped", what,
                    int(outside.sum()), len(xy))
    keep = np.flatnonzero(~outside)
    key = row[keep] * (int(col.max(initial=0)) + 1) + col[keep]
    ids, member = np.unique(key, return_inverse=True)
    member = member.ravel()
    onehot = sp.csr_matrix((np.ones(len(keep)), (member, keep)), shape=(len(ids), len(xy)))
    gene_idx = highres.var_names.get_indexer(genes)
    counts = (onehot @ values[:, gene_idx].astype(np.float64)).tocsr()
    library = np.asarray(onehot @ np.asarray(values.sum(axis=1), np.float64)).ravel()
    n_cols = int(col.max(initial=0)) + 1
    b_row, b_col = ids // n_cols, ids % n_cols
    order = np.argsort(b_row, kind="stable")
    return HRBins(b_row[order], b_col[order], counts[order], library[order])


def _measured_box(highres: ad.AnnData, width0: int, height0: int) -> tuple[float, float, float,
                                                                           float]:
    """Level-0 box (x0, y0, x1, y1) where absence of counts means zero: the slide, cut to the
    highres bin grid when the input is binned (``uns["bins"]``)."""
    box = [0.0, 0.0, float(width0), float(height0)]
    bins = highres.uns.get("bins") if hasattr(highres, "uns") else None
    if bins:
        side = float(bins["bin_um"]) / float(bins["mpp"])
        ox, oy = (float(v) for v in bins["origin_px"])
        n_rows, n_cols = (int(v) for v in bins["shape"])
        box = [max(box[0], ox), max(box[1], oy), min(box[2], ox + n_cols * side),
               min(box[3], oy + n_rows * side)]
    return tuple(box)


def _measured_mask(box, r0: int, c0: int, size: int, side_px: float) -> np.ndarray:
    """HR pixels of the window lying entirely inside ``box``."""
    edges_y = (r0 + np.arange(size + 1)) * side_px
    edges_x = (c0 + np.arange(size + 1)) * side_px
    tol = 1e-6 * side_px
    ok_y = (edges_y[:-1] >= box[1] - tol) & (edges_y[1:] <= box[3] + tol)
    ok_x = (edges_x[:-1] >= box[0] - tol) & (edges_x[1:] <= box[2] + tol)
    return ok_y[:, None] & ok_x[None, :]


def _tissue_at(tissue: np.ndarray, tissue_px0: float, r0: int, c0: int, size: int,
               side_px: float) -> np.ndarray:
    """Tissue mask sampled at the centres of the window's HR pixels (outside: no tissue)."""
    cy = ((r0 + np.arange(size) + 0.5) * side_px / tissue_px0).astype(np.int64)
    cx = ((c0 + np.arange(size) + 0.5) * side_px / tissue_px0).astype(np.int64)
    h, w = tissue.shape
    ok_y, ok_x = (cy >= 0) & (cy < h), (cx >= 0) & (cx < w)
    out = np.zeros((size, size), bool)
    out[np.ix_(ok_y, ok_x)] = tissue[np.ix_(cy[ok_y], cx[ok_x])]
    return out


def _warn_unaligned_bins(highres: ad.AnnData, hr_um: float, source_name: str) -> None:
    """Log when the HR pixel is not a whole number of the input's bins (``uns["bins"]``)."""
    bins_meta = highres.uns.get("bins") if hasattr(highres, "uns") else None
    if bins_meta and not math.isclose(hr_um / float(bins_meta["bin_um"]),
                                      round(hr_um / float(bins_meta["bin_um"]))):
        log.warning("%s: HR pixel %g um is not a multiple of the input bins (%g um); each bin "
                    "is assigned to the HR pixel holding its centre", source_name, hr_um,
                    bins_meta["bin_um"])


def _plan_patches(highres: ad.AnnData, slide_path: Path, geo: PairGeometry, mpp: float,
                  slide_wh: tuple[int, int], *, tissue: bool, mask_mpp: float,
                  min_tissue: float) -> tuple[list[tuple], list[tuple]]:
    """(planned, kept) patches (r0, c0, mask, mask fraction) tiling the slide on the HR grid;
    the mask: HR pixels inside the measured box and, with ``tissue``, on the H&E tissue mask."""
    width0, height0 = slide_wh
    side = geo.hr_um / mpp
    total_rows, total_cols = math.ceil(height0 / side - 1e-9), math.ceil(width0 / side - 1e-9)
    box = _measured_box(highres, width0, height0)
    tissue_mask, tissue_px0 = None, 1.0
    if tissue:
        from histomap.data.tiling import tissue_mask as _tissue_mask

        with open_slide(slide_path) as slide:
            tissue_mask, tissue_mpp = _tissue_mask(slide, mask_mpp=mask_mpp)
        tissue_px0 = tissue_mpp / mpp

    plan = []
    for r0 in patch_starts(total_rows, geo.n_hr, geo.stride_lr * geo.scale):
        for c0 in patch_starts(total_cols, geo.n_hr, geo.stride_lr * geo.scale):
            mask = _measured_mask(box, r0, c0, geo.n_hr, side)
            if tissue_mask is not None:
                mask &= _tissue_at(tissue_mask, tissue_px0, r0, c0, geo.n_hr, side)
            plan.append((int(r0), int(c0), mask, float(mask.mean())))
    kept = [p for p in plan if p[3] >= min_tissue]
    log.info("%s: %d patches of %g um (%d LR px of %g um, %d HR px of %g um) on the slide grid; "
             "kept %d with mask fraction >= %g", slide_path.name, len(plan), geo.patch_um,
             geo.n_lr, geo.lr_um, geo.n_hr, geo.hr_um, len(kept), min_tissue)
    if not kept:
        raise InputError(slide_path, f"no patch has a tissue/measured fraction >= "
                                     f"{min_tissue} (best {max(p[3] for p in plan):.3f})")
    return plan, kept


def _patch_items(slide_path: Path, bins: HRBins, kept: Sequence[tuple], geo: PairGeometry,
                 side: float, he_px: int, normalisation: str, target: float
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of each kept patch: normalised HR and LR maps, H&E, mask and placement."""
    n_genes = bins.counts.shape[1]
    with open_slide(slide_path) as slide:
        for r0, c0, mask, fraction in kept:
            cover, cover_library = bins.window(r0, c0, geo.n_cover, n_genes)
            lr, lr_lib = block_sum(cover, geo.scale), block_sum(cover_library, geo.scale)
            hr, hr_lib = cover[:, :geo.n_hr, :geo.n_hr], cover_library[:geo.n_hr, :geo.n_hr]
            he = read_region(slide, c0 * side, r0 * side, geo.n_hr * side, geo.n_hr * side,
                             he_px, he_px)
            yield {**normalised_pair(normalisation, hr, lr, hr_lib, lr_lib, target, geo.scale),
                   "he": he.transpose(2, 0, 1), "mask": mask,
                   "origin_px": np.array([c0 * side, r0 * side]),
                   "origin_um": np.array([c0 * geo.hr_um, r0 * geo.hr_um]),
                   "grid_index": np.array([r0, c0]), "tissue_fraction": np.array(fraction)}


def build_sr_pairs(highres: ad.AnnData, slide_path: str | Path, genes: Sequence[str] | None,
                   out_zarr: str | Path, *, mpp: float | None = None, patch_um: float = 2560.0,
                   lr_um: float = 100.0, scale: int = 5, stride_um: float | None = None,
                   min_tissue: float = 0.25, normalisation: Normalisation = "minmax",
                   image_mpp: float = 2.0, edge: Edge = "floor", tissue: bool = True,
                   mask_mpp: float = 8.0, source_name: str = "highres") -> dict[str, Any]:
    """Write SR pairs of point-like or finely binned counts to ``out_zarr``; return its attrs.

    ``highres``: raw counts (cells, transcripts or fine bins) with ``obsm["spatial"]`` level-0 px
    of ``slide_path``; ``genes``: the channels (None: all); ``mpp``: um per level-0 px (None: the
    slide's; a different value is an error); ``scale``: HR pixel = ``lr_um / scale``;
    ``image_mpp``: um/px of the H&E patches; ``tissue``: require tissue (H&E mask at ``mask_mpp``)
    in ``mask``; ``min_tissue``: least mask fraction of a kept patch.
    """
    check_normalisation(normalisation)
    if not 0 <= min_tissue <= 1 or image_mpp <= 0:
        raise ValueError(f"need 0 <= min_tissue <= 1 and image_mpp > 0, got {min_tissue}, "
                         f"{image_mpp}")
    slide_path = Path(slide_path)
    genes = gene_columns(highres, genes, source_name)
    mpp, width0, height0 = slide_geometry(slide_path, mpp)
    geo = pair_geometry(patch_um, lr_um, scale, stride_um, edge)
    side = geo.hr_um / mpp
    _warn_unaligned_bins(highres, geo.hr_um, source_name)
    bins = hr_bins(highres, genes, side, source_name)
    plan, kept = _plan_patches(highres, slide_path, geo, mpp, (width0, height0), tissue=tissue,
                               mask_mpp=mask_mpp, min_tissue=min_tissue)
    # log1p storage scale: median non-zero HR library of the sample (models retarget it)
    target = median_library(bins.library)
    he_px = max(1, int(round(geo.patch_um / image_mpp)))
    n_genes = len(genes)
    hr_shape, lr_shape = (geo.n_hr, geo.n_hr), (geo.n_lr, geo.n_lr)
    specs = pair_specs(n_genes, hr_shape, lr_shape, (he_px, he_px), normalisation)
    attrs = {"format": FORMAT, "source": "points", "genes": genes, "lr_um": geo.lr_um,
             "hr_um": geo.hr_um, "scale": geo.scale, "patch_um": geo.patch_um,
             "patch_um_requested": float(patch_um), "stride_um": geo.stride_lr * geo.lr_um,
             "edge": edge, "normalisation": normalisation, "hr_target_sum": target,
             "lr_target_sum": target, "lr_units": "hr", "image_mpp": float(image_mpp),
             "he_px": he_px, "n_patches_dropped": len(plan) - len(kept),
             "hr_shape": list(hr_shape), "lr_shape": list(lr_shape), "slide": str(slide_path),
             "slide_mpp": float(mpp), "min_tissue": float(min_tissue), "tissue_mask": bool(tissue),
             "n_patches": len(kept)}
    items = _patch_items(slide_path, bins, kept, geo, side, he_px, normalisation, target)
    write_pairs_zarr(Path(out_zarr), len(kept), specs, items, attrs)
    log.info("wrote %d SR pairs (%d genes, %s normalisation) to %s", len(kept), n_genes,
             normalisation, out_zarr)
    return attrs
