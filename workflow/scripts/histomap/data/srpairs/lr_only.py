"""LR-only inputs of a sample without HR truth: its measured spots as an SR model's LR map.

Arrow: an applied sample's ``spots.h5ad`` + slide -> **LR-only SR inputs** (rule
apply_sr_inputs, via :func:`histomap.tasks.superres.apply.lr_inputs_for_model`), in the layout
and units of a model trained elsewhere; no ``hr`` array, nothing to score.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from histomap.data.slide import open_slide
from histomap.data.srpairs.normalisation import (
    Normalisation,
    check_normalisation,
    median_library,
    normalised_lr,
)
from histomap.data.srpairs.spot_grid import SpotGrid, lattice_he, lattice_patches, spot_grid
from histomap.data.srpairs.store import FORMAT, pair_specs, write_pairs_zarr
from histomap.errors import InputError

log = logging.getLogger(__name__)


def _plan_lr_patches(grid: SpotGrid, n_lr: int, n_hr: int, factor: int, min_measured: float,
                     source_name: str) -> tuple[list[tuple], list[tuple]]:
    """(planned, kept) patches of ``n_lr x n_lr`` spots tiling the lattice; kept: holding a
    measured spot, and at least ``min_measured`` of them measured."""
    plan = lattice_patches(grid, n_lr, n_lr)
    kept = [p for p in plan if p[2] > 0 and p[2] >= min_measured]
    log.info("%s: lattice %d x %d from %s (pitch %.1f x %.1f um) as the LR map; %d patches of "
             "%d x %d spots -> %d x %d HR pixels of %.2f um, %d hold measured spots",
             source_name, grid.n_rows, grid.n_cols, grid.how, grid.pitch_row_um,
             grid.pitch_col_um, len(plan), n_lr, n_lr, n_hr, n_hr, grid.pitch_col_um / factor,
             len(kept))
    if not kept:
        raise InputError(source_name, f"no patch of {n_lr} x {n_lr} spots has >= "
                                      f"{min_measured:.0%} measured spots")
    return plan, kept


def _lr_items(slide_path: Path, grid: SpotGrid, kept: Sequence[tuple], n_lr: int, n_hr: int,
              factor: int, he_hw: tuple[int, int], normalisation: str, target: float
              ) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of each kept patch: its spots as the LR map, the HR mask under measured
    spots, the H&E covering the HR patch and the placement on the HR grid."""
    # the H&E covers the HR patch, as in training: the patch's n_lr spots are read at the size
    # that puts its first n_hr / factor spots on he_hw, then cropped to them ("ceil" layout)
    read_hw = tuple(int(round(v * n_lr * factor / n_hr)) for v in he_hw)
    with open_slide(slide_path) as slide:
        for r0, c0, fraction in kept:
            lr = grid.counts[:, r0:r0 + n_lr, c0:c0 + n_lr]
            lr_lib = grid.library[r0:r0 + n_lr, c0:c0 + n_lr]
            measured = grid.measured[r0:r0 + n_lr, c0:c0 + n_lr]
            mask = np.repeat(np.repeat(measured, factor, axis=0), factor, axis=1)
            he = lattice_he(slide, grid.affine, grid.axes, r0 + grid.r_min,
                            c0 + grid.c_min, n_lr, read_hw, grid.stagger)
            he = np.ascontiguousarray(he[:, :he_hw[0], :he_hw[1]])
            origin = np.array([1, c0 + grid.c_min - 0.5, r0 + grid.r_min - 0.5]) @ grid.affine.T
            yield {**normalised_lr(normalisation, lr, lr_lib, target, factor),
                   "he": he, "mask": mask[:n_hr, :n_hr], "origin_px": origin,
                   "origin_um": origin * grid.mpp,
                   "grid_index": np.array([r0 * factor, c0 * factor]),
                   "tissue_fraction": np.array(fraction)}


def _lr_target(normalisation: str, target_sum: float | None, grid: SpotGrid,
               source_name: str) -> float:
    """The log1p target sum of the inputs: the model's; this sample's median spot library
    only when none is given (logged)."""
    if normalisation == "log1p" and target_sum is None:
        log.warning("%s: no training target sum given; log1p with this sample's median spot "
                    "library", source_name)
    return float(target_sum) if target_sum is not None else median_library(grid.library)


def build_lr_pairs(spots: ad.AnnData, slide_path: str | Path, genes: Sequence[str],
                   out_zarr: str | Path, *, factor: int, n_lr: int, n_hr: int | None = None,
                   he_hw: Sequence[int], normalisation: Normalisation = "log1p",
                   target_sum: float | None = None, min_measured: float = 0.0,
                   mpp: float | None = None, trained_lr_um: float | None = None,
                   source_name: str = "spots") -> dict[str, Any]:
    """LR-only inputs of a sample with spots and H&E but no HR truth: the measured spot map IS the
    LR map (one LR pixel per spot, its lattice as in :func:`.spot_grid.spot_grid`, shared with
    :func:`.spot_grid.build_spot_grid_pairs`), and the output grid is ``factor`` times finer (HR
    pixel = the spot pitch / ``factor``). Patches of ``n_lr x n_lr`` spots tile the lattice;
    ``n_hr`` (default ``n_lr * factor``; fewer: the model's ``edge="ceil"`` layout) HR pixels each;
    kept when they hold a measured spot (and >= ``min_measured`` of them are). ``he_hw``: the H&E
    patch size the model was trained with, covering the HR patch as in training. The LR map is
    stored in HR units like training pairs', log1p with ``target_sum`` (the model's, from its
    training pairs; never a statistic of this sample, which only falls back to its median spot
    library when None). ``mask``: HR pixels under a measured spot. No ``hr`` array (attr ``source``
    = ``"lr_only"``, ``truth`` False): nothing to score. ``trained_lr_um``: the model's LR pixel; a
    spot pitch more than 10% off is logged (the model then upsamples maps of another scale than it
    learnt)."""
    check_normalisation(normalisation)
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
    plan, kept = _plan_lr_patches(grid, n_lr, n_hr, factor, min_measured, source_name)
    target = _lr_target(normalisation, target_sum, grid, source_name)
    he_hw = (int(he_hw[0]), int(he_hw[1]))
    g = len(grid.genes)
    hr_shape, lr_shape = (n_hr, n_hr), (n_lr, n_lr)
    specs = pair_specs(g, hr_shape, lr_shape, he_hw, normalisation, truth=False)
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
    items = _lr_items(slide_path, grid, kept, n_lr, n_hr, factor, he_hw, normalisation, target)
    write_pairs_zarr(Path(out_zarr), len(kept), specs, items, attrs)
    log.info("wrote %d LR-only SR inputs (%d genes, x%d) to %s", len(kept), g, factor, out_zarr)
    return attrs
