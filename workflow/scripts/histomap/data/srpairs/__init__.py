"""Super-resolution training pairs (Diff-ST and its baselines): LR map, HR map, H&E patch, mask.

One pair is a square of tissue seen four ways, all on the same footprint:

* ``hr`` (G, h, w): gene counts on the HR grid (pixel side ``hr_um = lr_um / scale``);
* ``lr`` (G, h_lr, w_lr): the *same counts* on the LR grid (pixel side ``lr_um``): each LR pixel
  measures exactly the sum of the ``scale x scale`` HR pixels it covers, i.e. a coarse
  measurement of the same tissue, not an interpolation. It is stored **in the HR map's units**
  (attr ``lr_units = "hr"``): the HR-unit estimate of an LR pixel is its sum / scale^2 (raw
  counts) or, log-normalised, the same library fraction scaled by the HR target sum, so that
  interpolating it (bicubic, TESLA) predicts the HR map in the truth's units and every learned
  method gets its input in those units too;
* ``he`` (3, H, W) uint8: the H&E (or morphology) patch at ``image_mpp`` um/px;
* ``mask`` (h, w) bool: HR pixels that are measured (fully inside the slide and the highres
  measurement area, or a measured spot for spot-grid data) and, for point data, tissue.

Geometry. The HR and LR grids are global: HR pixel (i, j) covers level-0 pixels
[j * s, (j + 1) * s) x [i * s, (i + 1) * s) with ``s = hr_um / mpp``; patches start on LR pixel
boundaries (strides are multiples of ``lr_um``), so the LR pixels of every patch are the sample's
fixed 100 um (say) measurement grid. Patches cover the slide like tiles (the last row/column may
run past the edge, where ``mask`` is False and the H&E is white) and are kept when their mask
fraction is >= ``min_tissue``.

Patch size. ``edge="floor"`` (default): the patch is ``floor(patch_um / lr_um)`` LR pixels and
``scale`` times as many HR pixels, so LR is exactly the sum of the patch's HR pixels (2560 um at
100 um gives 25 LR / 125 HR pixels; the flooring is logged). ``edge="ceil"`` reproduces the
Diff-ST layout (2.56 mm: 26 LR, 128 HR at 5x): the patch is ``floor(patch_um / hr_um)`` HR
pixels and ``ceil(h / scale)`` LR pixels; the last LR row/column then also covers tissue beyond
the HR patch and sums all of its HR pixels, as a real coarse measurement would.

Normalisation (``normalisation``), stored values and how to undo it:

* ``"log1p"`` (the default unit: log-normalised counts): ``log1p(x / library * target_sum)`` per
  pixel, library = total counts of all genes of the input in the pixel (LR: of the LR pixel);
  stored with ``target_sum`` = the median non-zero HR library of this sample (attrs
  ``hr_target_sum`` = ``lr_target_sum``), a storage scale only: a model re-expresses every pair
  with the target sum of its *training* pairs (:func:`retarget_log1p`,
  :func:`training_target_sum`), exactly, so no statistic of a test section enters its units;
  arrays ``hr_library``, ``lr_library`` give ``x = expm1(v) * library / target_sum``; 0 where
  the library is 0;
* ``"minmax"`` (the paper's protocol, Diff-ST's code): per patch and gene, ``(x - min) / (max -
  min)`` separately for HR and LR, 0 where the patch-gene is constant; arrays ``hr_min``,
  ``hr_max``, ``lr_min``, ``lr_max`` (n, G; ``lr_*`` of the LR sums) give ``x = v * (max - min) +
  min``. The truth is scaled by its own range, so RMSE in these units depends on that range;
* ``"none"``: raw counts as float32 (LR: sums / scale^2).

De-normalising: the truth back to counts uses its own stored statistics
(:func:`pairs_denormaliser`); a *prediction* is never scaled with statistics of the truth it is
scored against: :func:`prediction_denormaliser` uses the LR patch (min-max: the LR range /
scale^2; log1p: each HR pixel's library estimated as its LR pixel's library / scale^2) and the
model's training target sum.

LR-only inputs (:func:`build_lr_pairs`, attr ``source = "lr_only"``): a sample with spots and
H&E but no HR truth; its measured spot map is the LR map and the HR grid is ``scale`` times
finer; no ``hr`` array (nor ``hr_*`` statistics), everything else as below.

Zarr v3 group written by :func:`build_sr_pairs` and :func:`build_spot_grid_pairs` (one chunk per
patch; written under a temporary name and renamed): arrays ``lr``, ``hr``, ``he``, ``mask``,
``origin_px`` (n, 2) float64 level-0 (x, y) of the patch's top-left corner, ``origin_um``,
``grid_index`` (n, 2) int64 (row, col) of the patch's first HR pixel on the global HR grid,
``tissue_fraction`` (n,) and the normalisation arrays above; attrs ``format``, ``genes``,
``lr_um``, ``hr_um``, ``scale``, ``normalisation``, ``patch_um``, ``stride_um``, ``edge``,
``image_mpp``, ``slide``, ``slide_mpp``, ``source`` ("points" or "spot_grid"), ``lr_units``,
``n_patches`` (kept) and ``n_patches_dropped`` (planned patches below ``min_tissue``), shapes, ...
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.errors import InputError
from histomap.outputs import partial_path, remove_path

log = logging.getLogger(__name__)

FORMAT = "histomap-srpairs/1"
NORMALISATIONS = ("minmax", "log1p", "none")
Normalisation = Literal["minmax", "log1p", "none"]
Edge = Literal["floor", "ceil"]
LEGACY_SPOT_NAME = r"^\d+x\d+$"


# ============================================================================ geometry

@dataclass(frozen=True)
class PairGeometry:
    """Sizes of one pair, in pixels of each grid. ``n_cover = n_lr * scale`` HR pixels lie under
    the LR pixels (``>= n_hr``; equal for ``edge="floor"``)."""
    lr_um: float
    scale: int
    n_lr: int
    n_hr: int
    stride_lr: int

    @property
    def hr_um(self) -> float:
        return self.lr_um / self.scale

    @property
    def n_cover(self) -> int:
        return self.n_lr * self.scale

    @property
    def patch_um(self) -> float:
        return self.n_hr * self.hr_um


def pair_geometry(patch_um: float, lr_um: float, scale: int, stride_um: float | None = None,
                  edge: Edge = "floor") -> PairGeometry:
    """Pair sizes for a requested patch side (um); logs any flooring of the patch or stride."""
    if not (patch_um > 0 and lr_um > 0 and int(scale) == scale and scale >= 1):
        raise ValueError(f"need patch_um > 0, lr_um > 0, integer scale >= 1; got {patch_um}, "
                         f"{lr_um}, {scale}")
    scale = int(scale)
    hr_um = lr_um / scale
    if edge == "floor":
        n_lr = int(math.floor(patch_um / lr_um + 1e-9))
        n_hr = n_lr * scale
        if n_lr < 1:
            raise ValueError(f"patch_um {patch_um} is smaller than one LR pixel ({lr_um} um)")
        if not math.isclose(n_lr * lr_um, patch_um):
            log.warning("patch_um %g is not a multiple of lr_um %g: patches floored to %g um "
                        "(%d LR x %d HR pixels); edge='ceil' gives %d HR pixels instead",
                        patch_um, lr_um, n_lr * lr_um, n_lr, n_hr,
                        int(math.floor(patch_um / hr_um + 1e-9)))
    elif edge == "ceil":
        n_hr = int(math.floor(patch_um / hr_um + 1e-9))
        if n_hr < 1:
            raise ValueError(f"patch_um {patch_um} is smaller than one HR pixel ({hr_um} um)")
        n_lr = int(math.ceil(n_hr / scale))
        if not math.isclose(n_hr * hr_um, patch_um):
            log.warning("patch_um %g is not a multiple of hr_um %g: patches floored to %g um",
                        patch_um, hr_um, n_hr * hr_um)
        if n_lr * scale != n_hr:
            log.info("edge='ceil': %d HR pixels under %d LR pixels; the last LR row/column "
                     "extends %g um past the HR patch", n_hr, n_lr, (n_lr * scale - n_hr) * hr_um)
    else:
        raise ValueError(f"edge must be 'floor' or 'ceil', got {edge!r}")
    stride_um = n_lr * lr_um if stride_um is None else stride_um
    stride_lr = max(1, int(math.floor(stride_um / lr_um + 1e-9)))
    if not math.isclose(stride_lr * lr_um, stride_um):
        log.warning("stride_um %g floored to %g um, a multiple of lr_um so every patch sits on "
                    "the global LR grid", stride_um, stride_lr * lr_um)
    return PairGeometry(float(lr_um), scale, n_lr, n_hr, stride_lr)


def patch_starts(n_total: int, size: int, stride: int) -> np.ndarray:
    """Start indices of windows of ``size`` every ``stride`` covering ``n_total`` cells (the
    last window may run past the end)."""
    n = 1 + max(0, math.ceil((n_total - size) / stride))
    return np.arange(n, dtype=np.int64) * stride


def block_sum(maps: np.ndarray, factor: int) -> np.ndarray:
    """Sum (..., H, W) over non-overlapping ``factor x factor`` blocks (H, W divisible)."""
    *lead, h, w = maps.shape
    return maps.reshape(*lead, h // factor, factor, w // factor, factor).sum(axis=(-3, -1))


# ============================================================================ normalisation

def minmax(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene min-max of (G, H, W) to [0, 1] (0 for a constant gene): (scaled, min, max)."""
    lo = maps.min(axis=(1, 2))
    hi = maps.max(axis=(1, 2))
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (maps - lo[:, None, None]) / span[:, None, None]
    return scaled.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)


def log1p_normalise(maps: np.ndarray, library: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p(counts / library * target_sum) per pixel, 0 where the library is 0."""
    factor = np.divide(target_sum, library, out=np.zeros_like(library, dtype=np.float64),
                       where=library > 0)
    return np.log1p(maps * factor[None]).astype(np.float32)


def denormalise(values: np.ndarray, kind: str, *, lo=None, hi=None, library=None,
                target_sum=None) -> np.ndarray:
    """Counts from normalised maps (G, H, W) of one patch (see the module docstring)."""
    if kind == "minmax":
        lo, hi = np.asarray(lo)[:, None, None], np.asarray(hi)[:, None, None]
        return values * (hi - lo) + lo
    if kind == "log1p":
        return np.expm1(values) * np.asarray(library)[None] / float(target_sum)
    if kind == "none":
        return values
    raise ValueError(f"unknown normalisation {kind!r}")


def retarget_log1p(values, from_sum: float, to_sum: float):
    """Log1p maps stored with target sum ``from_sum`` re-expressed with ``to_sum`` (exact:
    ``log1p(expm1(v) * to / from)``); numpy arrays or torch tensors."""
    if to_sum is None or float(to_sum) == float(from_sum):
        return values
    ratio = float(to_sum) / float(from_sum)
    if isinstance(values, np.ndarray):
        return np.log1p(np.expm1(values.astype(np.float64)) * ratio).astype(values.dtype)
    return (values.double().expm1() * ratio).log1p().to(values.dtype)


def _median_library(library: np.ndarray) -> float:
    positive = library[library > 0]
    return float(np.median(positive)) if positive.size else 1.0


# ============================================================================ writing



def _write_zarr(out_zarr: Path, n: int, specs: dict[str, tuple[tuple[int, ...], str, tuple]],
                items: Iterator[dict[str, np.ndarray]], attrs: dict) -> None:
    """Write ``n`` patches (dicts of per-patch arrays) into arrays of ``specs`` (name ->
    (per-patch shape, dtype, dimension names)) under a temporary name, then rename."""
    out_zarr = Path(out_zarr)
    tmp = partial_path(out_zarr)
    out_zarr.parent.mkdir(parents=True, exist_ok=True)
    remove_path(tmp)
    try:
        root = zarr.open_group(tmp, mode="w")
        root.attrs.update(attrs)
        arrays = {name: root.create_array(name, shape=(n, *shape), dtype=dtype,
                                          chunks=(1, *shape) if shape else (max(n, 1),),
                                          fill_value=0, dimension_names=("patch", *dims))
                  for name, (shape, dtype, dims) in specs.items()}
        columns: dict[str, list[np.ndarray]] = {name: [] for name, (shape, _, _) in specs.items()
                                                if len(shape) <= 1}
        for i, item in enumerate(items):
            for name, value in item.items():
                if name in columns:
                    columns[name].append(np.asarray(value))
                else:
                    arrays[name][i] = value
        for name, values in columns.items():
            if values:
                arrays[name][:] = np.stack(values).astype(specs[name][1])
        remove_path(out_zarr)
        os.replace(tmp, out_zarr)
    finally:
        remove_path(tmp)


def _norm_specs(kind: str, n_genes: int, hr_shape, lr_shape, grids=("hr", "lr")) -> dict:
    if kind == "minmax":
        return {f"{g}_{s}": ((n_genes,), "float32", ("gene",))
                for g in grids for s in ("min", "max")}
    if kind == "log1p":
        shapes = {"hr": tuple(hr_shape), "lr": tuple(lr_shape)}
        return {f"{g}_library": (shapes[g], "float32", ("y", "x")) for g in grids}
    return {}


def _normalised(kind: str, hr: np.ndarray, lr: np.ndarray, hr_library: np.ndarray,
                lr_library: np.ndarray, target: float, scale: int
                ) -> dict[str, np.ndarray]:
    """Normalised HR and LR maps of one patch; the LR map (sums of scale x scale HR pixels) in
    the HR map's units (module docstring)."""
    low = _normalised_lr(kind, lr, lr_library, target, scale)
    if kind == "minmax":
        hr_n, hr_lo, hr_hi = minmax(hr)
        return {"hr": hr_n, "hr_min": hr_lo, "hr_max": hr_hi, **low}
    if kind == "log1p":
        return {"hr": log1p_normalise(hr, hr_library, target),
                "hr_library": hr_library.astype(np.float32), **low}
    return {"hr": hr.astype(np.float32), **low}


def _normalised_lr(kind: str, lr: np.ndarray, lr_library: np.ndarray, target: float,
                   scale: int) -> dict[str, np.ndarray]:
    """The LR map of one patch (counts: sums over ``scale x scale`` HR pixels) in the HR map's
    units, with its de-normalisation arrays (module docstring)."""
    if kind == "minmax":
        lr_n, lr_lo, lr_hi = minmax(lr)
        return {"lr": lr_n, "lr_min": lr_lo, "lr_max": lr_hi}
    if kind == "log1p":
        # the library fraction of an LR pixel, scaled like an HR pixel's (HR target sum)
        return {"lr": log1p_normalise(lr, lr_library, target),
                "lr_library": lr_library.astype(np.float32)}
    return {"lr": (lr / float(scale) ** 2).astype(np.float32)}


def _check_normalisation(kind: str) -> None:
    if kind not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {kind!r}")


# ============================================================================ point data

def _gene_columns(adata: ad.AnnData, genes: Sequence[str] | None, what: str) -> list[str]:
    if genes is None:
        return list(map(str, adata.var_names))
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise InputError(what, f"{len(missing)} requested genes are not measured, e.g. "
                               f"{', '.join(missing[:5])}")
    if len(set(genes)) != len(genes):
        raise InputError(what, "the gene list has duplicates")
    return genes


def _csr(matrix) -> sp.csr_matrix:
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))


def _check_values(values: sp.csr_matrix, what: str) -> None:
    data = values.data
    if data.size and (not np.isfinite(data).all() or (data < 0).any()):
        raise InputError(what, "counts must be finite and non-negative")


@dataclass
class _HRBins:
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


def hr_bins(highres: ad.AnnData, genes: list[str], side_px: float, what: str) -> _HRBins:
    """Sum the rows of ``highres`` (centres ``obsm["spatial"]`` px) into global HR bins of
    ``side_px`` level-0 px: selected genes and the library (all genes)."""
    xy = np.asarray(highres.obsm["spatial"], np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise InputError(what, "obsm['spatial'] must be finite (n, 2) level-0 pixel positions")
    values = _csr(highres.X)
    _check_values(values, what)
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
    return _HRBins(b_row[order], b_col[order], counts[order], library[order])


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


def _slide_geometry(slide_path: Path, mpp: float | None) -> tuple[float, int, int]:
    with open_slide(slide_path) as slide:
        found = slide_mpp(slide, slide_path)
        width0, height0 = slide.dimensions
    if mpp is not None and not math.isclose(float(mpp), found, rel_tol=1e-3):
        raise InputError(slide_path, f"slide mpp {found:g} differs from the given mpp {mpp:g} of "
                                     "the count coordinates; they must share level-0 pixels")
    return float(mpp or found), int(width0), int(height0)


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
    _check_normalisation(normalisation)
    if not 0 <= min_tissue <= 1 or image_mpp <= 0:
        raise ValueError(f"need 0 <= min_tissue <= 1 and image_mpp > 0, got {min_tissue}, "
                         f"{image_mpp}")
    slide_path = Path(slide_path)
    genes = _gene_columns(highres, genes, source_name)
    mpp, width0, height0 = _slide_geometry(slide_path, mpp)
    geo = pair_geometry(patch_um, lr_um, scale, stride_um, edge)
    side = geo.hr_um / mpp
    bins_meta = highres.uns.get("bins") if hasattr(highres, "uns") else None
    if bins_meta and not math.isclose(geo.hr_um / float(bins_meta["bin_um"]),
                                      round(geo.hr_um / float(bins_meta["bin_um"]))):
        log.warning("%s: HR pixel %g um is not a multiple of the input bins (%g um); each bin "
                    "is assigned to the HR pixel holding its centre", source_name, geo.hr_um,
                    bins_meta["bin_um"])
    bins = hr_bins(highres, genes, side, source_name)
    total_rows, total_cols = math.ceil(height0 / side - 1e-9), math.ceil(width0 / side - 1e-9)
    box = _measured_box(highres, width0, height0)
    tissue_mask, tissue_px0 = None, 1.0
    if tissue:
        from histomap.data.tiling import tissue_mask as _tissue_mask

        with open_slide(slide_path) as slide:
            tissue_mask, tissue_mpp = _tissue_mask(slide, mask_mpp=mask_mpp)
        tissue_px0 = tissue_mpp / mpp

    plan = []
    for r0 in patch_starts(total_rows, geo.n_hr, geo.stride_lr * scale):
        for c0 in patch_starts(total_cols, geo.n_hr, geo.stride_lr * scale):
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

    # log1p storage scale: median non-zero HR library of the sample (models retarget it)
    target = _median_library(bins.library)
    he_px = max(1, int(round(geo.patch_um / image_mpp)))
    n_genes = len(genes)
    hr_shape, lr_shape = (geo.n_hr, geo.n_hr), (geo.n_lr, geo.n_lr)

    def items() -> Iterator[dict[str, np.ndarray]]:
        with open_slide(slide_path) as slide:
            for r0, c0, mask, fraction in kept:
                cover, cover_library = bins.window(r0, c0, geo.n_cover, n_genes)
                lr, lr_lib = block_sum(cover, scale), block_sum(cover_library, scale)
                hr, hr_lib = cover[:, :geo.n_hr, :geo.n_hr], cover_library[:geo.n_hr, :geo.n_hr]
                he = read_region(slide, c0 * side, r0 * side, geo.n_hr * side, geo.n_hr * side,
                                 he_px, he_px)
                yield {**_normalised(normalisation, hr, lr, hr_lib, lr_lib, target, scale),
                       "he": he.transpose(2, 0, 1), "mask": mask,
                       "origin_px": np.array([c0 * side, r0 * side]),
                       "origin_um": np.array([c0 * geo.hr_um, r0 * geo.hr_um]),
                       "grid_index": np.array([r0, c0]), "tissue_fraction": np.array(fraction)}

    specs = {"lr": ((n_genes, *lr_shape), "float32", ("gene", "y", "x")),
             "hr": ((n_genes, *hr_shape), "float32", ("gene", "y", "x")),
             "he": ((3, he_px, he_px), "uint8", ("c", "y", "x")),
             "mask": (hr_shape, "bool", ("y", "x")),
             "origin_px": ((2,), "float64", ("xy",)), "origin_um": ((2,), "float64", ("xy",)),
             "grid_index": ((2,), "int64", ("rowcol",)), "tissue_fraction": ((), "float32", ()),
             **_norm_specs(normalisation, n_genes, hr_shape, lr_shape)}
    attrs = {"format": FORMAT, "source": "points", "genes": genes, "lr_um": geo.lr_um,
             "hr_um": geo.hr_um, "scale": geo.scale, "patch_um": geo.patch_um,
             "patch_um_requested": float(patch_um), "stride_um": geo.stride_lr * geo.lr_um,
             "edge": edge, "normalisation": normalisation, "hr_target_sum": target,
             "lr_target_sum": target, "lr_units": "hr", "image_mpp": float(image_mpp),
             "he_px": he_px, "n_patches_dropped": len(plan) - len(kept),
             "hr_shape": list(hr_shape), "lr_shape": list(lr_shape), "slide": str(slide_path),
             "slide_mpp": float(mpp), "min_tissue": float(min_tissue), "tissue_mask": bool(tissue),
             "n_patches": len(kept)}
    _write_zarr(Path(out_zarr), len(kept), specs, items(), attrs)
    log.info("wrote %d SR pairs (%d genes, %s normalisation) to %s", len(kept), n_genes,
             normalisation, out_zarr)
    return attrs


# ============================================================================ spot grids

def spot_lattice(spots: ad.AnnData, what: str = "spots") -> tuple[np.ndarray, np.ndarray, str]:
    """Integer lattice (row, col) of each spot and how it was found.

    ``array_row``/``array_col`` (Visium: doubled hex columns, ``array_row + array_col`` always
    even, are halved so neighbouring spots of a row are adjacent pixels), else
    ``array_y``/``array_x`` (legacy ST reader), else ``{x}x{y}`` spot names (legacy ST).
    """
    obs = spots.obs
    if {"array_row", "array_col"} <= set(obs.columns):
        row = obs["array_row"].to_numpy(np.int64)
        col = obs["array_col"].to_numpy(np.int64)
        parity = (row + col) % 2
        if len(row) > 1 and (parity == parity[0]).all() and np.unique(row).size > 1:
            return row, col // 2, "array_row/array_col (hex, columns halved)"
        return row, col, "array_row/array_col"
    if {"array_x", "array_y"} <= set(obs.columns):
        return (np.rint(obs["array_y"].to_numpy(float)).astype(np.int64),
                np.rint(obs["array_x"].to_numpy(float)).astype(np.int64), "array_x/array_y")
    names = pd.Series(spots.obs_names.astype(str))
    if len(names) and names.str.fullmatch(LEGACY_SPOT_NAME).all():
        xy = names.str.split("x", expand=True).astype(np.int64).to_numpy()
        return xy[:, 1], xy[:, 0], "{x}x{y} spot names"
    raise InputError(what, "no spot lattice: need obs array_row/array_col, array_x/array_y or "
                           "spot names {x}x{y}")


# a fitted odd-row offset below this share of a lattice step is position jitter (square grids,
# e.g. HER2ST), at or above it a hexagonal stagger (Visium: half a step)
STAGGER_MIN_STEPS = 0.25


def _lattice_affine(spots: ad.AnnData, row: np.ndarray, col: np.ndarray, what: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """((2, 3) least-squares map of (1, col, row) to level-0 (x, y) px, (2,) stagger px).

    A stagger of odd rows (hexagonal lattices: half a pitch) is fitted as a separate term and
    left out of the map, so it is not mistaken for a rotation of the lattice. It is returned
    (level-0 px added to every spot of an odd lattice row) when it is at least
    :data:`STAGGER_MIN_STEPS` of a lattice step, else zero (jitter of a square grid).
    """
    design = np.column_stack([np.ones(len(row)), col, row]).astype(np.float64)
    if len(row) < 3 or np.linalg.matrix_rank(design) < 3:
        raise InputError(what, "need at least 3 spots spanning two lattice rows and columns to "
                               "place the lattice on the slide")
    odd = (row % 2).astype(np.float64)
    if 0 < odd.sum() < len(odd):
        design = np.column_stack([design, odd])
    coef, *_ = np.linalg.lstsq(design, np.asarray(spots.obsm["spatial"], np.float64), rcond=None)
    stagger = np.zeros(2)
    if len(coef) == 4:
        step = min(np.linalg.norm(coef[1]), np.linalg.norm(coef[2]))
        if np.linalg.norm(coef[3]) >= STAGGER_MIN_STEPS * step:
            stagger = coef[3].copy()
            log.info("%s: odd lattice rows are staggered by (%.1f, %.1f) px (hexagonal lattice); "
                     "each spot is one HR pixel and the H&E of odd rows is read shifted by the "
                     "stagger, so every HR pixel sits on its spot's tissue", what, *stagger)
        elif np.abs(coef[3]).max() > 1e-3 * step:
            log.info("%s: odd lattice rows are offset by (%.2f, %.2f) px, under %g of a step: "
                     "position jitter of a square lattice, no stagger", what, *coef[3],
                     STAGGER_MIN_STEPS)
    return coef[:3].T, stagger  # affine rows: x, y; columns: 1, col, row


def _lattice_axes(affine: np.ndarray, what: str) -> tuple[bool, float, float]:
    """(transposed, px per lattice column step, px per row step; signed) of the lattice axes."""
    (_, bx, cx), (_, by, cy) = affine
    transposed = abs(by) > abs(bx)
    col_step, row_step = (by, cx) if transposed else (bx, cy)
    off = max(abs(cx if not transposed else cy), abs(by if not transposed else bx))
    if off > 0.05 * min(abs(col_step), abs(row_step)):
        log.warning("%s: the spot lattice is rotated on the slide (off-axis %.1f px per step vs "
                    "%.1f); H&E patches are read axis-aligned", what, off, min(abs(col_step),
                                                                             abs(row_step)))
    return transposed, float(col_step), float(row_step)


def _lattice_he(slide, affine: np.ndarray, axes: tuple[bool, float, float], r0: int, c0: int,
                n: int, out_hw: tuple[int, int], stagger: np.ndarray | None = None,
                n_rows: int | None = None) -> np.ndarray:
    """(3, H, W) H&E under lattice rows r0..r0+n_rows (default n), cols c0..c0+n, oriented
    like the lattice. With a non-zero ``stagger`` (hexagonal lattice) every lattice row is read
    as its own band, odd rows (``r % 2``) shifted by the stagger, so the image row band of a
    lattice row covers that row's spots."""
    n_rows = n if n_rows is None else n_rows
    if stagger is not None and np.any(stagger):
        h = out_hw[0]
        edges = [round(k * h / n_rows) for k in range(n_rows + 1)]
        bands = [_lattice_he(slide, affine + np.column_stack([stagger * ((r0 + k) % 2),
                                                              np.zeros((2, 2))]),
                             axes, r0 + k, c0, n, (max(1, edges[k + 1] - edges[k]), out_hw[1]),
                             n_rows=1)[:, :edges[k + 1] - edges[k]]
                 for k in range(n_rows)]
        return np.ascontiguousarray(np.concatenate(bands, axis=1))
    transposed, col_step, row_step = axes
    corners = np.array([[1, c, r] for c in (c0 - 0.5, c0 + n - 0.5)
                        for r in (r0 - 0.5, r0 + n_rows - 0.5)]) @ affine.T
    x0, y0 = corners[:, 0].min(), corners[:, 1].min()
    w0, h0 = np.ptp(corners[:, 0]), np.ptp(corners[:, 1])
    out_h, out_w = out_hw
    if transposed:  # lattice columns run along y
        rgb = read_region(slide, x0, y0, w0, h0, out_h, out_w).transpose(1, 0, 2)
    else:
        rgb = read_region(slide, x0, y0, w0, h0, out_w, out_h)
    if col_step < 0:
        rgb = rgb[:, ::-1]
    if row_step < 0:
        rgb = rgb[::-1]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


@dataclass
class SpotGrid:
    """A spot table as an image on its lattice: ``counts`` (G, n_rows + pad, n_cols + pad) of
    the chosen genes (0 where no spot), ``library`` (all genes) and ``measured`` on the same
    grid, lattice (row, col) shifted by (``r_min``, ``c_min``) to start at 0; ``affine`` (2, 3)
    maps (1, col, row) of the unshifted lattice to level-0 (x, y) px, odd rows shifted by
    ``stagger`` px; ``axes`` as :func:`_lattice_axes` gives them."""
    genes: list[str]
    mpp: float
    how: str
    counts: np.ndarray
    library: np.ndarray
    measured: np.ndarray
    affine: np.ndarray
    stagger: np.ndarray
    axes: tuple[bool, float, float]
    r_min: int
    c_min: int
    n_rows: int
    n_cols: int

    @property
    def pitch_col_um(self) -> float:
        return abs(self.axes[1]) * self.mpp

    @property
    def pitch_row_um(self) -> float:
        return abs(self.axes[2]) * self.mpp


def spot_grid(spots: ad.AnnData, slide_path: str | Path, genes: Sequence[str] | None, *,
              mpp: float | None = None, pad: int = 0, source_name: str = "spots") -> SpotGrid:
    """The spots' raw counts on their lattice (:class:`SpotGrid`), ``pad`` empty rows and
    columns appended (patches may run past the last spot)."""
    genes = _gene_columns(spots, genes, source_name)
    mpp, _, _ = _slide_geometry(Path(slide_path), mpp)
    values = _csr(spots.X)
    _check_values(values, source_name)
    row, col, how = spot_lattice(spots, source_name)
    affine, stagger = _lattice_affine(spots, row, col, source_name)
    axes = _lattice_axes(affine, source_name)
    r_min, c_min = int(row.min()), int(col.min())
    row, col = row - r_min, col - c_min
    if len(set(zip(row.tolist(), col.tolist()))) != len(row):
        raise InputError(source_name, f"several spots share a lattice position ({how})")
    n_rows, n_cols = int(row.max()) + 1, int(col.max()) + 1
    gene_idx = spots.var_names.get_indexer(genes)
    counts = np.zeros((len(genes), n_rows + pad, n_cols + pad), np.float64)
    counts[:, row, col] = values[:, gene_idx].toarray().T
    library = np.zeros(counts.shape[1:], np.float64)
    library[row, col] = np.asarray(values.sum(axis=1)).ravel()
    measured = np.zeros(counts.shape[1:], bool)
    measured[row, col] = True
    return SpotGrid(genes, float(mpp), how, counts, library, measured, affine, stagger, axes,
                    r_min, c_min, n_rows, n_cols)


def build_spot_grid_pairs(spots: ad.AnnData, slide_path: str | Path,
                          genes: Sequence[str] | None, out_zarr: str | Path, *,
                          mpp: float | None = None, factor: int = 2, patch_spots: int = 16,
                          stride_spots: int | None = None, min_measured: float = 0.25,
                          normalisation: Normalisation = "minmax", image_mpp: float = 2.0,
                          source_name: str = "spots") -> dict[str, Any]:
    """SR pairs of spot-grid data (legacy ST, Visium): HR = the spot lattice as an image (one
    pixel per spot, 0 where no spot was measured), LR = sums over ``factor x factor`` lattice
    blocks (stored in HR units), mask = measured spots. Patches are ``patch_spots`` lattice
    pixels (floored to a multiple of ``factor``, logged), kept when >= ``min_measured`` of them
    are measured spots. The H&E patch covers the lattice cells (spot pitch around each spot) at
    ``image_mpp``.

    Hexagonal lattices (Visium: odd rows shifted by half a pitch; attr ``stagger_px``): spots
    keep one HR pixel each in offset coordinates (row, column // 2), an LR pixel sums ``factor``
    neighbouring spots of each of ``factor`` rows, and the H&E of each lattice row is read
    shifted by that row's stagger, so HR pixel (r, c) and its H&E show the same tissue. A
    square lattice (HER2ST; fitted offset under a quarter step) has no stagger and gives the
    same pairs as before hexagonal lattices were handled.
    """
    _check_normalisation(normalisation)
    if factor < 1 or patch_spots < factor or image_mpp <= 0:
        raise ValueError(f"need factor >= 1, patch_spots >= factor, image_mpp > 0; got {factor}, "
                         f"{patch_spots}, {image_mpp}")
    slide_path = Path(slide_path)
    n_hr = (patch_spots // factor) * factor
    if n_hr != patch_spots:
        log.warning("patch_spots %d floored to %d, a multiple of factor %d", patch_spots, n_hr,
                    factor)
    grid = spot_grid(spots, slide_path, genes, mpp=mpp, pad=n_hr, source_name=source_name)
    genes, mpp, how = grid.genes, grid.mpp, grid.how
    lattice, library, measured = grid.counts, grid.library, grid.measured
    affine, axes, stagger = grid.affine, grid.axes, grid.stagger
    pitch_col_um, pitch_row_um = grid.pitch_col_um, grid.pitch_row_um
    r_min, c_min, n_rows, n_cols = grid.r_min, grid.c_min, grid.n_rows, grid.n_cols
    n_lr = n_hr // factor
    stride = max(1, (stride_spots or n_hr) // factor) * factor

    plan = [(int(r0), int(c0), float(measured[r0:r0 + n_hr, c0:c0 + n_hr].mean()))
            for r0 in patch_starts(n_rows, n_hr, stride)
            for c0 in patch_starts(n_cols, n_hr, stride)]
    kept = [p for p in plan if p[2] >= min_measured]
    log.info("%s: lattice %d x %d from %s (pitch %.1f x %.1f um); %d patches of %d spots, kept "
             "%d with >= %g measured", source_name, n_rows, n_cols, how, pitch_row_um,
             pitch_col_um, len(plan), n_hr, len(kept), min_measured)
    if not kept:
        raise InputError(source_name, f"no patch of {n_hr} x {n_hr} spots has >= "
                                      f"{min_measured:.0%} measured spots")
    target = _median_library(library)  # log1p storage scale (models retarget it)
    he_hw = (max(1, int(round(n_hr * pitch_row_um / image_mpp))),
             max(1, int(round(n_hr * pitch_col_um / image_mpp))))

    def items() -> Iterator[dict[str, np.ndarray]]:
        with open_slide(slide_path) as slide:
            for r0, c0, fraction in kept:
                hr = lattice[:, r0:r0 + n_hr, c0:c0 + n_hr]
                hr_lib = library[r0:r0 + n_hr, c0:c0 + n_hr]
                lr, lr_lib = block_sum(hr, factor), block_sum(hr_lib, factor)
                he = _lattice_he(slide, affine, axes, r0 + r_min, c0 + c_min, n_hr, he_hw,
                                 stagger)
                origin = np.array([1, c0 + c_min - 0.5, r0 + r_min - 0.5]) @ affine.T
                yield {**_normalised(normalisation, hr, lr, hr_lib, lr_lib, target,
                                     factor),
                       "he": he, "mask": measured[r0:r0 + n_hr, c0:c0 + n_hr],
                       "origin_px": origin, "origin_um": origin * mpp,
                       "grid_index": np.array([r0, c0]), "tissue_fraction": np.array(fraction)}

    hr_shape, lr_shape = (n_hr, n_hr), (n_lr, n_lr)
    specs = {"lr": ((len(genes), *lr_shape), "float32", ("gene", "y", "x")),
             "hr": ((len(genes), *hr_shape), "float32", ("gene", "y", "x")),
             "he": ((3, *he_hw), "uint8", ("c", "y", "x")),
             "mask": (hr_shape, "bool", ("y", "x")),
             "origin_px": ((2,), "float64", ("xy",)), "origin_um": ((2,), "float64", ("xy",)),
             "grid_index": ((2,), "int64", ("rowcol",)), "tissue_fraction": ((), "float32", ()),
             **_norm_specs(normalisation, len(genes), hr_shape, lr_shape)}
    attrs = {"format": FORMAT, "source": "spot_grid", "lattice": how, "genes": genes,
             "hr_um": pitch_col_um, "hr_um_row": pitch_row_um, "lr_um": pitch_col_um * factor,
             "scale": int(factor), "patch_spots": n_hr, "patch_um": n_hr * pitch_col_um,
             "stride_spots": stride, "edge": "floor", "normalisation": normalisation,
             "hr_target_sum": target, "lr_target_sum": target, "lr_units": "hr",
             "n_patches_dropped": len(plan) - len(kept),
             "image_mpp": float(image_mpp), "he_hw": list(he_hw), "hr_shape": list(hr_shape),
             "lr_shape": list(lr_shape), "slide": str(slide_path), "slide_mpp": float(mpp),
             "min_tissue": float(min_measured), "n_patches": len(kept),
             "lattice_origin": [int(r_min), int(c_min)],
             "stagger_px": [float(v) for v in stagger]}
    _write_zarr(Path(out_zarr), len(kept), specs, items(), attrs)
    log.info("wrote %d spot-grid SR pairs (%d genes) to %s", len(kept), len(genes), out_zarr)
    return attrs


# ============================================================================ LR only

def build_lr_pairs(spots: ad.AnnData, slide_path: str | Path, genes: Sequence[str],
                   out_zarr: str | Path, *, factor: int, n_lr: int, n_hr: int | None = None,
                   he_hw: Sequence[int], normalisation: Normalisation = "log1p",
                   target_sum: float | None = None, min_measured: float = 0.0,
                   mpp: float | None = None, trained_lr_um: float | None = None,
                   source_name: str = "spots") -> dict[str, Any]:
    """LR-only inputs of a sample with spots and H&E but no HR truth: the measured spot map IS
    the LR map (one LR pixel per spot, its lattice as in :func:`spot_grid`, shared with
    :func:`build_spot_grid_pairs`), and the output grid is ``factor`` times finer (HR pixel =
    the spot pitch / ``factor``). Patches of ``n_lr x n_lr`` spots tile the lattice; ``n_hr``
    (default ``n_lr * factor``; fewer: the model's ``edge="ceil"`` layout) HR pixels each;
    kept when they hold a measured spot (and >= ``min_measured`` of them are). ``he_hw``: the
    H&E patch size the model was trained with, covering the HR patch as in training. The LR map
    is stored in HR units like training pairs', log1p with ``target_sum`` (the model's, from
    its training pairs; never a statistic of this sample, which only falls back to its median
    spot library when None). ``mask``: HR pixels under a measured spot. No ``hr`` array (attr
    ``source`` = ``"lr_only"``, ``truth`` False): nothing to score. ``trained_lr_um``: the
    model's LR pixel; a spot pitch more than 10% off is logged (the model then upsamples maps
    of another scale than it learnt)."""
    _check_normalisation(normalisation)
    factor, n_lr = int(factor), int(n_lr)
    n_hr = n_lr * factor if n_hr is None else int(n_hr)
    if factor < 1 or n_lr < 1 or not (n_lr - 1) * factor < n_hr <= n_lr * factor:
        raise ValueError(f"need factor >= 1, n_lr >= 1 and (n_lr - 1) * factor < n_hr <= n_lr * "
                         f"factor; got {factor}, {n_lr}, {n_hr}")
    if spots.n_obs == 0:
        raise InputError(source_name, "no spots: super-resolution needs the sample's measured "
                                      "spots as its LR map (an H&E-only sample has none)")
    slide_path = Path(slide_path)
    grid = spot_grid(spots, slide_path, genes, mpp=mpp, pad=n_lr, source_name=source_name)
    pitch_col_um, pitch_row_um = grid.pitch_col_um, grid.pitch_row_um
    if trained_lr_um and not math.isclose(pitch_col_um, float(trained_lr_um), rel_tol=0.1):
        log.warning("%s: spot pitch %.1f um, but the model learnt to upsample %g um LR pixels "
                    "%dx; its output is on a %.2f um grid", source_name, pitch_col_um,
                    float(trained_lr_um), factor, pitch_col_um / factor)
    plan = [(int(r0), int(c0), float(grid.measured[r0:r0 + n_lr, c0:c0 + n_lr].mean()))
            for r0 in patch_starts(grid.n_rows, n_lr, n_lr)
            for c0 in patch_starts(grid.n_cols, n_lr, n_lr)]
    kept = [p for p in plan if p[2] > 0 and p[2] >= min_measured]
    log.info("%s: lattice %d x %d from %s (pitch %.1f x %.1f um) as the LR map; %d patches of "
             "%d x %d spots -> %d x %d HR pixels of %.2f um, %d hold measured spots",
             source_name, grid.n_rows, grid.n_cols, grid.how, pitch_row_um, pitch_col_um,
             len(plan), n_lr, n_lr, n_hr, n_hr, pitch_col_um / factor, len(kept))
    if not kept:
        raise InputError(source_name, f"no patch of {n_lr} x {n_lr} spots has >= "
                                      f"{min_measured:.0%} measured spots")
    if normalisation == "log1p" and target_sum is None:
        log.warning("%s: no training target sum given; log1p with this sample's median spot "
                    "library", source_name)
    target = float(target_sum) if target_sum is not None else _median_library(grid.library)
    he_hw = (int(he_hw[0]), int(he_hw[1]))
    # the H&E covers the HR patch, as in training: the patch's n_lr spots are read at the size
    # that puts its first n_hr / factor spots on he_hw, then cropped to them ("ceil" layout)
    read_hw = tuple(int(round(v * n_lr * factor / n_hr)) for v in he_hw)
    g = len(grid.genes)

    def items() -> Iterator[dict[str, np.ndarray]]:
        with open_slide(slide_path) as slide:
            for r0, c0, fraction in kept:
                lr = grid.counts[:, r0:r0 + n_lr, c0:c0 + n_lr]
                lr_lib = grid.library[r0:r0 + n_lr, c0:c0 + n_lr]
                measured = grid.measured[r0:r0 + n_lr, c0:c0 + n_lr]
                mask = np.repeat(np.repeat(measured, factor, axis=0), factor, axis=1)
                he = _lattice_he(slide, grid.affine, grid.axes, r0 + grid.r_min,
                                 c0 + grid.c_min, n_lr, read_hw, grid.stagger)
                he = np.ascontiguousarray(he[:, :he_hw[0], :he_hw[1]])
                origin = np.array([1, c0 + grid.c_min - 0.5, r0 + grid.r_min - 0.5]) \
                    @ grid.affine.T
                yield {**_normalised_lr(normalisation, lr, lr_lib, target, factor),
                       "he": he, "mask": mask[:n_hr, :n_hr], "origin_px": origin,
                       "origin_um": origin * grid.mpp,
                       "grid_index": np.array([r0 * factor, c0 * factor]),
                       "tissue_fraction": np.array(fraction)}

    hr_shape, lr_shape = (n_hr, n_hr), (n_lr, n_lr)
    specs = {"lr": ((g, *lr_shape), "float32", ("gene", "y", "x")),
             "he": ((3, *he_hw), "uint8", ("c", "y", "x")),
             "mask": (hr_shape, "bool", ("y", "x")),
             "origin_px": ((2,), "float64", ("xy",)), "origin_um": ((2,), "float64", ("xy",)),
             "grid_index": ((2,), "int64", ("rowcol",)), "tissue_fraction": ((), "float32", ()),
             **_norm_specs(normalisation, g, hr_shape, lr_shape, grids=("lr",))}
    attrs = {"format": FORMAT, "source": "lr_only", "truth": False, "lattice": grid.how,
             "genes": grid.genes, "lr_um": pitch_col_um, "lr_um_row": pitch_row_um,
             "hr_um": pitch_col_um / factor, "hr_um_row": pitch_row_um / factor,
             "scale": factor, "patch_um": n_lr * pitch_col_um,
             "edge": "floor" if n_hr == n_lr * factor else "ceil",
             "normalisation": normalisation, "hr_target_sum": target, "lr_target_sum": target,
             "lr_units": "hr", "image_mpp": n_hr * pitch_col_um / factor / he_hw[1],
             "he_hw": list(he_hw), "hr_shape": list(hr_shape), "lr_shape": list(lr_shape),
             "slide": str(slide_path), "slide_mpp": grid.mpp,
             "min_tissue": float(min_measured), "n_patches": len(kept),
             "n_patches_dropped": len(plan) - len(kept),
             "lattice_origin": [grid.r_min, grid.c_min],
             "lattice_affine": grid.affine.tolist(),
             "stagger_px": [float(v) for v in grid.stagger],
             "trained_lr_um": None if trained_lr_um is None else float(trained_lr_um)}
    _write_zarr(Path(out_zarr), len(kept), specs, items(), attrs)
    log.info("wrote %d LR-only SR inputs (%d genes, x%d) to %s", len(kept), g, factor, out_zarr)
    return attrs


# ============================================================================ reading

def read_sr_pairs(path: str | Path, *, lazy: bool = False) -> tuple[dict[str, Any], dict]:
    """(arrays by name, attrs) of an SR-pairs zarr; ``lazy`` gives zarr arrays instead of numpy."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "SR pairs zarr does not exist (run the build_sr_pairs rule)")
    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
        arrays = {name: root[name] for name in root.array_keys()}
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise InputError(path, f"not an SR pairs zarr: {exc}") from exc
    needed = {"lr", "he", "mask"} | ({"hr"} if has_truth(attrs) else set())
    if attrs.get("format") != FORMAT or not needed <= set(arrays):
        raise InputError(path, f"not an SR pairs zarr written by histomap ({FORMAT})")
    if not lazy:
        arrays = {name: a[...] for name, a in arrays.items()}
    return arrays, attrs


def has_truth(attrs: Mapping) -> bool:
    """Whether SR pairs hold an HR truth (all but :func:`build_lr_pairs`'s LR-only inputs)."""
    return attrs.get("source") != "lr_only"


class SRPairDataset:
    """Map-style torch dataset of an SR-pairs zarr (usable with ``torch.utils.data.DataLoader``).

    Item: dict(``hr`` (G, h, w) float32, ``lr`` (G, h_lr, w_lr) float32, ``lr_up`` the LR map
    upsampled (``upsample``: "bicubic", "bilinear" or "nearest") onto the HR grid, ``image``
    (3, H, W) float32 in [0, 1], ``mask`` (h, w) bool, ``index`` int). The LR map is upsampled
    by ``scale`` and cropped to the HR patch, so ``edge="ceil"`` LR pixels stay in place.
    ``image_hw``: resize the H&E patch to this (H, W) (antialiased bilinear), so that the pairs
    of several sections stack in one batch (spot-grid sections differ by a pixel or two in
    their measured spot pitch). ``target_sum``: log1p pairs are re-expressed with this target
    sum (a model's, from its training pairs: :func:`training_target_sum`); None keeps the
    stored one. ``hr`` and ``lr`` are in the same units (the LR map is stored in HR units).
    LR-only inputs (:func:`build_lr_pairs`) have no ``hr``; ``lr_up`` is cropped to the
    pairs' ``hr_shape``. ``augment`` (training only): each item is flipped left-right and/or
    up-down at random (torch's global RNG, so a resumed training draws the same flips), every
    map and the H&E patch alike; it needs pairs whose LR grid covers the HR patch exactly
    (``scale`` x the LR shape = the HR shape), so the LR map flips onto the same ground.
    """

    def __init__(self, path: str | Path, *, upsample: str = "bicubic",
                 indices: Sequence[int] | None = None,
                 image_hw: tuple[int, int] | None = None,
                 target_sum: float | None = None, augment: bool = False) -> None:
        if upsample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"upsample must be bicubic, bilinear or nearest, got {upsample!r}")
        self.path = Path(path)
        arrays, self.attrs = read_sr_pairs(self.path, lazy=True)
        n = arrays["lr"].shape[0]
        self.augment = bool(augment)
        if self.augment:
            lr_hw = tuple(int(v) * int(self.attrs["scale"]) for v in arrays["lr"].shape[-2:])
            hr_hw = tuple(int(v) for v in self.attrs["hr_shape"])
            if lr_hw != hr_hw:
                raise ValueError(f"{self.path}: flip augmentation needs an LR grid that covers "
                                 f"the HR patch exactly; {self.attrs['scale']} x the LR shape "
                                 f"is {lr_hw}, the HR patch {hr_hw} (edge: "
                                 f"{self.attrs.get('edge')})")
        self.indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
        self.upsample = upsample
        self.image_hw = tuple(int(v) for v in image_hw) if image_hw is not None else None
        self.genes = list(self.attrs["genes"])
        self.target_sum = (float(target_sum) if target_sum is not None
                           and self.attrs["normalisation"] == "log1p" else None)
        self._arrays: dict | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the store
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, item: int) -> dict:
        import torch
        import torch.nn.functional as F

        if self._arrays is None:
            self._arrays = read_sr_pairs(self.path, lazy=True)[0]
        i = int(self.indices[item])
        a = self._arrays
        hr = (torch.from_numpy(np.asarray(a["hr"][i], np.float32)) if "hr" in a else None)
        lr = torch.from_numpy(np.asarray(a["lr"][i], np.float32))
        if self.target_sum is not None:
            stored = float(self.attrs["hr_target_sum"])
            hr = retarget_log1p(hr, stored, self.target_sum) if hr is not None else None
            lr = retarget_log1p(lr, stored, self.target_sum)
        scale = int(self.attrs["scale"])
        size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
        kwargs = {} if self.upsample == "nearest" else {"align_corners": False}
        lr_up = F.interpolate(lr[None], size=size, mode=self.upsample, **kwargs)[0]
        h, w = (hr.shape[-2:] if hr is not None
                else (int(v) for v in self.attrs["hr_shape"]))
        lr_up = lr_up[:, :h, :w].contiguous()
        image = torch.from_numpy(np.asarray(a["he"][i])).float() / 255.0
        if self.image_hw is not None and tuple(image.shape[-2:]) != self.image_hw:
            image = F.interpolate(image[None], size=self.image_hw, mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp(0.0, 1.0)
        mask = torch.from_numpy(np.asarray(a["mask"][i], bool))
        item = {"lr": lr, "lr_up": lr_up, "image": image, "mask": mask, "index": i}
        if hr is not None:
            item = {"hr": hr, **item}
        if self.augment:
            dims = [d for d, flip in zip((-1, -2), torch.randint(0, 2, (2,)).tolist()) if flip]
            if dims:
                item = {k: v.flip(dims) if isinstance(v, torch.Tensor) else v
                        for k, v in item.items()}
        return item


def training_target_sum(pairs_zarrs: Sequence[str | Path]) -> float | None:
    """Log1p target sum of a model: the median non-zero HR-pixel library over the measured
    pixels of its training pairs (None for other normalisations)."""
    libraries = []
    for path in pairs_zarrs:
        arrays, attrs = read_sr_pairs(path, lazy=True)
        if attrs["normalisation"] != "log1p":
            return None
        library = np.asarray(arrays["hr_library"][...], np.float64)
        libraries.append(library[np.asarray(arrays["mask"][...], bool)])
    return _median_library(np.concatenate(libraries)) if libraries else None


def pairs_denormaliser(arrays: Mapping, attrs: Mapping) -> Callable[[np.ndarray, int], np.ndarray]:
    """Stored truth values (G, h, w) of patch i -> counts, with the patch's own HR statistics
    (recovers the measured counts; for the truth only, never for a prediction)."""
    kind = attrs["normalisation"]

    def counts(values: np.ndarray, i: int) -> np.ndarray:
        if kind == "minmax":
            return denormalise(values, kind, lo=np.asarray(arrays["hr_min"][i]),
                               hi=np.asarray(arrays["hr_max"][i]))
        if kind == "log1p":
            return denormalise(values, kind, library=np.asarray(arrays["hr_library"][i]),
                               target_sum=attrs["hr_target_sum"])
        return denormalise(values, kind)

    return counts


def lr_library_on_hr(lr_library: np.ndarray, scale: int, hr_shape: Sequence[int]) -> np.ndarray:
    """HR-pixel library estimated from the LR patch: each LR pixel's library / scale^2 on the
    scale x scale HR pixels under it (cropped to ``hr_shape``)."""
    up = np.repeat(np.repeat(np.asarray(lr_library, np.float64), scale, axis=0), scale, axis=1)
    return up[:hr_shape[0], :hr_shape[1]] / float(scale) ** 2


def prediction_denormaliser(arrays: Mapping, attrs: Mapping, target_sum: float | None = None
                            ) -> Callable[[np.ndarray, int], np.ndarray]:
    """Predicted values (G, h, w) of patch i (in the model's units) -> counts, with statistics
    available at prediction time only: the LR patch and the model's training ``target_sum``
    (None: the stored one). Min-max: the LR patch's per-gene range / scale^2; log1p: each HR
    pixel's library estimated from its LR pixel (:func:`lr_library_on_hr`)."""
    kind, scale = attrs["normalisation"], int(attrs["scale"])
    target = float(target_sum if target_sum is not None else attrs.get("hr_target_sum", 1.0))

    def counts(values: np.ndarray, i: int) -> np.ndarray:
        if kind == "minmax":
            return denormalise(values, kind, lo=np.asarray(arrays["lr_min"][i]) / scale ** 2,
                               hi=np.asarray(arrays["lr_max"][i]) / scale ** 2)
        if kind == "log1p":
            library = lr_library_on_hr(arrays["lr_library"][i], scale, values.shape[-2:])
            return denormalise(values, kind, library=library, target_sum=target)
        return denormalise(values, kind)

    return counts


# ============================================================================ pairs of a sample
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
