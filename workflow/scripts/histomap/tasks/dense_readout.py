"""Spot and bin tables read out of a dense map in row blocks (``apply_dense_tables``, the
whole-slide benchmark): lattices generated a block of rows at a time, the map read once per
chunk row, each block's values appended to a :class:`~histomap.data.streamed_table.StreamedTable`.

Arrow of the DESIGN.md picture: dense map -> **spots or bins at any scale**. Nothing here grows
with the number of bins: a block holds at most :data:`BLOCK_VALUES` values, and the map cache
two chunk rows of the map (``2 * 4 * genes * chunk_px * W`` bytes, W the map width; 50 genes,
256 px chunks and a 15 mm map at 4 um: 0.4 GB). The lattices are those of
:mod:`histomap.tasks.apply` (its :func:`~histomap.tasks.apply.hex_lattice` and
:func:`~histomap.tasks.apply.square_lattice` are these blocks concatenated), and a bin's value is
the exact area-weighted mean of the map pixels it overlaps, counting only pixels in the mask.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.tasks.dense_map import DenseMap, spots_from_dense

log = logging.getLogger(__name__)

BLOCK_VALUES = 4_000_000  # bins x genes of one read-out block (16 MB of float32)
BLOCK_MAP_ROWS = 256  # map rows a read-out block spans at most (one chunk row of the map)
Block = tuple[np.ndarray, np.ndarray]  # level-0 (x, y) centres, (row, col) lattice positions


# --------------------------------------------------------------------------- lattices
def tiles_bbox(tiles: pd.DataFrame) -> tuple[float, float, float, float]:
    """Level-0 (x0, y0, x1, y1) of the tissue tiles of a tile_slide index."""
    if tiles.empty:
        raise ValueError("the tile index has no tissue tile")
    x0, y0 = tiles["x0_px"].min(), tiles["y0_px"].min()
    x1 = (tiles["x0_px"] + tiles["size_px0"]).max()
    y1 = (tiles["y0_px"] + tiles["size_px0"]).max()
    return float(x0), float(y0), float(x1), float(y1)


def _tile_boxes(tiles: pd.DataFrame) -> np.ndarray:
    return tiles[["x0_px", "y0_px", "size_px0"]].to_numpy(np.float64)


def _in_tiles_grid(boxes: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) bool: grid point (xs[j], ys[i]) lies in a tile [x0, x0 + s) x
    [y0, y0 + s); ``xs``, ``ys`` ascending (the comparisons of a point-by-point test)."""
    inside = np.zeros((len(ys), len(xs)), dtype=bool)
    if not len(ys) or not len(xs):
        return inside
    near = (boxes[:, 1] <= ys[-1]) & (boxes[:, 1] + boxes[:, 2] > ys[0])
    for x0, y0, s in boxes[near]:
        r0, r1 = np.searchsorted(ys, [y0, y0 + s], side="left")
        c0, c1 = np.searchsorted(xs, [x0, x0 + s], side="left")
        inside[r0:r1, c0:c1] = True
    return inside


def square_blocks(tiles: pd.DataFrame, mpp: float, bin_um: float, rows_per_block: int
                  ) -> Iterator[Block]:
    """Square bins of side ``bin_um`` anchored at the slide's top-left corner whose centre lies
    in a tissue tile, ``rows_per_block`` bin rows at a time, row-major."""
    step = bin_um / mpp
    x0, y0, x1, y1 = tiles_bbox(tiles)
    rows = np.arange(math.floor(y0 / step), math.ceil(y1 / step))
    cols = np.arange(math.floor(x0 / step), math.ceil(x1 / step))
    xs, boxes = (cols + 0.5) * step, _tile_boxes(tiles)
    for start in range(0, len(rows), rows_per_block):
        block = rows[start:start + rows_per_block]
        keep = _in_tiles_grid(boxes, xs, (block + 0.5) * step)
        rr, cc = np.nonzero(keep)
        rc = np.column_stack([block[rr], cols[cc]])
        yield (rc[:, ::-1] + 0.5) * step, rc


def hex_blocks(tiles: pd.DataFrame, mpp: float, spacing_um: float, rows_per_block: int
               ) -> Iterator[Block]:
    """Pseudo-spot centres on a hexagonal lattice (spacing ``spacing_um``, rows
    ``spacing * sqrt(3) / 2`` apart, odd rows shifted by half a spacing) anchored at the slide's
    top-left corner, in tissue tiles, ``rows_per_block`` lattice rows at a time, row-major."""
    step = spacing_um / mpp
    row_step = step * math.sqrt(3) / 2
    x0, y0, x1, y1 = tiles_bbox(tiles)
    rows = np.arange(math.floor(y0 / row_step), math.ceil(y1 / row_step) + 1)
    cols = np.arange(math.floor(x0 / step) - 1, math.ceil(x1 / step) + 1)
    boxes = _tile_boxes(tiles)
    for start in range(0, len(rows), rows_per_block):
        parts = []
        for r in rows[start:start + rows_per_block]:
            xs = (cols + 0.5 * (r % 2)) * step
            keep = _in_tiles_grid(boxes, xs, np.array([r * row_step]))[0]
            parts.append(np.column_stack([np.full(int(keep.sum()), r), cols[keep]]))
        rc = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        yield np.column_stack([(rc[:, 1] + 0.5 * (rc[:, 0] % 2)) * step, rc[:, 0] * row_step]), rc


# --------------------------------------------------------------------------- map reading
class MapRows:
    """Rows of a dense map, masked (value x mask) and float32, read one chunk row at a time and
    kept while the read-outs move down the map.

    ``consumers`` read-outs (tables) can share it: each says who it is (:meth:`rows`'s
    ``consumer``) and a chunk row is dropped once every consumer has asked for rows below it
    (:meth:`done` takes a finished one out), so read-outs that move down together
    (:func:`histomap.tasks.apply.stream_dense_tables`) read each chunk of the map once. A row
    asked for again after it was dropped is read again: the cache changes the speed, never the
    values."""

    def __init__(self, dmap: DenseMap, consumers: int = 1):
        self.dmap = dmap
        self.band = int(dmap.dense.chunks[1]) if hasattr(dmap.dense, "chunks") else 256
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.first = [0.0] * consumers  # the first chunk row each consumer still needs

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.cache:
            y0, y1 = k * self.band, min((k + 1) * self.band, self.dmap.mask.shape[0])
            mask = np.array(self.dmap.mask[y0:y1, :], dtype=np.float32)  # own copy
            values = self.dmap.read(y0, y1) * mask[None]
            values.flags.writeable = mask.flags.writeable = False  # handed out as views
            self.cache[k] = (values, mask)
        return self.cache[k]

    def view(self, consumer: int) -> _ConsumerRows:
        """What consumer ``consumer`` reads through (``rows(y0, y1)``)."""
        return _ConsumerRows(self, consumer)

    def position(self, consumer: int = 0) -> float:
        """The first map row that ``consumer`` last asked for (inf once done)."""
        return self.first[consumer] * self.band

    def done(self, consumer: int = 0) -> None:
        """``consumer`` reads no more rows."""
        self.first[consumer] = math.inf
        self._evict()

    def _evict(self) -> None:
        low = min(self.first)
        for k in [k for k in self.cache if k < low]:
            del self.cache[k]

    def rows(self, y0: int, y1: int, consumer: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(values (genes, y1 - y0, W), mask (y1 - y0, W)) for map rows [y0, y1): views of the
        cache when the rows lie in one chunk row, else a copy of just those rows (read-only)."""
        first, last = y0 // self.band, (y1 - 1) // self.band
        self.first[consumer] = first
        self._evict()
        parts = []
        for k in range(first, last + 1):
            values, mask = self._load(k)
            a, b = max(y0 - k * self.band, 0), min(y1 - k * self.band, mask.shape[0])
            parts.append((values[:, a:b], mask[a:b]))
        if len(parts) == 1:
            return parts[0]
        return (np.concatenate([p[0] for p in parts], axis=1),
                np.concatenate([p[1] for p in parts], axis=0))


class _ConsumerRows:
    """One consumer's reads of a shared :class:`MapRows`."""

    def __init__(self, maps: MapRows, consumer: int):
        self.maps, self.consumer = maps, consumer

    def rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        return self.maps.rows(y0, y1, self.consumer)


# --------------------------------------------------------------------------- bins
def overlap_weights(edges_um: np.ndarray, side_um: float, origin_um: float, pixel_um: float,
                    n_pixels: int) -> sp.csr_matrix:
    """(intervals, pixels) fraction of each map pixel's width lying in each interval
    [edges[k], edges[k] + side) along one axis (pixel j covers origin + [j, j + 1) pixel_um)."""
    edges = np.asarray(edges_um, dtype=np.float64)
    span = int(math.ceil(side_um / pixel_um)) + 1
    first = np.floor((edges - origin_um) / pixel_um).astype(np.int64)
    j = first[:, None] + np.arange(span)[None, :]
    a = np.maximum(edges[:, None], origin_um + j * pixel_um)
    b = np.minimum(edges[:, None] + side_um, origin_um + (j + 1) * pixel_um)
    ok = (b > a) & (j >= 0) & (j < n_pixels)
    rows = np.broadcast_to(np.arange(len(edges))[:, None], j.shape)
    return sp.csr_matrix(((b - a)[ok] / pixel_um, (rows[ok], j[ok])),
                         shape=(len(edges), n_pixels))


class BinReader:
    """Area-weighted means of a dense map over square bins of side ``bin_um`` (lattice anchored
    at the slide's top-left corner): :meth:`read` takes a block of (row, col) positions."""

    def __init__(self, dmap: DenseMap, bin_um: float,
                 maps: MapRows | _ConsumerRows | None = None):
        self.dmap, self.bin_um = dmap, float(bin_um)
        self.maps = maps or MapRows(dmap)
        self.height, self.width = dmap.mask.shape
        self.ox_um, self.oy_um = (float(v) * dmap.slide_mpp for v in dmap.origin_px)
        # every bin column touching the map (one spare each side): (W, columns) weights
        self.col0 = math.floor(self.ox_um / self.bin_um) - 1
        col1 = math.ceil((self.ox_um + self.width * dmap.mpp) / self.bin_um) + 1
        self.wx = overlap_weights(np.arange(self.col0, col1) * self.bin_um, self.bin_um,
                                  self.ox_um, dmap.mpp, self.width).T.tocsr().astype(np.float32)

    def read(self, rowcol: np.ndarray) -> np.ndarray:
        """(n, genes) float32 means over the bins ``rowcol``; NaN where a bin covers no mask
        pixel."""
        n, n_genes = len(rowcol), len(self.dmap.genes)
        out = np.full((n, n_genes), np.nan, dtype=np.float32)
        if n == 0:
            return out
        r_lo, r_hi = int(rowcol[:, 0].min()), int(rowcol[:, 0].max()) + 1
        wy = overlap_weights(np.arange(r_lo, r_hi) * self.bin_um, self.bin_um, self.oy_um,
                             self.dmap.mpp, self.height)
        touched = np.flatnonzero(np.asarray(wy.sum(axis=0)).ravel() > 0)
        if len(touched) == 0:
            return out
        y0, y1 = int(touched[0]), int(touched[-1]) + 1
        values, mask = self.maps.rows(y0, y1)
        wy_b = wy[:, y0:y1].toarray().astype(np.float32)  # (R, y)
        g, h, w = values.shape
        per_col = (values.reshape(g * h, w) @ self.wx).reshape(g, h, -1)  # (g, y, C)
        sums = np.einsum("ry,gyc->rcg", wy_b, per_col, optimize=True)
        covered = wy_b @ (mask @ self.wx)  # (R, C)
        r, c = rowcol[:, 0] - r_lo, rowcol[:, 1] - self.col0
        on_map = (c >= 0) & (c < covered.shape[1])
        cov = np.where(on_map, covered[r, np.clip(c, 0, covered.shape[1] - 1)], 0.0)
        ok = cov > 1e-9
        out[ok] = sums[r[ok], c[ok]] / cov[ok, None]
        return out


# --------------------------------------------------------------------------- tables
def rows_per_block(n_cols: float, n_genes: int, row_px: float | None = None) -> int:
    """Lattice rows per read-out block: about :data:`BLOCK_VALUES` values, and (given the
    lattice's row step in map pixels, ``row_px``) at most :data:`BLOCK_MAP_ROWS` map rows, so
    large bins do not read a tall band of the map at once."""
    rows = max(1, int(BLOCK_VALUES // max(1.0, n_cols * n_genes)))
    if row_px:
        rows = min(rows, max(1, int(BLOCK_MAP_ROWS // row_px)))
    return rows


def readout_blocks(dmap: DenseMap, tiles: pd.DataFrame, shape: str, size_um: float, *,
                   mpp: float, spacing_um: float | None = None,
                   maps: MapRows | _ConsumerRows | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(centres, (row, col), values (n, genes)) per block of a lattice over the tissue tiles:
    discs of ``size_um`` on the hexagonal lattice of ``spacing_um`` (default: touching) read by
    :func:`spots_from_dense`, or squares of side ``size_um`` by :class:`BinReader`; the map's
    rows through ``maps`` (default: a cache of this read-out's own)."""
    maps = maps or MapRows(dmap)
    x0, _, x1, _ = tiles_bbox(tiles)
    n_genes = len(dmap.genes)
    if shape == "disc":
        spacing = float(spacing_um or size_um)
        n_cols = (x1 - x0) * mpp / spacing
        blocks = hex_blocks(tiles, mpp, spacing, rows_per_block(
            n_cols, n_genes, spacing * math.sqrt(3) / 2 / dmap.mpp))
        read: Callable[[np.ndarray, np.ndarray], np.ndarray] = \
            lambda xy, rc: spots_from_dense(dmap, xy, size_um, dmap.slide_mpp, mode="mean",
                                            map_rows=maps)
    elif shape == "square":
        n_cols = (x1 - x0) * mpp / size_um
        blocks = square_blocks(tiles, mpp, size_um,
                               rows_per_block(n_cols, n_genes, size_um / dmap.mpp))
        reader = BinReader(dmap, size_um, maps)
        read = lambda xy, rc: reader.read(rc)  # noqa: E731
    else:
        raise ValueError(f"shape must be 'disc' or 'square', got {shape!r}")
    for xy, rc in blocks:
        yield xy, rc, read(xy, rc)
