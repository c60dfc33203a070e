"""The dense map's OME-Zarr layout (predict_{model}, apply write ``dense.zarr``): chunking, the
resolution pyramid computed chunk-wise from the written level 0, the NGFF 0.5 ``multiscales`` and
``omero`` metadata, and the tissue mask as a label image. The format itself is described in
:mod:`histomap.tasks.dense_map`, which writes level 0 and reads the map back.
"""
from __future__ import annotations

import numpy as np
import zarr

from histomap.tasks.dense_grid import DenseGrid

PYRAMID_MIN_PX = 64   # the pyramid stops at the first level whose longer side is <= this
CHUNK_TARGET_PX = 256
LEVEL0_CHUNK_COLS = 1024  # level 0's chunk width (map px)


def chunk_side(step: int) -> int:
    """Spatial chunk side (map px): a multiple of the grid step near CHUNK_TARGET_PX, so that
    band flushes mostly fill whole chunks."""
    step = max(1, int(step))
    return step * max(1, round(CHUNK_TARGET_PX / step))


def level0_chunks(band_px: int, height: int, width: int) -> tuple[int, int]:
    """Level 0's spatial chunks (rows, columns): as tall as the rows one band flush writes
    (``band_px``: the band's grid rows x the grid step), so that every flush writes whole chunks
    (a partly written chunk is read, decompressed, merged and recompressed at each flush that
    touches it), and :data:`LEVEL0_CHUNK_COLS` wide."""
    return min(max(1, int(band_px)), height), min(LEVEL0_CHUNK_COLS, width)


def n_pyramid_levels(height: int, width: int, min_px: int = PYRAMID_MIN_PX) -> int:
    """Levels 0..n-1 halving the size until the longer side is <= ``min_px``."""
    n, h, w = 1, height, width
    while max(h, w) > min_px:
        h, w, n = (h + 1) // 2, (w + 1) // 2, n + 1
    return n


STRIP_BYTES = 64 * 2**20  # the most of the level below one pyramid step holds in memory


def halve(block: np.ndarray, mode: str) -> np.ndarray:
    """One level down of a block (..., h, w): 2x2 block mean in float32 (``"mean"``) or the
    top-left pixel of each block (``"nearest"``, for labels); an odd last row or column is
    padded by repetition."""
    pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    if mode == "nearest":
        return np.ascontiguousarray(block[..., ::2, ::2])
    f = block.astype(np.float32, copy=False)
    out = (f[..., ::2, ::2] + f[..., 1::2, ::2]) + (f[..., ::2, 1::2] + f[..., 1::2, 1::2])
    out *= np.float32(0.25)
    return out.astype(block.dtype, copy=False)


def write_pyramid_levels(group: zarr.Group, min_px: int = PYRAMID_MIN_PX,
                         mode: str = "mean") -> int:
    """Add levels ``1``, ``2``, ... to ``group`` from its written level ``0``, each computed from
    the level below in strips of ``2 * CHUNK_TARGET_PX`` rows and as many channels as
    :data:`STRIP_BYTES` allow (never the whole map in memory), so every write fills whole
    chunk rows; returns the level count."""
    base = group["0"]
    n_levels = n_pyramid_levels(*base.shape[-2:], min_px=min_px)
    lead = base.shape[:-2]       # (genes,) for the map, () for the label image
    rows = 2 * CHUNK_TARGET_PX
    for k in range(1, n_levels):
        below = group[str(k - 1)]
        h, w = below.shape[-2:]
        shape = (*lead, (h + 1) // 2, (w + 1) // 2)
        chunks = (1,) * len(lead) + tuple(min(CHUNK_TARGET_PX, s) for s in shape[-2:])
        target = group.create_array(str(k), shape=shape, dtype=base.dtype, chunks=chunks,
                                    fill_value=0, dimension_names=base.metadata.dimension_names)
        step = max(1, STRIP_BYTES // (rows * w * max(4, base.dtype.itemsize)))
        channels = [slice(c, c + step) for c in range(0, lead[0], step)] if lead else [...]
        for ch in channels:
            for r in range(0, h, rows):
                strip = np.asarray(below[ch, r:r + rows, :] if lead else below[r:r + rows, :])
                out = halve(strip, mode)
                if lead:
                    target[ch, r // 2:r // 2 + out.shape[-2], :] = out
                else:
                    target[r // 2:r // 2 + out.shape[-2], :] = out
    return n_levels


def level_transforms(grid: DenseGrid, n_levels: int, spatial_ndim_prefix: int) -> list[dict]:
    """NGFF ``datasets`` of ``n_levels`` levels: micrometre scale and pixel-centre translation."""
    ox_um, oy_um = grid.origin_px[0] * grid.slide_mpp, grid.origin_px[1] * grid.slide_mpp
    datasets = []
    for k in range(n_levels):
        mpp = grid.mpp * 2 ** k
        lead = [1.0] * spatial_ndim_prefix
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [*lead, mpp, mpp]},
            {"type": "translation",
             "translation": [*([0.0] * spatial_ndim_prefix), oy_um + 0.5 * mpp,
                             ox_um + 0.5 * mpp]}]})
    return datasets


SPACE_AXES = [{"name": "y", "type": "space", "unit": "micrometer"},
              {"name": "x", "type": "space", "unit": "micrometer"}]


def write_ome_metadata(group: zarr.Group, grid: DenseGrid, genes: list[str], n_levels: int,
                       name: str) -> None:
    """NGFF 0.5 ``multiscales`` (micrometre scale and translation per level) and ``omero``
    channel labels (the gene names), written by ome-zarr-py."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    omero = {"channels": [{"label": g, "active": i < 3, "color": "FFFFFF",
                           "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}}
                          for i, g in enumerate(genes)]}
    write_multiscales_metadata(group, level_transforms(grid, n_levels, 1), fmt=FormatV05(),
                               axes=[{"name": "c", "type": "channel"}, *SPACE_AXES], name=name,
                               metadata={"omero": omero, "method": "2x2 block mean"})


def write_mask_labels(group: zarr.Group, grid: DenseGrid, mask: np.ndarray,
                      n_levels: int) -> None:
    """The tissue mask as the OME-Zarr label image ``labels/mask`` with the map's pyramid."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    labels = group.require_group("labels")
    label = labels.require_group("mask")
    chunk = chunk_side(grid.step)
    label.create_array("0", data=mask.astype(np.uint8),
                       chunks=(min(chunk, grid.height), min(chunk, grid.width)),
                       dimension_names=("y", "x"))
    n = write_pyramid_levels(label, min_px=PYRAMID_MIN_PX, mode="nearest")
    if n != n_levels:
        raise RuntimeError(f"mask pyramid has {n} levels, the map {n_levels}")
    write_multiscales_metadata(label, level_transforms(grid, n_levels, 0), fmt=FormatV05(),
                               axes=SPACE_AXES, name="mask")
    write_label_metadata(group["labels"], "mask", fmt=FormatV05(),
                         colors=[{"label-value": 1, "rgba": [255, 255, 255, 128]}],
                         properties=[{"label-value": 1, "name": "tissue"}],
                         source={"image": "../../"})
    # ome-zarr-py 0.15 leaves the `labels` group's NGFF 0.5 version out; validators need it
    labels = group["labels"]
    labels.attrs["ome"] = {**labels.attrs["ome"], "version": FormatV05().version}
