"""The H&E-like image of a synthetic section (simulate_sample): region backgrounds with collagen
fibres, nuclei drawn per cell type, glands and adipocytes, stained per section
(:func:`render_he`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from histomap.data.synthetic_config import (ADIPOCYTE, CELL_TYPES, DUCT, GLASS, LYMPHOCYTE, STROMA,
                                            TUMOUR, SyntheticConfig)
from histomap.data.synthetic_layout import Layout, resize_field, smooth_field
from histomap.data.synthetic_patient import apply_stain


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
    fat = resize_field(ndimage.gaussian_filter((layout.region == ADIPOCYTE).astype(np.float32),
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
              stain: np.ndarray | None = None,
              patient_stain: np.ndarray | None = None) -> np.ndarray:
    """H&E-like RGB uint8 image (H, W, 3) of a layout at ``cfg.mpp``; ``stain``: per-channel
    scale of the optical density (the section's staining; None: 1); ``patient_stain``: the
    patient's (3, 3) optical-density transform (restained H and E vectors and amounts,
    :meth:`histomap.data.synthetic_patient.Patient.od_transform`; None: none)."""
    section = np.ones(3, np.float32) if stain is None else np.asarray(stain, np.float32)
    H, W = cfg.shape_px
    mpp = cfg.mpp
    # region backgrounds, soft at the boundaries
    lut = np.array([REGION_COLOUR[k] for k in (*range(len(CELL_TYPES)), GLASS)], np.float32)
    fib = np.array([REGION_FIBRES[k] for k in (*range(len(CELL_TYPES)), GLASS)], np.float32)
    soft = 1.0 / cfg.grid_um   # 1 um
    bg = ndimage.gaussian_filter(lut[layout.region], (soft, soft, 0))
    fib_w = ndimage.gaussian_filter(fib[layout.region], soft)
    canvas = resize_field(bg, (H, W))
    fibres = resize_field(_fibre_texture(cfg, layout.orientation, rng), (H, W))
    fibres *= resize_field(fib_w, (H, W))
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

    if patient_stain is not None:  # the patient's H and E, before the section's own variation
        canvas = apply_stain(canvas, patient_stain)
    # stain intensity variation, optical blur, sensor noise
    stain = resize_field(smooth_field(layout.region.shape, 150.0 / cfg.grid_um, rng), (H, W))
    canvas = 255 - (255 - canvas) * ((1 + 0.08 * stain)[..., None] * section)
    blur = 0.3 / mpp
    for ch in range(3):
        canvas[..., ch] = ndimage.gaussian_filter(canvas[..., ch], blur)
    canvas += 2.0 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
