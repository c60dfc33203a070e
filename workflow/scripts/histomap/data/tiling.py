"""Tissue detection and tiling of a slide into fixed-size tiles at the model mpp.

Arrow: slide -> **tissue tiles** (the ``tile_slide`` rule's contract). ``tile_slide`` writes

- ``tiles.parquet`` (always): one row per tile, ``tile_id``, ``x0_px``, ``y0_px`` (level-0
  top-left, px), ``size_px0`` (tile side in level-0 px), ``x0_um``, ``y0_um``,
  ``tissue_fraction`` (0..1, from the tissue mask), ``row``, ``col`` (grid position); the tiling
  parameters (``mpp`` of the tiles, ``tile_px``, ``overlap_px``, ``slide``, ``slide_mpp``, ...)
  are in the parquet's schema metadata under ``histomap`` (:func:`read_tile_index`).
- ``tiles.zarr`` (only when asked for, ``tiling.write_tiles``; no rule of the pipeline reads it:
  models read the slide itself): zarr v3 group with array ``tiles`` (n, tile_px, tile_px, 3)
  uint8, one chunk per tile inside shards of ``SHARD_TILES`` tiles, written a shard at a time,
  chunks zstd level 1 or uncompressed (``tiling.tile_compression``); group attrs as the parquet
  metadata. Row ``tile_id`` of the index = index into ``tiles``.

Tissue mask method (``tissue_mask``): the slide is read at about ``mask_mpp`` (16 um/px by
default) in horizontal bands from the coarsest pyramid level that suffices, so the cost does not
grow with level 0. A pixel is tissue when it is (1) coloured: HSV saturation at or above an Otsu
threshold computed on the whole thumbnail, clipped to [0.05, 0.2] so blank glass (saturation
~0) or an all-tissue crop is not split at noise; (2) not bright: grey < 220, which rejects
tinted glass and the faint printed spot array of ST slides; (3) not black: grey > 20, which
rejects scanner borders. A colourless image (greyscale, e.g. a DAPI morphology image) has no
saturation to use: on a light background tissue is grey below Otsu's threshold (and 220); on a
dark background (fluorescence) it is where the 3x3 local maximum exceeds half of Otsu's
threshold, so sparse nuclei still mark tissue. The mask is then closed (3x3), holes smaller than
``MAX_HOLE_UM2`` are filled, it is opened (3x3) and connected pieces smaller than
``MIN_OBJECT_UM2`` (dust, specks) are removed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from scipy import ndimage
from zarr.codecs import ZstdCodec

from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.disk_space import check_tile_store_space
from histomap.errors import InputError
from histomap.logs import Progress
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

SATURATION_RANGE = (0.05, 0.2)   # Otsu threshold on HSV saturation is clipped to this range
MAX_GREY = 220                   # brighter pixels (0-255 mean of RGB) are glass
MIN_GREY = 20                    # darker pixels are scanner border / out-of-scan
MAX_HOLE_UM2 = 20_000.0          # holes in tissue smaller than this are filled
MIN_OBJECT_UM2 = 20_000.0        # tissue pieces smaller than this are removed as specks
GREYSCALE_SATURATION = 0.03      # 99.9th percentile saturation below this: a colourless image
BAND_PIXELS = 4_000_000          # pyramid-level pixels read per band when building the mask
SHARD_TILES = 256                # tiles per zarr shard of the optional tile store (one write each)
# tile store codecs (``tiling.tile_compression``): zstd level (1: the cheapest; H&E tiles gain
# ~5-10% from any lossless codec, glass more), or None for uncompressed chunks
TILE_COMPRESSION = {"zstd": 1, "none": None}
META_KEY = b"histomap"           # parquet schema metadata key of the tiling parameters

INDEX_COLUMNS = ["tile_id", "x0_px", "y0_px", "size_px0", "x0_um", "y0_um", "tissue_fraction",
                 "row", "col"]


# --------------------------------------------------------------------------- tissue mask
def read_thumbnail(slide: openslide.OpenSlide, px0: float) -> np.ndarray:
    """RGB uint8 image of the whole slide with one pixel per ``px0`` level-0 pixels.

    Pixel (i, j) covers level-0 box [j*px0, (j+1)*px0) x [i*px0, (i+1)*px0); read in bands so
    at most ~``BAND_PIXELS`` pyramid-level pixels are decoded at once.
    """
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / px0)), max(1, math.ceil(h0 / px0))
    level_ds = slide.level_downsamples[slide.get_best_level_for_downsample(max(px0, 1.0))]
    level_px_per_row = (w0 / level_ds) * (px0 / level_ds)
    rows_per_band = max(1, int(BAND_PIXELS // max(level_px_per_row, 1.0)))
    thumb = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        thumb[r0:r1] = read_region(slide, 0, r0 * px0, out_w * px0, (r1 - r0) * px0, out_w,
                                   r1 - r0)
    return thumb


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range=(0.0, 1.0)) -> float:
    """Otsu's threshold (maximum between-class variance) of ``values`` in ``value_range``."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w_low = np.cumsum(hist)
    w_high = w_low[-1] - w_low
    m_low = np.cumsum(hist * centres)
    mean_low = m_low / np.maximum(w_low, 1)
    mean_high = (m_low[-1] - m_low) / np.maximum(w_high, 1)
    between = w_low * w_high * (mean_low - mean_high) ** 2
    return float(edges[np.argmax(between) + 1])


def _close_open(mask: np.ndarray, op) -> np.ndarray:
    """Binary closing/opening with a 3x3 square, edge-padded so borders are not eroded."""
    padded = np.pad(mask, 1, mode="edge")
    return op(padded, structure=np.ones((3, 3), bool))[1:-1, 1:-1]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_px
    small[0] = False
    return mask | small[labels]


def _remove_specks(mask: np.ndarray, min_px: float) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask, 0
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels], int(n - keep[1:].sum())


def _greyscale_tissue(grey: np.ndarray) -> tuple[np.ndarray, str]:
    """Tissue of a colourless image: dark on light (bright-field) or light on dark (fluorescence).
    """
    if np.median(grey) >= 128:
        t = min(otsu_threshold(grey / 255) * 255, MAX_GREY)
        return (grey < t) & (grey > MIN_GREY), f"greyscale: {MIN_GREY} < grey < {t:.0f}"
    # fluorescence (e.g. DAPI): signal within one mask pixel, above half the Otsu level
    local = ndimage.maximum_filter(grey, size=3, mode="nearest")
    t = otsu_threshold(local / 255) * 255 / 2
    return local > t, f"greyscale fluorescence: local max grey > {t:.0f}"


def tissue_from_rgb(rgb: np.ndarray, pixel_um: float) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail with ``pixel_um`` um pixels (see module)."""
    vmax, vmin = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (vmax - vmin).astype(np.float32) / np.maximum(vmax, 1).astype(np.float32)
    grey = rgb.sum(axis=-1, dtype=np.uint16) / np.float32(3)
    if np.percentile(saturation, 99.9) < GREYSCALE_SATURATION:
        mask, rule = _greyscale_tissue(grey)
    else:
        otsu = otsu_threshold(saturation)
        sat_min = float(np.clip(otsu, *SATURATION_RANGE))
        mask = (saturation >= sat_min) & (grey < MAX_GREY) & (grey > MIN_GREY)
        rule = f"saturation >= {sat_min:.3f} (Otsu {otsu:.3f}), {MIN_GREY} < grey < {MAX_GREY}"
    mask = _close_open(mask, ndimage.binary_closing)
    mask = _fill_small_holes(mask, MAX_HOLE_UM2 / pixel_um**2)
    mask = _close_open(mask, ndimage.binary_opening)
    mask, n_specks = _remove_specks(mask, MIN_OBJECT_UM2 / pixel_um**2)
    log.info("tissue mask: %s; removed %d specks < %g um2; tissue %.1f%% of %dx%d px at "
             "%.2f um/px", rule, n_specks, MIN_OBJECT_UM2, 100 * mask.mean(), mask.shape[1],
             mask.shape[0], pixel_um)
    return mask


def tissue_mask(slide: openslide.OpenSlide, *, mask_mpp: float = 16.0) -> tuple[np.ndarray, float]:
    """Tissue mask of the whole slide at about ``mask_mpp`` um/px: (bool (H, W), mpp used).

    Mask pixel (i, j) covers level-0 pixels [j*s, (j+1)*s) x [i*s, (i+1)*s) with
    s = mpp_used / slide mpp (never finer than level 0).
    """
    if mask_mpp <= 0:
        raise ValueError(f"mask_mpp must be positive, got {mask_mpp!r}")
    mpp = slide_mpp(slide, getattr(slide, "_filename", "slide"))
    px0 = max(mask_mpp / mpp, 1.0)
    return tissue_from_rgb(read_thumbnail(slide, px0), px0 * mpp), px0 * mpp


# --------------------------------------------------------------------------- tile grid
def tile_grid(width0: int, height0: int, size0: float, stride0: float) -> pd.DataFrame:
    """Grid of square tiles of side ``size0`` (level-0 px) every ``stride0`` covering the slide.

    The last row/column may extend past the slide edge (read back as white).
    """
    n_cols = 1 + max(0, math.ceil((width0 - size0) / stride0 - 1e-9))
    n_rows = 1 + max(0, math.ceil((height0 - size0) / stride0 - 1e-9))
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return pd.DataFrame({
        "x0_px": np.round(cols * stride0).astype(np.int64),
        "y0_px": np.round(rows * stride0).astype(np.int64),
        "size_px0": np.full(rows.size, float(size0)),
        "row": rows.astype(np.int32),
        "col": cols.astype(np.int32),
    })


def tissue_fraction(mask: np.ndarray, mask_px0: float, x0: np.ndarray, y0: np.ndarray,
                    size0: float) -> np.ndarray:
    """Exact area fraction of each level-0 box (x0, y0, size0) covered by the mask.

    Uses the summed-area table; its bilinear interpolation is exact for a piecewise-constant
    mask, so boxes need not align with mask pixels. Outside the mask counts as no tissue.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = mask.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)

    def integral(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        coords = np.stack([np.clip(ys, 0, h), np.clip(xs, 0, w)])
        return ndimage.map_coordinates(sat, coords, order=1, mode="nearest")

    xa, ya = np.asarray(x0, float) / mask_px0, np.asarray(y0, float) / mask_px0
    xb, yb = xa + size0 / mask_px0, ya + size0 / mask_px0
    area = integral(yb, xb) - integral(ya, xb) - integral(yb, xa) + integral(ya, xa)
    return np.clip(area / (size0 / mask_px0) ** 2, 0.0, 1.0)


# --------------------------------------------------------------------------- outputs


def _tile_compressors(compression: str):
    """zarr ``compressors`` of the tile store for a ``tiling.tile_compression`` name."""
    if compression not in TILE_COMPRESSION:
        raise ValueError(f"tile_compression must be one of {sorted(TILE_COMPRESSION)}, got "
                         f"{compression!r}")
    level = TILE_COMPRESSION[compression]
    return None if level is None else [ZstdCodec(level=level)]


def _write_tiles(slide: openslide.OpenSlide, index: pd.DataFrame, zarr_path: Path,
                 tile_px: int, attrs: dict, compression: str = "zstd") -> None:
    """Read each tile at the tile mpp and write ``tiles`` a shard (``SHARD_TILES`` tiles) at a
    time: one shard of tiles in memory, one zarr write per shard. (Writing in a thread while
    the next shard is read measured no faster on 2 shared cores, CPU or wall, so it is not
    done: the rule asks for one thread.)"""
    root = zarr.open_group(zarr_path, mode="w")
    root.attrs.update(attrs)
    n = len(index)
    shard = max(1, min(SHARD_TILES, n))
    tiles = root.create_array("tiles", shape=(n, tile_px, tile_px, 3), dtype="uint8",
                              chunks=(1, tile_px, tile_px, 3), shards=(shard, tile_px, tile_px, 3),
                              compressors=_tile_compressors(compression), fill_value=255,
                              dimension_names=("tile", "y", "x", "c"))
    size0 = float(index["size_px0"].iloc[0])
    xy0 = index[["x0_px", "y0_px"]].to_numpy(dtype=float)
    buffer = np.empty((shard, tile_px, tile_px, 3), dtype=np.uint8)
    bar = Progress(n, "tiles", "tiles", logger=log)
    for lo in range(0, n, shard):
        hi = min(lo + shard, n)
        for k, (x0, y0) in enumerate(xy0[lo:hi]):
            buffer[k] = read_region(slide, x0, y0, size0, size0, tile_px, tile_px)
        tiles[lo:hi] = buffer[:hi - lo]
        bar.update(hi - lo)
    bar.close()


def _write_index(index: pd.DataFrame, attrs: dict, path: Path) -> None:
    table = pa.Table.from_pandas(index, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(attrs).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def read_tile_index(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The tile index written by :func:`tile_slide` and its tiling parameters."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"cannot read the tile index: {exc}") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table.to_pandas(), json.loads(raw) if raw else {}


def plan_tiles(slide: openslide.OpenSlide, slide_path: Path, *, tile_px: int, tile_mpp: float,
               overlap_px: int, min_tissue: float, mask_mpp: float,
               source: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Index of the tiles to keep (``INDEX_COLUMNS``) and the zarr attrs; reads no tile.

    ``source``: the user's image the slide was made from, named in errors (default the slide).
    """
    mpp = slide_mpp(slide, slide_path)
    user_image = f"{source} (ingested as {slide_path})" if source else slide_path
    if tile_mpp < mpp:
        log.warning("%s: tile mpp %.3f is finer than the slide's %.3f um/px; tiles are "
                    "upsampled", slide_path, tile_mpp, mpp)
    mask, mask_mpp_used = tissue_mask(slide, mask_mpp=mask_mpp)
    if not mask.any():
        raise InputError(user_image, f"no tissue detected: the tissue mask at "
                                     f"{mask_mpp_used:.1f} um/px is empty (blank or unstained "
                                     f"slide?). Check the image; pieces under {MIN_OBJECT_UM2:g} "
                                     f"um2 are dropped as specks, try a finer `mask_mpp`")
    size0 = tile_px * tile_mpp / mpp
    grid = tile_grid(*slide.dimensions, size0, (tile_px - overlap_px) * tile_mpp / mpp)
    grid["tissue_fraction"] = tissue_fraction(mask, mask_mpp_used / mpp, grid["x0_px"].to_numpy(),
                                              grid["y0_px"].to_numpy(), size0)
    keep = grid["tissue_fraction"].to_numpy() >= min_tissue
    log.info("%s: %d grid tiles of %d px at %.3f um/px (%.1f um, stride %d px); kept %d with "
             "tissue fraction >= %.2f, dropped %d below it", slide_path.name, len(grid), tile_px,
             tile_mpp, tile_px * tile_mpp, tile_px - overlap_px, int(keep.sum()), min_tissue,
             int((~keep).sum()))
    if not keep.any():
        raise InputError(user_image, f"no tile has tissue fraction >= min_tissue={min_tissue} "
                                     f"(best {grid['tissue_fraction'].max():.3f}); lower "
                                     f"`min_tissue` or check the tissue mask")
    index = grid[keep].reset_index(drop=True)
    index.insert(0, "tile_id", np.arange(len(index), dtype=np.int64))
    index["x0_um"] = index["x0_px"] * mpp
    index["y0_um"] = index["y0_px"] * mpp
    attrs = {"mpp": float(tile_mpp), "tile_px": int(tile_px), "overlap_px": int(overlap_px),
             "slide": str(slide_path), "slide_mpp": float(mpp), "size_px0": float(size0),
             "min_tissue": float(min_tissue), "mask_mpp": float(mask_mpp_used),
             "n_tiles": len(index)}
    return index[INDEX_COLUMNS], attrs


def _write_outputs(slide: openslide.OpenSlide, index: pd.DataFrame, attrs: dict,
                   out_zarr: Path | None, out_parquet: Path, compression: str = "zstd") -> None:
    """Write the outputs under ``.partial`` names, both renamed only once both are complete;
    on an error while writing, both temporaries are removed and the old outputs kept."""
    with contextlib.ExitStack() as stack:
        tmp_index = stack.enter_context(atomic_output(out_parquet))
        if out_zarr is not None:
            check_tile_store_space(out_zarr, len(index), attrs["tile_px"], compression)
            tmp_tiles = stack.enter_context(atomic_output(out_zarr))
            _write_tiles(slide, index, tmp_tiles, attrs["tile_px"], attrs, compression)
        _write_index(index, attrs, tmp_index)


def tile_slide(slide_path: str | Path, out_zarr: str | Path | None, out_parquet: str | Path, *,
               tile_px: int = 224, tile_mpp: float = 1.0, overlap_px: int = 0,
               min_tissue: float = 0.25, mask_mpp: float = 16.0,
               source: str | Path | None = None, compression: str = "zstd") -> pd.DataFrame:
    """Cut the tissue of a slide into ``tile_px`` tiles at ``tile_mpp`` um/px; return the index.

    Tiles lie on a grid with stride ``tile_px - overlap_px`` (tile pixels); only tiles whose
    tissue fraction is >= ``min_tissue`` are kept. ``out_zarr=None`` writes the index only (it
    reads no tile: the cost is the tissue mask's); with a path the tile images are written too,
    their chunks compressed as ``compression`` says (``TILE_COMPRESSION``: ``"zstd"`` level 1 or
    ``"none"``; the pixels are the same either way).
    Outputs are written under temporary names and renamed at the end, so a failure leaves none.
    ``source``: the user's image the slide was ingested from (errors name it; default: the
    slide).
    """
    if tile_px <= 0 or not 0 <= overlap_px < tile_px:
        raise ValueError(f"need tile_px > 0 and 0 <= overlap_px < tile_px, got {tile_px}, "
                         f"{overlap_px}")
    if tile_mpp <= 0 or not 0 <= min_tissue <= 1:
        raise ValueError(f"need tile_mpp > 0 and 0 <= min_tissue <= 1, got {tile_mpp}, "
                         f"{min_tissue}")
    _tile_compressors(compression)  # an unknown name fails before any work
    slide_path, out_parquet = Path(slide_path), Path(out_parquet)
    out_zarr = None if out_zarr is None else Path(out_zarr)
    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        index, attrs = plan_tiles(slide, slide_path, tile_px=tile_px, tile_mpp=tile_mpp,
                                  overlap_px=overlap_px, min_tissue=min_tissue, mask_mpp=mask_mpp,
                                  source=source)
        _write_outputs(slide, index, attrs, out_zarr, out_parquet, compression)
    elapsed = time.perf_counter() - start
    log.info("%s: %d tissue tiles in %.1f s -> %s%s", slide_path.name, len(index), elapsed,
             out_parquet, f" and the tile images in {out_zarr}" if out_zarr else "")
    return index


def read_tiles(zarr_path: str | Path) -> tuple[zarr.Array, dict]:
    """Open a tiles zarr written by :func:`tile_slide`: (``tiles`` array, group attrs)."""
    zarr_path = Path(zarr_path)
    if not zarr_path.is_dir():
        raise InputError(zarr_path, "tiles zarr does not exist (run the tile_slide rule)")
    try:
        root = zarr.open_group(zarr_path, mode="r")
        tiles = root["tiles"]
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise InputError(zarr_path, f"not a tiles zarr written by tile_slide: {exc}") from exc
    return tiles, dict(root.attrs)
