"""SR pairs of spot grids (legacy ST, Visium): the spot lattice as an image.

Arrow: ``spots.h5ad`` + slide -> **SR pairs** (rule build_sr_pairs for spot-grid platforms): each
spot is one HR pixel of its lattice (hexagonal lattices in offset coordinates, odd rows read
shifted on the H&E), an LR pixel sums ``factor x factor`` spots. The lattice code
(:func:`spot_lattice`, :func:`spot_grid`, :func:`lattice_he`) is shared with the LR-only inputs
of an applied model (:mod:`histomap.data.srpairs.lr_only`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.slide import open_slide, read_region
from histomap.data.srpairs.counts import as_csr, check_counts, gene_columns
from histomap.data.srpairs.grid import block_sum, patch_starts, slide_geometry
from histomap.data.srpairs.normalisation import (
    Normalisation,
    check_normalisation,
    median_library,
    normalised_pair,
)
from histomap.data.srpairs.store import FORMAT, pair_specs, write_pairs_zarr
from histomap.errors import InputError

log = logging.getLogger(__name__)

LEGACY_SPOT_NAME = r"^\d+x\d+$"


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


def lattice_he(slide, affine: np.ndarray, axes: tuple[bool, float, float], r0: int, c0: int,
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
        bands = [lattice_he(slide, affine + np.column_stack([stagger * ((r0 + k) % 2),
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
    genes = gene_columns(spots, genes, source_name)
    mpp, _, _ = slide_geometry(Path(slide_path), mpp)
    values = as_csr(spots.X)
    check_counts(values, source_name)
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


def lattice_patches(grid: SpotGrid, size: int, stride: int) -> list[tuple[int, int, float]]:
    """(r0, c0, measured fraction) of every ``size x size`` lattice window every ``stride``
    lattice steps (the last ones may run into the grid's padding)."""
    return [(int(r0), int(c0), float(grid.measured[r0:r0 + size, c0:c0 + size].mean()))
            for r0 in patch_starts(grid.n_rows, size, stride)
            for c0 in patch_starts(grid.n_cols, size, stride)]


def _grid_items(slide_path: Path, grid: SpotGrid, kept: Sequence[tuple], n_hr: int,
                factor: int, he_hw: tuple[int, int], normalisation: str, target: float
                ) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of each kept patch: HR map = the lattice window, LR map = its block sums."""
    with open_slide(slide_path) as slide:
        for r0, c0, fraction in kept:
            hr = grid.counts[:, r0:r0 + n_hr, c0:c0 + n_hr]
            hr_lib = grid.library[r0:r0 + n_hr, c0:c0 + n_hr]
            lr, lr_lib = block_sum(hr, factor), block_sum(hr_lib, factor)
            he = lattice_he(slide, grid.affine, grid.axes, r0 + grid.r_min, c0 + grid.c_min,
                            n_hr, he_hw, grid.stagger)
            origin = np.array([1, c0 + grid.c_min - 0.5, r0 + grid.r_min - 0.5]) @ grid.affine.T
            yield {**normalised_pair(normalisation, hr, lr, hr_lib, lr_lib, target, factor),
                   "he": he, "mask": grid.measured[r0:r0 + n_hr, c0:c0 + n_hr],
                   "origin_px": origin, "origin_um": origin * grid.mpp,
                   "grid_index": np.array([r0, c0]), "tissue_fraction": np.array(fraction)}


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
    check_normalisation(normalisation)
    if factor < 1 or patch_spots < factor or image_mpp <= 0:
        raise ValueError(f"need factor >= 1, patch_spots >= factor, image_mpp > 0; got {factor}, "
                         f"{patch_spots}, {image_mpp}")
    slide_path = Path(slide_path)
    n_hr = (patch_spots // factor) * factor
    if n_hr != patch_spots:
        log.warning("patch_spots %d floored to %d, a multiple of factor %d", patch_spots, n_hr,
                    factor)
    grid = spot_grid(spots, slide_path, genes, mpp=mpp, pad=n_hr, source_name=source_name)
    pitch_col_um, pitch_row_um = grid.pitch_col_um, grid.pitch_row_um
    n_lr = n_hr // factor
    stride = max(1, (stride_spots or n_hr) // factor) * factor
    plan = lattice_patches(grid, n_hr, stride)
    kept = [p for p in plan if p[2] >= min_measured]
    log.info("%s: lattice %d x %d from %s (pitch %.1f x %.1f um); %d patches of %d spots, kept "
             "%d with >= %g measured", source_name, grid.n_rows, grid.n_cols, grid.how,
             pitch_row_um, pitch_col_um, len(plan), n_hr, len(kept), min_measured)
    if not kept:
        raise InputError(source_name, f"no patch of {n_hr} x {n_hr} spots has >= "
                                      f"{min_measured:.0%} measured spots")
    target = median_library(grid.library)  # log1p storage scale (models retarget it)
    he_hw = (max(1, int(round(n_hr * pitch_row_um / image_mpp))),
             max(1, int(round(n_hr * pitch_col_um / image_mpp))))
    hr_shape, lr_shape = (n_hr, n_hr), (n_lr, n_lr)
    specs = pair_specs(len(grid.genes), hr_shape, lr_shape, he_hw, normalisation)
    attrs = {"format": FORMAT, "source": "spot_grid", "lattice": grid.how, "genes": grid.genes,
             "hr_um": pitch_col_um, "hr_um_row": pitch_row_um, "lr_um": pitch_col_um * factor,
             "scale": int(factor), "patch_spots": n_hr, "patch_um": n_hr * pitch_col_um,
             "stride_spots": stride, "edge": "floor", "normalisation": normalisation,
             "hr_target_sum": target, "lr_target_sum": target, "lr_units": "hr",
             "n_patches_dropped": len(plan) - len(kept),
             "image_mpp": float(image_mpp), "he_hw": list(he_hw), "hr_shape": list(hr_shape),
             "lr_shape": list(lr_shape), "slide": str(slide_path), "slide_mpp": float(grid.mpp),
             "min_tissue": float(min_measured), "n_patches": len(kept),
             "lattice_origin": [int(grid.r_min), int(grid.c_min)],
             "stagger_px": [float(v) for v in grid.stagger]}
    items = _grid_items(slide_path, grid, kept, n_hr, factor, he_hw, normalisation, target)
    write_pairs_zarr(Path(out_zarr), len(kept), specs, items, attrs)
    log.info("wrote %d spot-grid SR pairs (%d genes) to %s", len(kept), len(grid.genes),
             out_zarr)
    return attrs
