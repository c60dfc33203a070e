"""Where a synthetic section's tissue, regions and cells are (simulate_sample): the tissue blob on
glass, smoothed random fields that lay out the cell-type regions, glands with their lumens, and
the cell centres on jittered lattices (:func:`make_layout`). Lengths in um.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from histomap.data.synthetic_config import (ADIPOCYTE, CELL_TYPES, DUCT, GLASS, LYMPHOCYTE, STROMA,
                                            TUMOUR, SyntheticConfig)


@dataclass
class Layout:
    """Where the tissue, regions and cells are (um; fields on a ``grid_um`` grid)."""
    tissue: np.ndarray        # (gy, gx) bool
    region: np.ndarray        # (gy, gx) int, GLASS outside tissue
    orientation: np.ndarray   # (gy, gx) fibre orientation, radians
    xy_um: np.ndarray         # (n, 2) cell centres
    cell_type: np.ndarray     # (n,) int index into CELL_TYPES
    angle: np.ndarray         # (n,) nucleus orientation, radians
    glands: np.ndarray        # (g, 3) x_um, y_um, lumen radius um


def _interp_matrix(n_out: int, n_in: int) -> sp.csr_matrix:
    """(n_out, n_in) linear-interpolation matrix between two grids spanning the same extent."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    rows = np.arange(n_out)
    return sp.csr_matrix((np.concatenate([1 - w, w]), (np.concatenate([rows, rows]),
                                                       np.concatenate([lo, hi]))),
                         shape=(n_out, n_in))


def resize_field(field2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w[, c]) array to (H, W[, c]) (separable, sparse matrices)."""
    ry = _interp_matrix(shape[0], field2d.shape[0])
    rx = _interp_matrix(shape[1], field2d.shape[1])
    f = field2d.astype(np.float32)
    if f.ndim == 2:
        return np.ascontiguousarray((rx @ (ry @ f).T).T, dtype=np.float32)
    return np.stack([resize_field(f[..., c], shape) for c in range(f.shape[2])], axis=-1)


def smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with correlation length ``sigma`` (grid px), unit std.

    Large sigmas are drawn on a coarser grid and interpolated (same look, far cheaper)."""
    factor = max(1, int(sigma // 3))
    small = (int(np.ceil(shape[0] / factor)), int(np.ceil(shape[1] / factor)))
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma / factor, mode="reflect")
    if factor > 1:
        f = resize_field(f, shape).astype(np.float64)
    f -= f.mean()
    return f / max(float(f.std()), 1e-12)


def _hex_lattice(size_um: tuple[float, float], spacing: float, jitter: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Jittered hexagonal lattice covering the image, (n, 2) (x, y) um."""
    dy = spacing * np.sqrt(3) / 2
    ox, oy = rng.uniform(0, spacing), rng.uniform(0, dy)
    rows = np.arange(oy, size_um[1], dy)
    cols = np.arange(0, size_um[0] + spacing, spacing)
    x = cols[None, :] + ox + (np.arange(len(rows)) % 2)[:, None] * spacing / 2
    y = np.broadcast_to(rows[:, None], x.shape)
    xy = np.stack([x.ravel(), y.ravel()], axis=1)
    xy = xy + rng.uniform(-jitter, jitter, xy.shape) * spacing
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < size_um[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < size_um[1])
    return xy[keep]


def _lookup(grid: np.ndarray, xy_um: np.ndarray, grid_um: float) -> np.ndarray:
    """Value of a layout field at (x, y) um positions."""
    ix = np.clip((xy_um[:, 0] / grid_um).astype(np.int64), 0, grid.shape[1] - 1)
    iy = np.clip((xy_um[:, 1] / grid_um).astype(np.int64), 0, grid.shape[0] - 1)
    return grid[iy, ix]


def _tissue_and_regions(cfg: SyntheticConfig, rng: np.random.Generator):
    w_um, h_um = cfg.size_um
    g = cfg.grid_um
    gy, gx = int(np.ceil(h_um / g)), int(np.ceil(w_um / g))
    y = (np.arange(gy) + 0.5) * g
    x = (np.arange(gx) + 0.5) * g
    u = (x[None, :] - w_um / 2) / (w_um / 2 - cfg.tissue_margin_um)
    v = (y[:, None] - h_um / 2) / (h_um / 2 - cfg.tissue_margin_um)
    r = np.sqrt(u ** 2 + v ** 2)
    wobble = smooth_field((gy, gx), 150.0 / g, rng)
    tissue = (r + cfg.tissue_roughness * wobble < 0.92) & (r < 1.0)
    tissue = ndimage.binary_opening(tissue, iterations=2)

    bias = np.array([cfg.region_bias.get(t, 0.0) for t in CELL_TYPES])
    scores = np.stack([smooth_field((gy, gx), cfg.region_scale_um / g, rng)
                       for _ in CELL_TYPES]) + bias[:, None, None]
    region = np.where(tissue, scores.argmax(axis=0), GLASS).astype(np.int8)

    vx = smooth_field((gy, gx), 50.0 / g, rng)
    vy = smooth_field((gy, gx), 50.0 / g, rng)
    orientation = np.arctan2(vy, vx).astype(np.float32)
    return tissue, region, orientation


def _place_glands(cfg, region, rng):
    g = cfg.grid_um
    centres = _hex_lattice(cfg.size_um, cfg.gland_spacing_um, 0.12, rng)
    centres = centres[_lookup(region, centres, g) == DUCT]
    lumen = rng.uniform(*cfg.lumen_radius_um, len(centres))
    # the whole gland must sit in the duct region
    ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    outer = lumen + cfg.gland_epithelium_um
    ok = np.ones(len(centres), bool)
    for a in ang:
        rim = centres + outer[:, None] * np.array([np.cos(a), np.sin(a)])[None, :]
        ok &= _lookup(region, rim, g) == DUCT
    return np.column_stack([centres[ok], lumen[ok]])


def _gland_cells(cfg, glands, rng):
    """Epithelial cells lining each gland: (xy, angle) with nuclei elongated radially."""
    xy, angle = [], []
    for cx, cy, lumen in glands:
        ring = lumen + cfg.gland_epithelium_um * 0.55
        n = max(6, int(2 * np.pi * ring / 7.0))
        a = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        a = a + rng.normal(0, 0.05, n)
        rr = ring + rng.normal(0, 0.6, n)
        xy.append(np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1))
        angle.append(a)
    if not xy:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(xy), np.concatenate(angle)


def make_layout(cfg: SyntheticConfig, rng: np.random.Generator) -> Layout:
    """Tissue blob, type regions and cell positions/orientations."""
    g = cfg.grid_um
    tissue, region, orientation = _tissue_and_regions(cfg, rng)
    spacing = cfg.cell_spacing_um
    xy_parts, type_parts, angle_parts = [], [], []

    def add(xy, t, angle):
        xy_parts.append(xy)
        type_parts.append(np.full(len(xy), t, np.int8))
        angle_parts.append(angle)

    tum = _hex_lattice(cfg.size_um, spacing["tumour"], 0.22, rng)
    tum = tum[_lookup(region, tum, g) == TUMOUR]
    add(tum, TUMOUR, rng.uniform(0, np.pi, len(tum)))

    glands = _place_glands(cfg, region, rng)
    duct_xy, duct_angle = _gland_cells(cfg, glands, rng)
    add(duct_xy, DUCT, duct_angle)

    fib = _hex_lattice(cfg.size_um, spacing["stroma"], 0.3, rng)
    fib = fib[np.isin(_lookup(region, fib, g), (STROMA, DUCT))]
    if len(glands):   # no fibroblasts inside glands
        d, i = cKDTree(glands[:, :2]).query(fib)
        fib = fib[d > glands[i, 2] + cfg.gland_epithelium_um + 2.0]
    add(fib, STROMA, _lookup(orientation, fib, g) + rng.normal(0, 0.2, len(fib)))

    adi = _hex_lattice(cfg.size_um, spacing["adipocyte"], 0.2, rng)
    adi = adi[_lookup(region, adi, g) == ADIPOCYTE]
    add(adi, ADIPOCYTE, rng.uniform(0, 2 * np.pi, len(adi)))

    lym = _hex_lattice(cfg.size_um, spacing["lymphocyte"], 0.3, rng)
    lab = _lookup(region, lym, g)
    aggregate = (lab == LYMPHOCYTE) & (rng.random(len(lym)) < 0.85)
    infiltrate = np.isin(lab, (STROMA, TUMOUR)) & (rng.random(len(lym))
                                                     < cfg.lymphocyte_infiltration)
    lym = lym[aggregate | infiltrate]
    others = np.concatenate(xy_parts)
    if len(others) and len(lym):   # infiltrating lymphocytes do not sit on other nuclei
        d, _ = cKDTree(others).query(lym)
        lym = lym[d > 4.5]
    add(lym, LYMPHOCYTE, rng.uniform(0, np.pi, len(lym)))

    xy = np.concatenate(xy_parts)
    keep = ((xy[:, 0] >= 0) & (xy[:, 0] < cfg.size_um[0]) & (xy[:, 1] >= 0)
            & (xy[:, 1] < cfg.size_um[1]))
    keep &= _lookup(tissue, xy, g)
    return Layout(tissue=tissue, region=region, orientation=orientation, xy_um=xy[keep],
                  cell_type=np.concatenate(type_parts)[keep],
                  angle=np.concatenate(angle_parts)[keep].astype(np.float32), glands=glands)


# ----------------------------------------------------------------------------- rendering
