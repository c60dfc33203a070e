"""Where the HR pixels of SR pairs lie on the slide: the HR bins' level-0 centres.

Arrow: SR pairs -> HR maps -> **HR-bin AnnData** (predict_*, apply_sr): ``obsm["spatial"]`` of
every predicted HR pixel, for point data, spot lattices and LR-only inputs.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)


def hr_pixel_centres(origin_px: np.ndarray, grid_index: np.ndarray, attrs: Mapping
                     ) -> Callable[[int], np.ndarray]:
    """Function of a patch index giving its HR pixel centres (h, w, 2) as level-0 (x, y) px.

    Point data: pixels are squares of ``hr_um / slide_mpp`` px from the patch origin. Spot
    grids: the lattice-to-slide affine is fitted from the patches' origins (lattice corner
    (r0 - 0.5, c0 - 0.5)), so flipped, transposed or slightly rotated lattices are placed
    exactly; with patches in a single row or column an axis-aligned lattice is assumed (logged).
    Odd lattice rows of a hexagonal lattice are shifted by the pairs' ``stagger_px``.
    """
    h, w = (int(v) for v in attrs["hr_shape"])
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mpp = float(attrs["slide_mpp"])
    origin_px = np.asarray(origin_px, np.float64).reshape(-1, 2)
    grid_index = np.asarray(grid_index, np.int64).reshape(-1, 2)
    if attrs.get("source") == "lr_only":  # HR pixels subdivide the spots of a known lattice
        affine = np.asarray(attrs["lattice_affine"], np.float64)  # (2, 3): 1, col, row
        f = int(attrs["scale"])
        r_min, c_min = (int(v) for v in attrs["lattice_origin"])
        shift = np.asarray(attrs.get("stagger_px") or (0.0, 0.0), np.float64)

        def sub_spot_centres(i: int) -> np.ndarray:
            rows, cols = grid_index[i, 0] + ii, grid_index[i, 1] + jj  # HR grid, from 0
            pts = np.stack([np.ones_like(ii, np.float64), c_min + (cols + 0.5) / f - 0.5,
                            r_min + (rows + 0.5) / f - 0.5], axis=-1)
            odd = ((r_min + rows // f) % 2)[..., None]
            return pts @ affine.T + odd * shift

        return sub_spot_centres
    if attrs.get("source") != "spot_grid":
        side = float(attrs["hr_um"]) / mpp

        def centres(i: int) -> np.ndarray:
            return np.stack([origin_px[i, 0] + (jj + 0.5) * side,
                             origin_px[i, 1] + (ii + 0.5) * side], axis=-1)

        return centres
    design = np.column_stack([np.ones(len(grid_index)), grid_index[:, 1] - 0.5,
                              grid_index[:, 0] - 0.5])
    if np.linalg.matrix_rank(design) == 3:
        coef, *_ = np.linalg.lstsq(design, origin_px, rcond=None)  # (3, 2): 1, col, row
    else:
        log.warning("spot-grid patches span a single lattice row or column: bin centres assume "
                    "an axis-aligned lattice with pitch %g x %g um", attrs["hr_um"],
                    attrs.get("hr_um_row", attrs["hr_um"]))
        step_c, step_r = float(attrs["hr_um"]) / mpp, float(attrs.get("hr_um_row",
                                                                      attrs["hr_um"])) / mpp
        r0, c0 = grid_index[0, 0] - 0.5, grid_index[0, 1] - 0.5
        coef = np.array([[origin_px[0, 0] - c0 * step_c, origin_px[0, 1] - r0 * step_r],
                         [step_c, 0.0], [0.0, step_r]])

    stagger = np.asarray(attrs.get("stagger_px") or (0.0, 0.0), np.float64)
    first_row = int((attrs.get("lattice_origin") or (0, 0))[0])

    def lattice_centres(i: int) -> np.ndarray:
        r0, c0 = grid_index[i]
        pts = np.stack([np.ones_like(ii, np.float64), c0 + jj, r0 + ii], axis=-1)
        odd = ((first_row + r0 + ii) % 2)[..., None]   # hexagonal lattices: odd rows shifted
        return pts @ coef + odd * stagger

    return lattice_centres
