"""Synthetic demo samples: an H&E-like slide, cells with counts, and ST spots that sum them.

One seed gives one sample folder (see :func:`simulate_sample`)::

    he.tif       pyramidal TIFF (OpenSlide generic-tiff, with mpp) of an H&E-like image
    cells.h5ad   one row per cell: obs cell_type, x_px, y_px, neighbour fractions;
                 obsm["spatial"] (x, y) level-0 px; X integer counts (CSR);
                 layers["rate"] the noiseless expected counts (float32);
                 varm["type_profile"] (genes, cell types) the expression fractions expressed
    spots.h5ad   hexagonal (Visium-like) or square spot grid, only spots holding >= 1 cell;
                 X = exact sum of the counts of the cells whose centre lies inside each disc;
                 layers["rate"] the summed rates; obs n_cells, array_row, array_col,
                 diameter_um; obsm["spatial"] px; obs_names spot_{row}x{col}
    meta.json    the config, seed, dataset seed, section variation, mpp and spot geometry

Pixel coordinates follow the image: pixel (row i, column j) is centred at (x=j, y=i).

The tissue is a blob surrounded by glass. Inside it, smoothed random fields (argmax) lay out
spatially coherent regions of five cell types that differ visibly in the image: tumour
epithelium (large irregular dark-purple nuclei, pink-purple cytoplasm), stroma (spindle nuclei in
pink fibrous collagen), lymphocytes (small round dark-blue nuclei), adipocytes (large empty
cells with thin pink membranes) and normal ducts (glands: a white lumen lined by regular
epithelial nuclei). Expression depends on the cell type (gene programmes) and on the
neighbourhood (genes induced by the fraction of lymphocytes or tumour cells nearby), so maps
have spatial structure at 50-200 um.

**One biology per dataset.** The cell-type expression profiles (named programmes and background
genes) and the neighbourhood induction strengths are drawn from ``dataset_seed`` (the workflow's
``seed``), never from the section's own ``seed``: every section of a dataset maps H&E to
expression the same way (:func:`dataset_biology`; stored as ``cells.varm["type_profile"]``).
Sections differ in layout (the section seed), composition (``composition_sd``: a per-section
shift of the cell-type region biases), staining (``stain_sd``: per-channel optical-density
scale) and sequencing depth (``depth_log_sd``: a per-section library-size factor). A per-section
batch effect on the profiles themselves (log-normal, ``batch_effect_sd``) is a separate knob,
off (0) by default.

:func:`aggregate_discs` and :func:`aggregate_bins` sum any point-like high-resolution AnnData
(cells here, Xenium transcripts elsewhere) into discs or square bins of any size: ground truth at
any resolution. :mod:`histomap.data.write_layouts` writes the same sections in real platforms'
layouts (Space Ranger HD bins, Visium as published, HEST-1k, Xenium with its H&E).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from histomap.data.slide import write_pyramid
from histomap.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "histomap-synthetic/1"
CELL_TYPES = ("tumour", "stroma", "lymphocyte", "adipocyte", "normal_duct")
TUMOUR, STROMA, LYMPHOCYTE, ADIPOCYTE, DUCT = range(len(CELL_TYPES))
GLASS = -1

# Named gene programmes (the rest of the panel are background genes GENE###).
GENE_PROGRAMMES: dict[str, tuple[str, ...]] = {
    "housekeeping": ("ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1"),
    "tumour": ("ERBB2", "GRB7", "MKI67", "TOP2A", "CCND1", "MUC1"),
    "epithelial": ("KRT8", "KRT18", "KRT19", "EPCAM"),
    "normal_duct": ("KRT5", "KRT14", "PIP", "SCGB2A2"),
    "stroma": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"),
    "lymphocyte": ("PTPRC", "CD3E", "CD2", "MS4A1", "CD79A"),
    "adipocyte": ("ADIPOQ", "PLIN1", "FABP4", "LEP"),
    "induced_by_lymphocyte": ("CXCL9", "CXCL10", "IDO1"),
    "induced_by_tumour": ("POSTN", "MMP11"),
}
# Programme -> cell types expressing it highly.
PROGRAMME_TYPES: dict[str, tuple[int, ...]] = {
    "tumour": (TUMOUR,),
    "epithelial": (TUMOUR, DUCT),
    "normal_duct": (DUCT,),
    "stroma": (STROMA,),
    "lymphocyte": (LYMPHOCYTE,),
    "adipocyte": (ADIPOCYTE,),
}
# Induced programme -> (source type whose neighbour fraction induces it, responding types).
INDUCTIONS: dict[str, tuple[int, tuple[int, ...]]] = {
    "induced_by_lymphocyte": (LYMPHOCYTE, (TUMOUR, STROMA, ADIPOCYTE, DUCT)),
    "induced_by_tumour": (TUMOUR, (STROMA,)),
}
N_NAMED_GENES = sum(len(g) for g in GENE_PROGRAMMES.values())


@dataclass(frozen=True)
class NucleusLook:
    """How one cell type's nuclei are drawn: RGB colour, semi-axes (um), shape irregularity."""
    colour: tuple[float, float, float]
    semi_major_um: tuple[float, float]
    aspect: tuple[float, float]            # semi-minor / semi-major
    irregularity: float = 0.0              # amplitude of 2nd/3rd harmonic outline wobble
    chromatin: float = 0.1                 # amplitude of the intra-nuclear texture


NUCLEI: dict[int, NucleusLook] = {
    TUMOUR: NucleusLook((78, 38, 118), (4.0, 6.0), (0.65, 0.95), 0.14, 0.25),
    STROMA: NucleusLook((105, 55, 135), (5.0, 8.0), (0.16, 0.24), 0.0, 0.10),
    LYMPHOCYTE: NucleusLook((38, 26, 98), (2.3, 2.9), (0.85, 1.0), 0.0, 0.08),
    ADIPOCYTE: NucleusLook((110, 60, 140), (2.6, 3.4), (0.28, 0.36), 0.0, 0.08),
    DUCT: NucleusLook((100, 66, 150), (3.2, 3.8), (0.65, 0.8), 0.0, 0.12),
}
# Region background (RGB) and how strongly collagen-fibre texture shows there.
REGION_COLOUR = {
    GLASS: (243, 243, 245),
    TUMOUR: (202, 140, 190),
    STROMA: (238, 166, 200),
    LYMPHOCYTE: (228, 176, 208),
    ADIPOCYTE: (248, 244, 247),
    DUCT: (238, 166, 200),
}
REGION_FIBRES = {GLASS: 0.0, TUMOUR: 0.15, STROMA: 1.0, LYMPHOCYTE: 0.4, ADIPOCYTE: 0.0,
                 DUCT: 1.0}
CYTOPLASM_TUMOUR = (200, 138, 190)
GLAND_EPITHELIUM = (214, 164, 210)
LUMEN = (250, 247, 250)
MEMBRANE = (222, 140, 186)


def _default_region_bias() -> dict[str, float]:
    return {"tumour": 0.5, "stroma": 0.45, "lymphocyte": -0.3, "adipocyte": -0.1,
            "normal_duct": 0.25}


def _default_cell_spacing() -> dict[str, float]:
    return {"tumour": 8.5, "stroma": 13.0, "lymphocyte": 5.5, "adipocyte": 46.0}


def _default_library_size() -> dict[str, float]:
    return {"tumour": 110.0, "stroma": 70.0, "lymphocyte": 40.0, "adipocyte": 220.0,
            "normal_duct": 90.0}


@dataclass
class SyntheticConfig:
    """Every parameter of a synthetic sample; lengths in um unless named ``_px``."""
    seed: int = 0
    size_um: tuple[float, float] = (1500.0, 1500.0)     # (width, height)
    mpp: float = 0.5                                      # um per level-0 pixel of he.tif
    n_genes: int = 60
    spot_diameter_um: float = 55.0
    spot_spacing_um: float = 100.0                        # centre-to-centre
    spot_grid: str = "hex"                                # "hex" (Visium-like) or "square"
    tissue_margin_um: float = 60.0                        # glass at least this wide at borders
    tissue_roughness: float = 0.18                        # blob outline wobble
    region_scale_um: float = 45.0                         # smoothing sigma of the type fields
    region_bias: dict[str, float] = field(default_factory=_default_region_bias)
    cell_spacing_um: dict[str, float] = field(default_factory=_default_cell_spacing)
    gland_spacing_um: float = 60.0
    lumen_radius_um: tuple[float, float] = (7.0, 14.0)
    gland_epithelium_um: float = 9.0
    lymphocyte_infiltration: float = 0.06                 # fraction of lattice sites in stroma
    library_size: dict[str, float] = field(default_factory=_default_library_size)
    library_log_sd: float = 0.25
    neighbourhood_um: float = 40.0
    induction_strength: float = 0.04                      # fraction of library per gene at 100%
    grid_um: float = 2.0                                  # resolution of the layout fields
    dataset_seed: int | None = None                       # the biology (None: the section seed)
    composition_sd: float = 0.15                          # per-section shift of region biases
    stain_sd: float = 0.05                                # per-section stain (log OD scale) sd
    depth_log_sd: float = 0.2                             # per-section library-size factor sd
    batch_effect_sd: float = 0.0                          # per-section profile noise (log), off

    def __post_init__(self):
        self.size_um = (float(self.size_um[0]), float(self.size_um[1]))
        self.lumen_radius_um = (float(self.lumen_radius_um[0]), float(self.lumen_radius_um[1]))
        problems = []
        if self.mpp <= 0:
            problems.append(f"mpp must be positive, got {self.mpp}")
        if min(self.size_um) <= 2 * self.tissue_margin_um + 50:
            problems.append(f"size_um {self.size_um} too small for margin "
                            f"{self.tissue_margin_um} um")
        if self.n_genes < N_NAMED_GENES:
            problems.append(f"n_genes must be >= {N_NAMED_GENES} (the named programmes)")
        if self.spot_grid not in ("hex", "square"):
            problems.append(f"spot_grid must be 'hex' or 'square', got {self.spot_grid!r}")
        if self.spot_diameter_um <= 0 or self.spot_spacing_um <= 0:
            problems.append("spot_diameter_um and spot_spacing_um must be positive")
        for name in ("composition_sd", "stain_sd", "depth_log_sd", "batch_effect_sd"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:  # config `synthetic` (workflow/schemas/config.schema.yaml has the limits)
            raise InputError("config `synthetic`", "; ".join(problems))

    @property
    def shape_px(self) -> tuple[int, int]:
        """(height, width) of the level-0 image in pixels."""
        return (int(round(self.size_um[1] / self.mpp)), int(round(self.size_um[0] / self.mpp)))


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


@dataclass
class SyntheticData:
    image: np.ndarray         # (H, W, 3) uint8
    cells: ad.AnnData
    spots: ad.AnnData
    meta: dict


# ----------------------------------------------------------------------------- layout

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


def _resize(field2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w[, c]) array to (H, W[, c]) (separable, sparse matrices)."""
    ry = _interp_matrix(shape[0], field2d.shape[0])
    rx = _interp_matrix(shape[1], field2d.shape[1])
    f = field2d.astype(np.float32)
    if f.ndim == 2:
        return np.ascontiguousarray((rx @ (ry @ f).T).T, dtype=np.float32)
    return np.stack([_resize(f[..., c], shape) for c in range(f.shape[2])], axis=-1)


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with correlation length ``sigma`` (grid px), unit std.

    Large sigmas are drawn on a coarser grid and interpolated (same look, far cheaper)."""
    factor = max(1, int(sigma // 3))
    small = (int(np.ceil(shape[0] / factor)), int(np.ceil(shape[1] / factor)))
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma / factor, mode="reflect")
    if factor > 1:
        f = _resize(f, shape).astype(np.float64)
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
    wobble = _smooth_field((gy, gx), 150.0 / g, rng)
    tissue = (r + cfg.tissue_roughness * wobble < 0.92) & (r < 1.0)
    tissue = ndimage.binary_opening(tissue, iterations=2)

    bias = np.array([cfg.region_bias.get(t, 0.0) for t in CELL_TYPES])
    scores = np.stack([_smooth_field((gy, gx), cfg.region_scale_um / g, rng)
                       for _ in CELL_TYPES]) + bias[:, None, None]
    region = np.where(tissue, scores.argmax(axis=0), GLASS).astype(np.int8)

    vx = _smooth_field((gy, gx), 50.0 / g, rng)
    vy = _smooth_field((gy, gx), 50.0 / g, rng)
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

def _ellipse_alpha(dx, dy, a, b, theta, h2=None, p2=None, h3=None, p3=None, soft=0.7):
    """Coverage in [0, 1] of a (possibly wobbly) ellipse with semi-axes a, b px."""
    c, s = np.cos(theta), np.sin(theta)
    u = dx * c + dy * s
    v = dy * c - dx * s
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if h2 is not None:
        phi = np.arctan2(v, u)
        rho = rho / (1 + h2 * np.cos(2 * phi + p2) + h3 * np.cos(3 * phi + p3))
    return np.clip((1 - rho) * b / soft + 0.5, 0, 1)


def _ring_alpha(dx, dy, r, width, h2, p2, h3, p3, soft=0.7):
    """Coverage of a wobbly ring of radius r and the given width (px)."""
    d = np.sqrt(dx ** 2 + dy ** 2)
    phi = np.arctan2(dy, dx)
    rr = r * (1 + h2 * np.cos(2 * phi + p2) + h3 * np.cos(3 * phi + p3))
    return np.clip((width / 2 - np.abs(d - rr)) / soft + 0.5, 0, 1)


def _stamp(canvas: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int,
           alpha_fn: Callable[..., np.ndarray], colour: np.ndarray, params: dict,
           *, texture: np.ndarray | None = None, texture_amp: float = 0.0,
           max_alpha: float = 1.0, chunk_px: int = 4_000_000) -> None:
    """Alpha-blend one shape per item into ``canvas`` (H, W, 3) using small local windows.

    ``cx, cy`` are centres in px; ``alpha_fn(dx, dy, **params)`` gives coverage on a
    (n, 2*half+1, 2*half+1) window; ``colour`` is (n, 3); ``texture`` (H, W) modulates colour.
    """
    if len(cx) == 0:
        return
    H, W, _ = canvas.shape
    off = np.arange(-half, half + 1)
    chunk = max(1, chunk_px // len(off) ** 2)
    for start in range(0, len(cx), chunk):
        sl = slice(start, start + chunk)
        x0, y0 = np.rint(cx[sl]).astype(np.int64), np.rint(cy[sl]).astype(np.int64)
        xs = x0[:, None, None] + off[None, None, :]
        ys = y0[:, None, None] + off[None, :, None]
        dx = (xs - cx[sl, None, None]).astype(np.float32)
        dy = (ys - cy[sl, None, None]).astype(np.float32)
        p = {k: np.asarray(v)[sl, None, None] for k, v in params.items()}
        alpha = alpha_fn(dx, dy, **p) * max_alpha
        inside = (alpha > 0.004) & (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        ci, wy, wx = np.nonzero(inside)
        px, py = xs[ci, 0, wx], ys[ci, wy, 0]
        a = alpha[ci, wy, wx][:, None].astype(np.float32)
        col = colour[sl][ci].astype(np.float32)
        if texture is not None:
            col = col * (1 + texture_amp * texture[py, px])[:, None]
        canvas[py, px] = canvas[py, px] * (1 - a) + col * a


def _fibre_texture(cfg: SyntheticConfig, orientation: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Streaks along the local fibre orientation (line-integral convolution of white noise)
    on a 1 um grid, unit standard deviation."""
    ny, nx = int(np.ceil(cfg.size_um[1])), int(np.ceil(cfg.size_um[0]))
    noise = rng.standard_normal(ny * nx, dtype=np.float32)
    iy = np.minimum((np.arange(ny) / cfg.grid_um).astype(np.int64), orientation.shape[0] - 1)
    ix = np.minimum((np.arange(nx) / cfg.grid_um).astype(np.int64), orientation.shape[1] - 1)
    theta = orientation[np.ix_(iy, ix)]
    step = 1.25   # um
    c, s = (step * np.cos(theta)).ravel(), (step * np.sin(theta)).ravel()
    x = np.tile(np.arange(nx, dtype=np.float32), ny)
    y = np.repeat(np.arange(ny, dtype=np.float32), nx)
    acc = noise.copy()
    for k in range(1, 9):
        for sign in (-k, k):
            sx = np.clip(np.rint(x + sign * c), 0, nx - 1).astype(np.int32)
            sy = np.clip(np.rint(y + sign * s), 0, ny - 1).astype(np.int32)
            acc += noise.take(sy * nx + sx)
    acc = ndimage.gaussian_filter(acc.reshape(ny, nx), 0.5)
    return acc / max(float(acc.std()), 1e-12)


def _jitter_colour(base, n, rng, sd=0.07) -> np.ndarray:
    scale = np.exp(rng.normal(0, sd, (n, 1)))
    return np.clip(np.asarray(base, np.float32)[None, :] * scale, 0, 255)


def _stamp_nuclei(canvas, layout, t, cfg, rng, grain, centres=None, angle=None):
    look = NUCLEI[t]
    sel = layout.cell_type == t
    xy = layout.xy_um[sel] if centres is None else centres
    ang = layout.angle[sel] if angle is None else angle
    n = len(xy)
    if n == 0:
        return
    a = rng.uniform(*look.semi_major_um, n) / cfg.mpp
    b = a * rng.uniform(*look.aspect, n)
    params = {"a": a, "b": b, "theta": ang}
    if look.irregularity:
        params.update(h2=rng.uniform(0, look.irregularity, n), p2=rng.uniform(0, 6.3, n),
                      h3=rng.uniform(0, look.irregularity * 0.8, n), p3=rng.uniform(0, 6.3, n))
    half = int(np.ceil(look.semi_major_um[1] * (1 + look.irregularity * 2) / cfg.mpp)) + 2
    _stamp(canvas, xy[:, 0] / cfg.mpp, xy[:, 1] / cfg.mpp, half, _ellipse_alpha,
           _jitter_colour(look.colour, n, rng), params, texture=grain,
           texture_amp=look.chromatin, max_alpha=0.96)


def _draw_adipocytes(canvas, layout, cfg, rng, grain) -> None:
    """Membranes are the Voronoi edges between adipocyte centres inside the adipose region."""
    H, W = cfg.shape_px
    mpp, g = cfg.mpp, cfg.grid_um
    sel = layout.cell_type == ADIPOCYTE
    centres = layout.xy_um[sel] / mpp
    # the region outline the background colours blend across, smooth at full resolution
    fat = _resize(ndimage.gaussian_filter((layout.region == ADIPOCYTE).astype(np.float32),
                                          1.0 / g), (H, W)) > 0.5
    py, px = np.nonzero(fat)
    if len(centres) >= 2:
        d, i = cKDTree(centres).query(np.column_stack([px, py]), k=2)
        # distance to the bisector between the nearest two centres
        gap = (d[:, 1] ** 2 - d[:, 0] ** 2) / (2 * np.linalg.norm(
            centres[i[:, 0]] - centres[i[:, 1]], axis=1))
        alpha = np.clip((0.45 / mpp - gap) / 0.7 + 0.5, 0, 1)[:, None] * 0.85
        colour = _jitter_colour(MEMBRANE, len(centres), rng, 0.04)[i[:, 0]]
        canvas[py, px] = canvas[py, px] * (1 - alpha) + colour * alpha
    # close the cells where the fat region meets glass or other tissue
    width = max(1, int(round(0.9 / mpp)))
    edge = fat & ~ndimage.binary_erosion(fat, iterations=width, border_value=1)
    ey, ex = np.nonzero(edge)
    canvas[ey, ex] = canvas[ey, ex] * 0.15 + np.float32(MEMBRANE) * 0.85
    # a flat nucleus pressed against the membrane facing the nearest neighbour, in half the cells
    xy = layout.xy_um[sel]
    n = len(xy)
    toward = layout.angle[sel].astype(np.float64)
    reach = np.full(n, cfg.cell_spacing_um["adipocyte"] / 2)
    if n >= 2:
        d, j = cKDTree(xy).query(xy, k=2)
        toward = np.arctan2(*(xy[j[:, 1]] - xy).T[::-1])
        reach = d[:, 1] / 2
    nuc = xy + (reach - 1.3)[:, None] * np.stack([np.cos(toward), np.sin(toward)], 1)
    shown = rng.random(n) < 0.5
    _stamp_nuclei(canvas, layout, ADIPOCYTE, cfg, rng, grain, centres=nuc[shown],
                  angle=toward[shown] + np.pi / 2)


def render_he(cfg: SyntheticConfig, layout: Layout, rng: np.random.Generator,
              stain: np.ndarray | None = None) -> np.ndarray:
    """H&E-like RGB uint8 image (H, W, 3) of a layout at ``cfg.mpp``; ``stain``: per-channel
    scale of the optical density (the section's staining; None: 1)."""
    section = np.ones(3, np.float32) if stain is None else np.asarray(stain, np.float32)
    H, W = cfg.shape_px
    mpp = cfg.mpp
    # region backgrounds, soft at the boundaries
    lut = np.array([REGION_COLOUR[k] for k in (*range(len(CELL_TYPES)), GLASS)], np.float32)
    fib = np.array([REGION_FIBRES[k] for k in (*range(len(CELL_TYPES)), GLASS)], np.float32)
    soft = 1.0 / cfg.grid_um   # 1 um
    bg = ndimage.gaussian_filter(lut[layout.region], (soft, soft, 0))
    fib_w = ndimage.gaussian_filter(fib[layout.region], soft)
    canvas = _resize(bg, (H, W))
    fibres = _resize(_fibre_texture(cfg, layout.orientation, rng), (H, W))
    fibres *= _resize(fib_w, (H, W))
    canvas *= 1 + 0.09 * fibres[..., None] * np.array([0.35, 1.0, 0.6], np.float32)
    del fibres
    grain = ndimage.gaussian_filter(rng.standard_normal((H, W), dtype=np.float32), 0.8)
    grain /= max(float(grain.std()), 1e-12)

    # glands: epithelial annulus, then a white lumen
    gl = layout.glands
    if len(gl):
        n = len(gl)
        ring_mid = (gl[:, 2] + cfg.gland_epithelium_um / 2) / mpp
        wob = {"h2": np.zeros(n), "p2": np.zeros(n), "h3": np.zeros(n), "p3": np.zeros(n)}
        half = int(np.ceil((cfg.lumen_radius_um[1] + cfg.gland_epithelium_um) / mpp)) + 3
        _stamp(canvas, gl[:, 0] / mpp, gl[:, 1] / mpp, half, _ring_alpha,
               _jitter_colour(GLAND_EPITHELIUM, n, rng, 0.04),
               {"r": ring_mid, "width": np.full(n, cfg.gland_epithelium_um / mpp), **wob},
               texture=grain, texture_amp=0.03)
        _stamp(canvas, gl[:, 0] / mpp, gl[:, 1] / mpp, half, _ellipse_alpha,
               np.tile(np.float32(LUMEN), (n, 1)),
               {"a": gl[:, 2] / mpp, "b": gl[:, 2] / mpp, "theta": np.zeros(n)})

    # adipocytes: large empty cells sharing thin pink membranes, flat nuclei against them
    sel = layout.cell_type == ADIPOCYTE
    if sel.any():
        _draw_adipocytes(canvas, layout, cfg, rng, grain)

    # tumour cytoplasm: a mosaic of slightly different pink-purple cells
    sel = layout.cell_type == TUMOUR
    tum = layout.xy_um[sel]
    n = len(tum)
    if n:
        r = cfg.cell_spacing_um["tumour"] * 0.55 / mpp * rng.uniform(0.9, 1.1, n)
        _stamp(canvas, tum[:, 0] / mpp, tum[:, 1] / mpp, int(np.ceil(r.max())) + 2,
               _ellipse_alpha, _jitter_colour(CYTOPLASM_TUMOUR, n, rng, 0.06),
               {"a": r, "b": r * 0.9, "theta": rng.uniform(0, np.pi, n)}, max_alpha=0.7)

    for t in (STROMA, DUCT, TUMOUR, LYMPHOCYTE):
        _stamp_nuclei(canvas, layout, t, cfg, rng, grain)

    # stain intensity variation, optical blur, sensor noise
    stain = _resize(_smooth_field(layout.region.shape, 150.0 / cfg.grid_um, rng), (H, W))
    canvas = 255 - (255 - canvas) * ((1 + 0.08 * stain)[..., None] * section)
    blur = 0.3 / mpp
    for ch in range(3):
        canvas[..., ch] = ndimage.gaussian_filter(canvas[..., ch], blur)
    canvas += 2.0 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- expression

def gene_panel(n_genes: int) -> pd.DataFrame:
    """var table: named programme genes first, then background genes ``GENE###``."""
    names, programmes = [], []
    for programme, genes in GENE_PROGRAMMES.items():
        names += list(genes)
        programmes += [programme] * len(genes)
    for i in range(len(names), n_genes):
        names.append(f"GENE{i + 1:03d}")
        programmes.append("background")
    var = pd.DataFrame({"programme": pd.Categorical(programmes)}, index=pd.Index(names))
    return var


def type_profiles(var: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """(n_types, n_genes) expression fractions (rows sum to 1): log-normal background, strong
    type programmes, high housekeeping genes, low baseline for induced genes."""
    T, G = len(CELL_TYPES), len(var)
    w = np.exp(rng.normal(0, 0.8, G))[None, :] * np.exp(rng.normal(0, 0.4, (T, G)))
    prog = var["programme"].to_numpy()
    for programme in GENE_PROGRAMMES:
        idx = np.flatnonzero(prog == programme)
        k = len(idx)
        if programme == "housekeeping":
            level = 15 * np.exp(rng.normal(0, 0.3, k))
            w[:, idx] = level[None] * np.exp(rng.normal(0, 0.1, (T, k)))
        elif programme in INDUCTIONS:
            w[:, idx] = 0.2 * np.exp(rng.normal(0, 0.3, (T, k)))
        else:
            high = 20 * np.exp(rng.normal(0, 0.4, k))
            w[:, idx] = 0.15 * np.exp(rng.normal(0, 0.4, (T, k)))
            for t in PROGRAMME_TYPES[programme]:
                w[t, idx] = high * np.exp(rng.normal(0, 0.15, k))
    return w / w.sum(axis=1, keepdims=True)


def neighbour_fractions(xy_um: np.ndarray, cell_type: np.ndarray, radius_um: float) -> np.ndarray:
    """(n, n_types) fraction of each type among the other cells within ``radius_um``
    (zeros for a cell with no neighbour)."""
    n, T = len(xy_um), len(CELL_TYPES)
    pairs = cKDTree(xy_um).query_pairs(radius_um, output_type="ndarray")
    counts = np.zeros(n * T)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        counts += np.bincount(i * T + cell_type[j], minlength=n * T)
        counts += np.bincount(j * T + cell_type[i], minlength=n * T)
    counts = counts.reshape(n, T)
    total = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(total, 1)


@dataclass
class Biology:
    """How a dataset's cells express genes: ``profiles`` (n_types, n_genes) expression fractions
    per cell type, ``induction`` {programme: (n_programme_genes,) strength}."""
    var: pd.DataFrame
    profiles: np.ndarray
    induction: dict[str, np.ndarray]


def dataset_biology(cfg: SyntheticConfig) -> Biology:
    """The biology shared by every section of a dataset, drawn from ``cfg.dataset_seed``
    (``cfg.seed`` when None) alone: the same profiles and induction strengths for every
    section seed."""
    seed = cfg.seed if cfg.dataset_seed is None else cfg.dataset_seed
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(101,)))
    var = gene_panel(cfg.n_genes)
    profiles = type_profiles(var, rng)
    prog = var["programme"].to_numpy()
    induction = {programme: cfg.induction_strength
                 * np.exp(rng.normal(0, 0.2, int((prog == programme).sum())))
                 for programme in INDUCTIONS}
    return Biology(var, profiles, induction)


def section_profiles(biology: Biology, batch_effect_sd: float,
                     rng: np.random.Generator) -> np.ndarray:
    """The profiles one section expresses: the dataset's, times a per-section log-normal batch
    effect per (type, gene) when ``batch_effect_sd > 0`` (renormalised to sum to 1)."""
    if batch_effect_sd <= 0:
        return biology.profiles
    noisy = biology.profiles * np.exp(rng.normal(0, batch_effect_sd, biology.profiles.shape))
    return noisy / noisy.sum(axis=1, keepdims=True)


def simulate_expression(cfg: SyntheticConfig, xy_um: np.ndarray, cell_type: np.ndarray,
                        rng: np.random.Generator, *, biology: Biology | None = None,
                        profiles: np.ndarray | None = None, depth: float = 1.0):
    """Expected rates and Poisson counts per cell.

    ``biology``: the dataset's (default :func:`dataset_biology` of ``cfg``); ``profiles``: the
    section's profiles (default the dataset's); ``depth``: the section's library-size factor.
    Returns (counts CSR int32 (n, G), rate float32 (n, G), var, library float (n,),
    neighbour fractions (n, T)).
    """
    biology = biology or dataset_biology(cfg)
    var = biology.var
    profiles = biology.profiles if profiles is None else profiles
    lib_type = np.array([cfg.library_size[t] for t in CELL_TYPES]) * float(depth)
    sd = cfg.library_log_sd
    library = lib_type[cell_type] * np.exp(rng.normal(-sd ** 2 / 2, sd, len(cell_type)))
    rate = library[:, None] * profiles[cell_type]
    frac = neighbour_fractions(xy_um, cell_type, cfg.neighbourhood_um)
    prog = var["programme"].to_numpy()
    for programme, (source, responders) in INDUCTIONS.items():
        idx = np.flatnonzero(prog == programme)
        strength = biology.induction[programme]
        resp = np.isin(cell_type, responders)
        rate[np.ix_(resp, idx)] += (library[resp] * frac[resp, source])[:, None] * strength[None]
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.int32))
    return counts, rate.astype(np.float32), var, library, frac


# ----------------------------------------------------------------------------- aggregation

def disc_membership(points_px: np.ndarray, centres_px: np.ndarray,
                    radius_px: float) -> sp.csr_matrix:
    """(n_discs, n_points) 0/1 CSR: point centre within ``radius_px`` (inclusive) of a disc."""
    points_px = np.asarray(points_px, np.float64)
    centres_px = np.asarray(centres_px, np.float64).reshape(-1, 2)
    n_points = len(points_px)
    if n_points == 0 or len(centres_px) == 0:
        return sp.csr_matrix((len(centres_px), n_points), dtype=np.int8)
    hits = cKDTree(points_px).query_ball_point(centres_px, r=radius_px)
    lengths = np.fromiter((len(h) for h in hits), np.int64, len(hits))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.fromiter(itertools.chain.from_iterable(hits), np.int64, int(indptr[-1]))
    data = np.ones(len(indices), np.int8)
    m = sp.csr_matrix((data, indices, indptr), shape=(len(centres_px), n_points))
    m.sort_indices()
    return m


def _as_csr(matrix) -> sp.csr_matrix:
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))


def aggregate_discs(highres: ad.AnnData, centres_px: np.ndarray, radius_px: float, *,
                    layer: str | None = None) -> sp.csr_matrix:
    """Sum the rows (``X`` or ``layers[layer]``) of point-like ``highres`` whose centre
    (``obsm["spatial"]``, px) lies inside each disc; (n_discs, n_genes) CSR, exact for counts."""
    values = _as_csr(highres.X if layer is None else highres.layers[layer])
    member = disc_membership(highres.obsm["spatial"], centres_px, radius_px)
    return (member.astype(values.dtype) @ values).tocsr()


def aggregate_bins(highres: ad.AnnData, bin_um: float, mpp: float,
                   origin: tuple[float, float] = (0.0, 0.0),
                   shape: tuple[int, int] | None = None, *,
                   keep_empty: bool = False) -> ad.AnnData:
    """Sum point-like ``highres`` rows into square bins of side ``bin_um``.

    The grid starts at ``origin`` (x, y) level-0 px and has ``shape`` = (n_rows, n_cols) bins
    (default: enough to reach the last point). A point belongs to bin (row, col) when
    ``origin + col*side <= x < origin + (col+1)*side`` (same for y), ``side = bin_um / mpp`` px;
    points outside the grid are dropped (logged). Returns bins (only non-empty ones unless
    ``keep_empty``) with X (CSR) and every layer summed, obs row, col, n_points, diameter_um,
    obsm["spatial"] = bin centres (px), obs_names ``bin_{row}x{col}``.
    """
    if bin_um <= 0 or mpp <= 0:
        raise ValueError(f"bin_um and mpp must be positive, got {bin_um}, {mpp}")
    side = bin_um / mpp
    xy = np.asarray(highres.obsm["spatial"], np.float64)
    col = np.floor((xy[:, 0] - origin[0]) / side).astype(np.int64)
    row = np.floor((xy[:, 1] - origin[1]) / side).astype(np.int64)
    if shape is None:
        shape = (int(row.max()) + 1 if len(row) else 0, int(col.max()) + 1 if len(col) else 0)
    n_rows, n_cols = int(shape[0]), int(shape[1])
    inside = (row >= 0) & (row < n_rows) & (col >= 0) & (col < n_cols)
    if (~inside).any():
        log.info("aggregate_bins: %d of %d points lie outside the %dx%d grid of %g um bins; "
                 "dropped", int((~inside).sum()), len(xy), n_rows, n_cols, bin_um)
    bin_id = row[inside] * n_cols + col[inside]
    ids = np.arange(n_rows * n_cols) if keep_empty else np.unique(bin_id)
    member = sp.csr_matrix((np.ones(len(bin_id), np.int8),
                            (np.searchsorted(ids, bin_id), np.flatnonzero(inside))),
                           shape=(len(ids), len(xy)))
    values = _as_csr(highres.X)
    X = (member.astype(values.dtype) @ values).tocsr()
    layers = {}
    for name, layer in highres.layers.items():
        summed = member.astype(layer.dtype) @ layer
        layers[name] = summed.tocsr() if sp.issparse(summed) else np.asarray(summed)
    b_row, b_col = ids // max(n_cols, 1), ids % max(n_cols, 1)
    obs = pd.DataFrame({"row": b_row, "col": b_col,
                        "n_points": np.asarray(member.sum(axis=1)).ravel().astype(np.int64),
                        "diameter_um": float(bin_um)},
                       index=pd.Index([f"bin_{r}x{c}" for r, c in zip(b_row, b_col)]))
    bins = ad.AnnData(X=X, obs=obs, var=highres.var.copy(), layers=layers)
    bins.obsm["spatial"] = np.column_stack([origin[0] + (b_col + 0.5) * side,
                                            origin[1] + (b_row + 0.5) * side])
    bins.uns["bins"] = {"bin_um": float(bin_um), "mpp": float(mpp),
                        "origin_px": [float(origin[0]), float(origin[1])],
                        "shape": [n_rows, n_cols]}
    return bins


# ----------------------------------------------------------------------------- spots

def spot_grid(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres (n, 2) px and their (row, col) on a hex or square grid whose discs fit in
    the image."""
    H, W = cfg.shape_px
    step = cfg.spot_spacing_um / cfg.mpp
    radius = cfg.spot_diameter_um / 2 / cfg.mpp
    dy = step * np.sqrt(3) / 2 if cfg.spot_grid == "hex" else step
    rows, cols, xs, ys = [], [], [], []
    for r, y in enumerate(np.arange(radius, H - radius + 1e-9, dy)):
        shift = step / 2 if (cfg.spot_grid == "hex" and r % 2) else 0.0
        x = np.arange(radius + shift, W - radius + 1e-9, step)
        rows.append(np.full(len(x), r))
        cols.append(np.arange(len(x)))
        xs.append(x)
        ys.append(np.full(len(x), y))
    centres = np.column_stack([np.concatenate(xs), np.concatenate(ys)])
    return centres, np.concatenate(rows), np.concatenate(cols)


def make_spots(cfg: SyntheticConfig, cells: ad.AnnData) -> tuple[ad.AnnData, int]:
    """Spots whose disc holds >= 1 cell centre; X = exact sum of those cells' counts.
    Returns (spots, number of grid spots dropped as empty)."""
    centres, rows, cols = spot_grid(cfg)
    radius = cfg.spot_diameter_um / 2 / cfg.mpp
    member = disc_membership(cells.obsm["spatial"], centres, radius)
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    keep = n_cells > 0
    n_dropped = int((~keep).sum())
    log.info("synthetic spots: %d of %d grid spots hold no cell centre; dropped",
             n_dropped, len(keep))
    member = member[keep]
    X = (member.astype(cells.X.dtype) @ cells.X).tocsr()
    rate = np.asarray(member.astype(np.float32) @ cells.layers["rate"], dtype=np.float32)
    obs = pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep],
                        "n_cells": n_cells[keep].astype(np.int64),
                        "diameter_um": float(cfg.spot_diameter_um)},
                       index=pd.Index([f"spot_{r}x{c}" for r, c in zip(rows[keep], cols[keep])]))
    spots = ad.AnnData(X=X, obs=obs, var=cells.var.copy(), layers={"rate": rate})
    spots.obsm["spatial"] = centres[keep].astype(np.float64)
    return spots, n_dropped


# ----------------------------------------------------------------------------- sample

def section_variation(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """How one section differs from the others of its dataset besides its layout: region biases
    (composition), per-channel stain scale, library-size factor (depth)."""
    shift = rng.normal(0, cfg.composition_sd, len(CELL_TYPES))
    bias = {t: float(cfg.region_bias.get(t, 0.0) + d) for t, d in zip(CELL_TYPES, shift)}
    stain = np.exp(rng.normal(0, cfg.stain_sd, 3))
    depth = float(np.exp(rng.normal(0, cfg.depth_log_sd)))
    return {"region_bias": bias, "stain": [float(v) for v in stain], "depth": depth}


def simulate(cfg: SyntheticConfig) -> SyntheticData:
    """Generate a whole sample in memory (deterministic given ``cfg.seed`` and
    ``cfg.dataset_seed``)."""
    layout_rng, expr_rng, image_rng, section_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4))
    section = section_variation(cfg, section_rng)
    biology = dataset_biology(cfg)
    profiles = section_profiles(biology, cfg.batch_effect_sd, section_rng)
    layout = make_layout(replace(cfg, region_bias=section["region_bias"]), layout_rng)
    counts, rate, var, library, frac = simulate_expression(
        cfg, layout.xy_um, layout.cell_type, expr_rng, biology=biology, profiles=profiles,
        depth=section["depth"])
    xy_px = layout.xy_um / cfg.mpp
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(layout.cell_type.astype(np.int64),
                                                categories=list(CELL_TYPES)),
         "x_px": xy_px[:, 0], "y_px": xy_px[:, 1], "library_size": library},
        index=pd.Index([f"cell_{i:06d}" for i in range(len(xy_px))]))
    for t, name in enumerate(CELL_TYPES):
        obs[f"frac_{name}"] = frac[:, t]
    cells = ad.AnnData(X=counts, obs=obs, var=var.copy(), layers={"rate": rate})
    cells.varm["type_profile"] = np.ascontiguousarray(profiles.T)  # (genes, cell types)
    cells.obsm["spatial"] = xy_px.astype(np.float64)
    dataset_seed = int(cfg.seed if cfg.dataset_seed is None else cfg.dataset_seed)
    cells.uns["synthetic"] = {"seed": int(cfg.seed), "dataset_seed": dataset_seed,
                              "mpp": float(cfg.mpp),
                              "neighbourhood_um": float(cfg.neighbourhood_um),
                              "cell_types": list(CELL_TYPES)}
    spots, n_dropped = make_spots(cfg, cells)
    image = render_he(cfg, layout, image_rng, stain=np.asarray(section["stain"]))
    H, W = cfg.shape_px
    meta = {"format": FORMAT, "seed": int(cfg.seed), "dataset_seed": dataset_seed,
            "section": section, "mpp": float(cfg.mpp),
            "spot_diameter_um": float(cfg.spot_diameter_um),
            "spot_spacing_um": float(cfg.spot_spacing_um), "spot_grid": cfg.spot_grid,
            "size_px": [W, H], "cell_types": list(CELL_TYPES), "n_cells": int(cells.n_obs),
            "n_spots": int(spots.n_obs), "n_spots_dropped": n_dropped,
            "n_glands": int(len(layout.glands)), "config": asdict(cfg)}
    log.info("synthetic sample (seed %d): %d cells (%s), %d spots, image %dx%d px",
             cfg.seed, cells.n_obs,
             ", ".join(f"{k} {v}" for k, v in cells.obs["cell_type"].value_counts().items()),
             spots.n_obs, W, H)
    return SyntheticData(image=image, cells=cells, spots=spots, meta=meta)


def write_sample(data: SyntheticData, out_dir: str | Path) -> Path:
    """Write ``he.tif``, ``cells.h5ad``, ``spots.h5ad``, ``meta.json`` atomically: into a
    temporary sibling folder renamed at the end, so a failure leaves no partial folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_pyramid(data.image, tmp / "he.tif", data.meta["mpp"])
        data.cells.write_h5ad(tmp / "cells.h5ad")
        data.spots.write_h5ad(tmp / "spots.h5ad")
        (tmp / "meta.json").write_text(json.dumps(data.meta, indent=2) + "\n")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def simulate_sample(out_dir: str | Path, *, seed: int, config: SyntheticConfig | None = None,
                    **params) -> None:
    """Generate the synthetic sample of ``seed`` into ``out_dir`` (see module docstring).

    ``params`` are :class:`SyntheticConfig` fields (size_um=(w, h) um, mpp, n_genes,
    spot_diameter_um, spot_spacing_um, ...), applied over ``config`` when given.
    """
    cfg = replace(config, seed=seed, **params) if config else SyntheticConfig(seed=seed, **params)
    write_sample(simulate(cfg), out_dir)
