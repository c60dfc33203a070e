"""Where a dense map lies and how prediction tiles cover it (predict_{model}, apply): the map grid
on the slide (:class:`DenseGrid`, :func:`plan_grid`), the tissue coverage mask, the tiles to run,
the seamless blending weights and the band accumulator that turns blended tile outputs into
finished map rows with bounded memory. See :mod:`histomap.tasks.dense_map` for the whole.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

TILE_COLUMNS = ("x0_px", "y0_px", "size_px0")  # the tile_slide index: level-0 tissue tiles

# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class DenseGrid:
    """Where a dense map lies on the slide and how the prediction tiles cover it.

    ``origin_px``: level-0 (x, y) of the map's top-left corner; ``height``/``width``: map size
    (map pixels); ``tile``/``step``: prediction tile side and grid step (map pixels).
    """

    origin_px: tuple[float, float]
    slide_mpp: float
    input_mpp: float
    out_stride: int
    height: int
    width: int
    tile: int
    step: int

    @property
    def mpp(self) -> float:
        """Micrometres per map pixel."""
        return self.input_mpp * self.out_stride

    @property
    def px0_per_input(self) -> float:
        """Level-0 pixels per model-input pixel."""
        return self.input_mpp / self.slide_mpp

    @property
    def px0_per_map(self) -> float:
        """Level-0 pixels per map pixel."""
        return self.mpp / self.slide_mpp

    @property
    def n_rows(self) -> int:
        return 1 + max(0, math.ceil((self.height - self.tile) / self.step))

    @property
    def n_cols(self) -> int:
        return 1 + max(0, math.ceil((self.width - self.tile) / self.step))


def tissue_boxes(tiles: pd.DataFrame | Sequence[float]) -> np.ndarray:
    """(k, 4) level-0 boxes (x0, y0, w, h) from a tiling index or one region (x0, y0, w, h)."""
    if isinstance(tiles, pd.DataFrame):
        missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
        if missing:
            raise ValueError(f"tile index lacks column(s) {missing} (expected the tile_slide "
                             f"parquet: {list(TILE_COLUMNS)})")
        if tiles.empty:
            raise ValueError("the tile index is empty: no tissue tile to predict")
        size = tiles["size_px0"].to_numpy(dtype=np.float64)
        return np.column_stack([tiles["x0_px"].to_numpy(dtype=np.float64),
                                tiles["y0_px"].to_numpy(dtype=np.float64), size, size])
    box = np.asarray(tiles, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"region must be (x0, y0, width, height) level-0 px with positive size, "
                         f"got {tiles!r}")
    return box[None, :]


def plan_grid(boxes: np.ndarray, *, slide_mpp: float, input_mpp: float, out_stride: int,
              tile_px: int, overlap_px: int) -> DenseGrid:
    """The map covering the bounding box of ``boxes`` (level-0 x0, y0, w, h) and its tile grid."""
    if tile_px % out_stride or overlap_px % out_stride:
        raise ValueError(f"tile_px ({tile_px}) and overlap_px ({overlap_px}) must be multiples "
                         f"of the model's out_stride ({out_stride})")
    if not 0 <= 2 * overlap_px <= tile_px:
        raise ValueError(f"need 0 <= overlap_px <= tile_px / 2, got {overlap_px} for {tile_px}")
    if input_mpp <= 0 or slide_mpp <= 0:
        raise ValueError(f"mpp must be positive (input {input_mpp}, slide {slide_mpp})")
    ox, oy = np.floor(boxes[:, 0].min()), np.floor(boxes[:, 1].min())
    span_x = (boxes[:, 0] + boxes[:, 2]).max() - ox
    span_y = (boxes[:, 1] + boxes[:, 3]).max() - oy
    px0_per_map = input_mpp * out_stride / slide_mpp
    return DenseGrid(origin_px=(float(ox), float(oy)), slide_mpp=float(slide_mpp),
                     input_mpp=float(input_mpp), out_stride=int(out_stride),
                     height=max(1, math.ceil(span_y / px0_per_map - 1e-9)),
                     width=max(1, math.ceil(span_x / px0_per_map - 1e-9)),
                     tile=tile_px // out_stride, step=(tile_px - overlap_px) // out_stride)


def coverage_mask(grid: DenseGrid, boxes: np.ndarray) -> np.ndarray:
    """(H, W) bool: map pixels whose centre lies inside any box (level-0 x0, y0, w, h)."""
    mask = np.zeros((grid.height, grid.width), dtype=bool)
    s = grid.px0_per_map
    ox, oy = grid.origin_px
    # pixel j is inside [a, b) when a <= ox + (j + 0.5) s < b
    c0 = np.ceil((boxes[:, 0] - ox) / s - 0.5).astype(np.int64)
    c1 = np.ceil((boxes[:, 0] + boxes[:, 2] - ox) / s - 0.5).astype(np.int64)
    r0 = np.ceil((boxes[:, 1] - oy) / s - 0.5).astype(np.int64)
    r1 = np.ceil((boxes[:, 3] + boxes[:, 1] - oy) / s - 0.5).astype(np.int64)
    for a, b, c, d in zip(np.clip(r0, 0, grid.height), np.clip(r1, 0, grid.height),
                          np.clip(c0, 0, grid.width), np.clip(c1, 0, grid.width)):
        mask[a:b, c:d] = True
    return mask


def tiles_to_run(grid: DenseGrid, mask: np.ndarray) -> list[tuple[int, int]]:
    """Grid tiles (row, col) whose map footprint touches the coverage mask, row-major."""
    keep = []
    for r in range(grid.n_rows):
        y = r * grid.step
        for c in range(grid.n_cols):
            x = c * grid.step
            if mask[y:y + grid.tile, x:x + grid.tile].any():
                keep.append((r, c))
    return keep


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32 separable weight: sin^2 ramps over ``overlap`` px at each edge.

    The rising ramp of one tile and the falling ramp of its neighbour (``tile - overlap`` px
    further) sum to 1 pixel by pixel; every weight is > 0.
    """
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return np.outer(w, w).astype(np.float32)


# --------------------------------------------------------------------------- band accumulator
class BandAccumulator:
    """Weighted sums of tile outputs for a band of map rows; finished rows go to a writer.

    ``add`` places a (genes, t, t) tile at map (row, col); ``flush(end)`` normalises rows
    [top, end) by the accumulated weights, zeroes pixels outside ``mask``, hands them to
    ``write(top, rows)`` and shifts the band so that ``end`` becomes its top.

    Resuming (an interrupted dense map): :meth:`resume_at` puts the band's top at the last
    written band's first row and marks rows below ``written`` as already written; the caller
    re-adds that band's tiles (the only ones reaching into the open rows), and its flush then
    writes and counts only the rows from ``written`` on.
    """

    def __init__(self, n_genes: int, rows: int, width: int, mask: np.ndarray,
                 write: Callable[[int, np.ndarray], None]):
        if rows < 1 or width < mask.shape[1]:
            raise ValueError(f"band of {rows} x {width} px cannot hold map rows {mask.shape}")
        self.num = np.zeros((n_genes, rows, width), dtype=np.float32)
        self.den = np.zeros((rows, width), dtype=np.float32)
        self.top = 0
        self.mask = mask
        self.write = write
        self.n_uncovered = 0
        self.written = 0   # rows below this were written by an earlier, interrupted run

    def resume_at(self, top: int, written: int, n_uncovered: int) -> None:
        self.top, self.written, self.n_uncovered = int(top), int(written), int(n_uncovered)

    @property
    def nbytes(self) -> int:
        return self.num.nbytes + self.den.nbytes

    def add(self, values: np.ndarray, weights: np.ndarray, row: int, col: int) -> None:
        t_h, t_w = weights.shape
        y = row - self.top
        if y < 0 or y + t_h > self.den.shape[0]:
            raise RuntimeError(f"tile rows {row}..{row + t_h} fall outside the band "
                               f"{self.top}..{self.top + self.den.shape[0]}")
        self.num[:, y:y + t_h, col:col + t_w] += values * weights
        self.den[y:y + t_h, col:col + t_w] += weights

    def flush(self, end: int) -> None:
        n = end - self.top
        if n <= 0:
            return
        height, width = self.mask.shape
        n_out = min(n, height - self.top)
        skip = max(0, self.written - self.top)
        if n_out > skip:
            mask = self.mask[self.top + skip:self.top + n_out]
            den = self.den[skip:n_out, :width]
            self.n_uncovered += int((mask & (den <= 0)).sum())
            covered = mask & (den > 0)
            scale = np.zeros(den.shape, dtype=np.float32)
            np.divide(1.0, den, out=scale, where=covered)
            self.write(self.top + skip, self.num[:, skip:n_out, :width] * scale)
        keep = self.den.shape[0] - n  # rows still open (the overlap with the next band)
        if keep > 0:
            self.num[:, :keep] = self.num[:, n:]
            self.den[:keep] = self.den[n:]
        self.num[:, max(keep, 0):] = 0.0
        self.den[max(keep, 0):] = 0.0
        self.top = end
