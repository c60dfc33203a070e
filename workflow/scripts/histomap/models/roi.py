"""ROI aggregation of a dense map (discs and square bins): predict any spot from the dense map.

Geometry (dense-map pixel units)
--------------------------------
A dense map ``G`` has shape (B, C, H, W). Map pixel (row i, column j) covers the square
``[j, j + 1) x [i, i + 1)`` in continuous (x, y) map coordinates, so a disc centred on pixel
(i, j)'s middle has centre ``(j + 0.5, i + 0.5)``. ``G`` is expression per unit pixel area.

The weight of a pixel in a disc is the **exact** area of the intersection of the disc with the
pixel square (analytic, no sampling), so discs of any size are handled, including sub-pixel discs
wholly inside one pixel (weight = pi r^2). Only a (2k + 1)^2 window of pixels around each disc
centre is evaluated (k = ceil(max radius)), so the cost is O(N r^2), not O(N H W).

Square bins (Visium HD) are axis-aligned squares of half-side ``r`` (the "radius" of the same
calls): a pixel's weight is the exact area of the square inside it, the product of the overlaps
of the two intervals, so a bin lying on the map grid gets weight 1 on the pixels it covers.

Gradients flow to ``G``; the geometry (centres, radii, shapes) is treated as fixed data.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODES = ("mean", "sum")


def _primitive(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """H(t) = integral_0^t sqrt(r^2 - s^2) ds for 0 <= t <= r."""
    ratio = torch.clamp(t / r, -1.0, 1.0)
    return 0.5 * (t * torch.sqrt(torch.clamp(r * r - t * t, min=0.0)) + r * r * torch.asin(ratio))


def _quadrant_area(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Area of the disc (centre 0, radius r) inside the box [0, a] x [0, b], for a, b >= 0.

    Integrates min(b, h(t)) over t in [0, min(a, r)], with h(t) = sqrt(r^2 - t^2): the column is
    capped by b while h(t) >= b, i.e. for t <= t_b = sqrt(r^2 - b^2).
    """
    a_in = torch.minimum(a, r)
    t_b = torch.sqrt(torch.clamp(r * r - b * b, min=0.0))
    m = torch.minimum(a_in, t_b)
    return b * m + _primitive(a_in, r) - _primitive(m, r)


def _signed_corner_area(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed disc area between the centre and the corner (x, y) (the 2-D antiderivative).

    The disc is symmetric in both axes, so A(x, y) = sign(x) sign(y) Q(|x|, |y|), and the area
    inside any rectangle [x0, x1] x [y0, y1] is A(x1, y1) - A(x0, y1) - A(x1, y0) + A(x0, y0).
    """
    return torch.sign(x) * torch.sign(y) * _quadrant_area(x.abs(), y.abs(), r)


def disc_pixel_areas(centres: torch.Tensor, radii: torch.Tensor, half_width: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact disc-pixel intersection areas on a window around each disc centre.

    Args:
        centres: (N, 2) disc centres (x, y) in map pixels (float64 recommended).
        radii: (N,) radii in map pixels.
        half_width: k; the window is pixels floor(c) - k .. floor(c) + k in x and y.

    Returns:
        areas (N, 2k+1, 2k+1) indexed [n, dy, dx] in pixel-area units, and the integer pixel
        columns (N, 2k+1) and rows (N, 2k+1) of the window (may lie outside the map).
    """
    offsets = torch.arange(-half_width, half_width + 2, device=centres.device,
                           dtype=centres.dtype)                       # 2k + 2 pixel edges
    base = torch.floor(centres)                                       # (N, 2)
    # the window's areas depend on the centre's place within its pixel and the radius only:
    # discs on a lattice (a row of pseudo-spots, a Visium array) share them, so each distinct
    # (place, radius) is computed once
    key = torch.cat([centres - base, radii[:, None].to(centres.dtype)], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(unique) < len(key):
        areas = _window_disc_areas(unique[:, :2], unique[:, 2], offsets)[inverse]
    else:
        areas = _window_disc_areas(key[:, :2], key[:, 2], offsets)
    cols = base[:, 0:1].long() + offsets[:-1].long()
    rows = base[:, 1:2].long() + offsets[:-1].long()
    return areas, cols, rows


def _window_disc_areas(place: torch.Tensor, radii: torch.Tensor, offsets: torch.Tensor
                       ) -> torch.Tensor:
    """(N, 2k+1, 2k+1) disc-pixel areas of :func:`disc_pixel_areas` for discs whose centres
    lie at ``place`` (N, 2) in [0, 1)^2 within their pixel."""
    r = torch.clamp(radii, min=1e-12)[:, None, None]
    x_edges = (offsets - place[:, 0:1])[:, None, :]                   # (N, 1, 2k+2)
    y_edges = (offsets - place[:, 1:2])[:, :, None]                   # (N, 2k+2, 1)
    corner = _signed_corner_area(x_edges, y_edges, r)                 # (N, 2k+2, 2k+2)
    areas = corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]
    areas = torch.clamp(areas, min=0.0)  # remove round-off negatives far outside the disc
    # pixels outside the disc's bounding box get exactly 0 (the corner differences leave
    # round-off there, which would give a disc lying off the map a spurious mean)
    in_x = (x_edges[..., 1:] > -r) & (x_edges[..., :-1] < r)          # (N, 1, 2k+1)
    in_y = (y_edges[:, 1:, :] > -r) & (y_edges[:, :-1, :] < r)        # (N, 2k+1, 1)
    return torch.where(in_x & in_y, areas, torch.zeros((), dtype=areas.dtype,
                                                        device=areas.device))


def square_pixel_areas(centres: torch.Tensor, half_sides: torch.Tensor, half_width: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact square-pixel intersection areas, as :func:`disc_pixel_areas` (same window and
    return values) for axis-aligned squares of half-side ``half_sides`` centred on ``centres``."""
    offsets = torch.arange(-half_width, half_width + 2, device=centres.device,
                           dtype=centres.dtype)
    base = torch.floor(centres)
    h = torch.clamp(half_sides, min=0.0)[:, None]
    edges_x = base[:, 0:1] + offsets                                  # (N, 2k+2)
    edges_y = base[:, 1:2] + offsets
    lo_x, hi_x = centres[:, 0:1] - h, centres[:, 0:1] + h
    lo_y, hi_y = centres[:, 1:2] - h, centres[:, 1:2] + h
    over_x = torch.clamp(torch.minimum(edges_x[:, 1:], hi_x) - torch.maximum(edges_x[:, :-1], lo_x),
                         min=0.0)                                     # (N, 2k+1)
    over_y = torch.clamp(torch.minimum(edges_y[:, 1:], hi_y) - torch.maximum(edges_y[:, :-1], lo_y),
                         min=0.0)
    areas = over_y[:, :, None] * over_x[:, None, :]                   # [n, dy, dx]
    cols = base[:, 0:1].long() + offsets[:-1].long()
    rows = base[:, 1:2].long() + offsets[:-1].long()
    return areas, cols, rows


def roi_aggregate(dense_map: torch.Tensor, centres: torch.Tensor,
                  radii: torch.Tensor | float, mode: str = "mean",
                  valid: torch.Tensor | None = None,
                  square: torch.Tensor | bool | None = None) -> torch.Tensor:
    """Aggregate a dense map inside discs (or square bins), weighting pixels by their exact
    overlap area.

    Args:
        dense_map: G, (B, C, H, W), expression per unit map-pixel area.
        centres: (B, N, 2) disc centres (x, y) in map pixels (continuous; pixel j covers [j, j+1)).
        radii: (B, N) or a scalar, disc radii in map pixels (may differ from call to call).
        mode: ``"sum"`` = sum of G x overlap area (scales with disc area); ``"mean"`` = that sum
            divided by the disc area lying inside the map (area-weighted mean).
        valid: optional (B, N) bool mask; invalid spots are not computed and come back as 0.
        square: optional (B, N) bool mask (or one bool for all): these spots are axis-aligned
            squares of half-side ``radii`` (Visium HD bins) instead of discs.

    Returns:
        (B, N, C) spot values, differentiable with respect to ``dense_map``. Spots whose disc does
        not overlap the map come back as 0 (logged).
    """
    if mode not in MODES:
        raise ValueError(f"roi_aggregate mode must be one of {MODES}, got {mode!r}")
    if dense_map.ndim != 4:
        raise ValueError(f"dense_map must be (B, C, H, W), got shape {tuple(dense_map.shape)}")
    b, c, h, w = dense_map.shape
    if centres.ndim != 3 or centres.shape[0] != b or centres.shape[-1] != 2:
        raise ValueError(f"centres must be (B={b}, N, 2), got shape {tuple(centres.shape)}")
    n = centres.shape[1]
    device = dense_map.device
    geo = torch.float64 if device.type != "mps" else torch.float32
    centres = centres.to(device=device, dtype=geo)
    radii = torch.as_tensor(radii, device=device, dtype=geo).expand(b, n)
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=device)
    valid = valid.to(device=device, dtype=torch.bool)
    square = torch.as_tensor(False if square is None else square, device=device,
                             dtype=torch.bool).expand(b, n)
    out_dtype = dense_map.dtype if dense_map.dtype == torch.float64 else torch.float32
    out = torch.zeros(b, n, c, dtype=out_dtype, device=device)
    if n == 0 or not bool(valid.any()):
        # still a function of the map (zero gradient), so a batch without a measured spot
        # trains nothing instead of breaking backward()
        return out + 0.0 * dense_map.sum().to(out_dtype) if dense_map.requires_grad else out

    batch_idx, spot_idx = torch.nonzero(valid, as_tuple=True)
    spot_centres = centres[batch_idx, spot_idx]
    spot_radii = radii[batch_idx, spot_idx]
    if bool((spot_radii < 0).any()) or not bool(torch.isfinite(spot_centres).all()):
        raise ValueError("roi_aggregate: radii must be >= 0 and centres finite")
    spot_square = square[batch_idx, spot_idx]
    # Each spot gets the window of its own radius: spots are grouped by window half-width, so a
    # 2 um disc never pays for a 100 um disc's window (pixels beyond a spot's own window have
    # zero overlap, so the sums are the same as with one window for all).
    half_widths = torch.ceil(spot_radii).to(torch.int64).clamp_min(0)
    for hw in torch.unique(half_widths).tolist():
        group = torch.nonzero(half_widths == hw, as_tuple=True)[0]
        if len(group) == len(batch_idx):
            group = slice(None)
        sums = _window_sums(dense_map, batch_idx[group], spot_centres[group], spot_radii[group],
                            spot_square[group], int(hw), mode, out_dtype)
        out = out.index_put((batch_idx[group], spot_idx[group]), sums)
    return out


def _window_sums(dense_map: torch.Tensor, batch_idx: torch.Tensor, centres: torch.Tensor,
                 radii: torch.Tensor, square: torch.Tensor, half_width: int, mode: str,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """(n, C) aggregates of n spots (flattened over the batch) within windows of
    ``2 * half_width + 1`` pixels around their centre pixels."""
    b, c, h, w = dense_map.shape
    device, geo = centres.device, centres.dtype
    with torch.no_grad():
        areas, cols, rows = disc_pixel_areas(centres, radii, half_width)
        if bool(square.any()):
            box_areas = square_pixel_areas(centres, radii, half_width)[0]
            areas = torch.where(square[:, None, None], box_areas, areas)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        areas = torch.where(inside, areas, torch.zeros((), dtype=geo, device=device))
        pixel = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
        pixel = pixel + batch_idx[:, None, None] * (h * w)
        area_inside = areas.sum(dim=(1, 2))

    weights = areas.reshape(len(batch_idx), -1).to(out_dtype)
    flat_map = dense_map.to(out_dtype).permute(0, 2, 3, 1).reshape(b * h * w, c)
    with torch.autocast(device_type=device.type, enabled=False):  # keep fp32 under AMP
        sums = F.embedding_bag(pixel.reshape(len(batch_idx), -1), flat_map,
                               per_sample_weights=weights, mode="sum")
    empty = area_inside <= 0
    if bool(empty.any()):
        log.warning("roi_aggregate: %d of %d valid spots do not overlap the %dx%d map; their "
                    "values are set to 0", int(empty.sum()), len(batch_idx), h, w)
    if mode == "mean":
        denom = torch.where(empty, torch.ones_like(area_inside), area_inside).to(out_dtype)
        sums = sums / denom[:, None]
    return sums


class DenseSpotsMixin:
    """``forward_spots`` for a module whose ``forward(images)`` returns a dense map
    (B, genes, h, w): the map and its spot predictions (B, N, genes)."""

    def forward_spots(self, images: torch.Tensor, centres: torch.Tensor,
                      radii: torch.Tensor | float, mode: str = "mean",
                      valid: torch.Tensor | None = None,
                      square: torch.Tensor | bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense map and the spot predictions; centres/radii in map pixels, ``square`` marks
        square bins (see :func:`roi_aggregate`)."""
        dense_map = self(images)
        return dense_map, roi_aggregate(dense_map, centres, radii, mode=mode, valid=valid,
                                        square=square)


def discs_from_spots(centres_level0_px, diameter_um, slide_mpp: float, map_origin_px,
                     map_mpp: float):
    """Convert spot centres and diameters to disc centres and radii in dense-map pixels.

    Args:
        centres_level0_px: (..., 2) spot centres (x, y) in level-0 slide pixels (numpy or torch).
        diameter_um: spot diameter(s) in micrometres (scalar or broadcastable to (...)).
        slide_mpp: micrometres per level-0 pixel.
        map_origin_px: (x, y) of the map's top-left corner in level-0 pixels (broadcastable to
            (..., 2)), i.e. the level-0 position of the edge of map pixel (0, 0).
        map_mpp: micrometres per dense-map pixel (input mpp x output stride).

    Returns:
        (centres, radii): centres (..., 2) and radii (...) in map pixels, same array type.
    """
    if slide_mpp <= 0 or map_mpp <= 0:
        raise ValueError(f"mpp must be positive (slide_mpp={slide_mpp}, map_mpp={map_mpp})")
    if isinstance(centres_level0_px, torch.Tensor):
        like = centres_level0_px
        origin = torch.as_tensor(map_origin_px, dtype=like.dtype, device=like.device)
        diameter = torch.as_tensor(diameter_um, dtype=like.dtype, device=like.device)
    else:
        like = np.asarray(centres_level0_px, dtype=np.float64)
        origin = np.asarray(map_origin_px, dtype=np.float64)
        diameter = np.asarray(diameter_um, dtype=np.float64)
    centres = (like - origin) * (slide_mpp / map_mpp)
    radii = diameter / (2.0 * map_mpp)
    shape = centres.shape[:-1]
    if isinstance(radii, torch.Tensor):
        return centres, radii.expand(shape).clone()
    return centres, np.broadcast_to(radii, shape).copy()
