"""Whole-slide dense gene-expression maps: tiled prediction, seamless blending, spot read-out.

Arrow of the DESIGN.md picture: model -> **dense map** -> spots or bins at any scale.

Dense map file (``dense.zarr``, the ``predict_{model}`` rule's contract)
-----------------------------------------------------------------------
An OME-Zarr image (NGFF 0.5, a zarr v3 store, written with ome-zarr-py's metadata writer;
valid for the ``ome-zarr-models`` validator, readable by ome-zarr-py, napari-ome-zarr and
SpatialData) with

* ``0``, ``1``, ...: the resolution pyramid of the map, float32 (or float16) arrays
  (genes, H_k, W_k); level ``k`` is the 2^k x 2^k block mean of level 0 (edges padded by
  repetition). Chunks hold **one gene** each, so a viewer reads one gene without reading all:
  level 0 in rows one band tall (every band flush writes whole chunks,
  :func:`~histomap.tasks.dense_zarr.level0_chunks`), the other levels in 256 px squares.
  Level 0 holds expression per unit map-pixel area, the unit
  :func:`histomap.models.roi.roi_aggregate` expects (log-normalised expression for PixNet);
* ``labels/mask``: the tissue mask as an OME-Zarr label image (uint8 (H_k, W_k) pyramid,
  nearest-neighbour downsampling): 1 where the map pixel's centre lies in a tissue tile (or
  requested region), 0 elsewhere; level 0 of the map is 0 where the mask is 0.

Group attrs (under ``ome``, NGFF 0.5): ``multiscales`` (axes c, y, x; per level a scale and a
translation in micrometres on the slide, the translation putting pixel centres at
``origin_um + (index + 0.5) * mpp_k``), ``omero`` (one channel per gene, labelled with the gene
name); beside them ``histomap``: ``format``, ``mpp`` (um per level-0 map pixel = input_mpp x
out_stride), ``origin_px`` (level-0 slide x, y of the map's top-left corner: map pixel (i, j)
covers slide x in [ox + j s, ox + (j + 1) s) with s = mpp / slide_mpp), ``slide_mpp``,
``input_mpp``, ``out_stride``, ``tile_px``, ``overlap_px``, ``genes``, ``slide``, how it was
computed (``device``, ``autocast``: "bfloat16" / "float16" or None for fp32, ``threads``: torch
intra-op threads) and the model's provenance. :func:`read_dense` opens it.

Prediction grid and blending
----------------------------
The map covers the bounding box of the tissue tiles. The model runs on square tiles of
``tile_px`` input pixels (at ``input_mpp``) on a grid with step ``tile_px - overlap_px``
anchored at the map origin, so every model output pixel lands exactly on a map pixel; only
grid tiles touching a tissue tile are run. Overlapping outputs are blended with a separable
raised-cosine weight (sin^2 ramps over the overlap, 1 in the middle): the ramps of two
neighbours sum to exactly 1, and the accumulated weight is divided out, so the map is seamless
and a tile without neighbours keeps its own values.

Memory bound
------------
Tiles are processed one band of ``band_tile_rows`` grid rows at a time. The band accumulator
holds ``4 * (genes + 1) * band_rows * W`` bytes with ``band_rows = (band_tile_rows - 1) * step +
tile`` map pixels and ``W`` the map width; finished rows are normalised (one temporary of at
most the band's size), written to zarr and dropped. ``band_tile_rows="auto"`` (the default)
takes as many grid rows as keep the accumulator within :data:`BAND_BYTES` (64 MB), at least
one: 50 genes on a 5.6 mm wide map at 4 um/px, 7 grid rows of 160 px tiles. Add one batch of
input tiles (``batch_size * tile_px^2 * 3`` bytes, plus the model's activations) and the uint8
coverage mask (``H * W`` bytes). Example: 250 genes, 224 px tiles at 1 um/px, stride-4 maps (56 px tiles), a
20 mm wide slide (5000 map px): one grid row, ~280 MB for the band (~2x at a flush), whatever
the slide's height. The whole-slide map itself is never held in memory: the pyramid levels are
computed afterwards from the written level below, in strips of rows.

Interruption and resume
-----------------------
The map is written under ``dense.zarr.partial``; after each band's rows are written,
``_resume/state.json`` in it records the bands done (and the key of the prediction: model
weights, slide, grid, genes, dtype, batch size, band rows, device, autocast, threads, code). A
SIGTERM (:mod:`histomap.interrupt`) stops the tile loop at the next batch and keeps the partial
store; the rerun with the same key re-runs the last written band's tiles (the only ones that
reach into the rows still open), skips every earlier tile, and ends with the bytes of an
uninterrupted run; the pyramid, metadata and mask are written after the last tile, and the
store is renamed to ``dense.zarr`` only then. A store of another prediction is discarded.

Modules: this one predicts level 0 and reads maps back; :mod:`histomap.tasks.dense_grid` plans
the grid, blends tiles and accumulates bands; :mod:`histomap.tasks.dense_zarr` writes the
OME-Zarr pyramid, metadata and mask.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from torch import nn

from histomap.checked_io import check_dense_store, checked_array
from histomap.compat import torch
from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.disk_space import check_dense_map_space
from histomap.errors import InputError
from histomap.interrupt import check, deferred, requested, resumable_output
from histomap.logs import Progress
from histomap.models.fuse import fold_batchnorm
from histomap.models.roi import discs_from_spots, roi_aggregate
from histomap.outputs import remove_path, write_text_atomic
from histomap.tasks.dense_grid import (BandAccumulator, DenseGrid, blend_weights, coverage_mask,
                                       plan_grid, tiles_to_run, tissue_boxes)
from histomap.tasks.dense_zarr import (PYRAMID_MIN_PX, level0_chunks, write_mask_labels,
                                       write_ome_metadata, write_pyramid_levels)
from histomap.training.device import amp_dtype, autocast, resolve_device

log = logging.getLogger(__name__)

FORMAT = "histomap.tasks.dense_map/1"
DTYPES = ("float32", "float16")
# ``cpu_bf16: auto`` leaves CPU dense maps in fp32: benchmarks/cpu_bf16.py measured bf16 1.57x
# faster but its spot read-outs 0.02-0.04 off fp32 (tolerance 1e-2; benchmarks/results/cpu_bf16.md)
CPU_BF16_DEFAULT = False

# --------------------------------------------------------------------------- prediction
def _prefetch(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """Yield (item, fn(item)), computing the next item's result in a thread meanwhile."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fn, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(fn, items[i + 1])
            yield item, result


def _model_genes(model: nn.Module, genes: Sequence[str] | None) -> list[str]:
    n_genes = getattr(model, "n_genes", None)
    if genes is None:
        if n_genes is None:
            raise ValueError("pass `genes`: the model has no n_genes attribute")
        return [f"gene_{i}" for i in range(int(n_genes))]
    genes = [str(g) for g in genes]
    if n_genes is not None and int(n_genes) != len(genes):
        raise ValueError(f"model predicts {n_genes} genes but {len(genes)} gene names given")
    return genes


def _check_options(model: nn.Module, dtype: str, batch_size: int,
                   band_tile_rows: int | str | None) -> int:
    """Refuse bad prediction options; returns the model's ``out_stride``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    bad_rows = band_tile_rows != "auto" and band_tile_rows is not None and (
        not isinstance(band_tile_rows, int) or band_tile_rows < 1)
    if batch_size < 1 or bad_rows:
        raise ValueError(f"batch_size must be >= 1 and band_tile_rows 'auto', None or >= 1, got "
                         f"{batch_size}, {band_tile_rows!r}")
    out_stride = int(getattr(model, "out_stride", 0))
    if out_stride < 1:
        raise ValueError("the model needs an integer `out_stride` attribute (map pixel size in "
                         "input pixels)")
    return out_stride


def predict_dense_map(model: nn.Module, slide_path: str | Path,
                      tiles: pd.DataFrame | Sequence[float], *, input_mpp: float,
                      tile_px: int, overlap_px: int, out_zarr: str | Path,
                      batch_size: int = 8, device: str | torch.device = "auto",
                      genes: Sequence[str] | None = None, dtype: str = "float32",
                      band_tile_rows: int | str | None = "auto", amp: bool = True,
                      cpu_bf16: bool = False, channels_last: bool = True,
                      extra_attrs: dict | None = None) -> DenseMap:
    """Predict a dense map over the tissue tiles of a slide and write it as ``out_zarr``.

    Args:
        model: maps images (B, 3, h, w) RGB in [0, 1] to (B, genes, h / s, w / s) with
            ``s = model.out_stride`` (e.g. PixNet).
        slide_path: OpenSlide-readable slide with mpp.
        tiles: the tile_slide index (columns x0_px, y0_px, size_px0: level-0 tissue tiles at any
            tile mpp) or one level-0 region (x0, y0, width, height).
        input_mpp: um per model-input pixel (the mpp the model was trained at).
        tile_px, overlap_px: prediction tile side and overlap in input pixels (multiples of
            out_stride; overlap <= tile / 2). Use the training window size for models with
            global context (PixNet's SAFB attention sees the whole tile).
        band_tile_rows: grid rows per band (memory bound, see module docstring); "auto" as
            many as keep the band accumulator within :data:`BAND_BYTES` (at least one); None
            holds every row at once (one-shot).
        dtype: "float32" or "float16" for the stored ``dense`` array (blending is float32).
        amp, cpu_bf16: autocast on CUDA (``amp``), and on the CPU too with ``cpu_bf16`` (bf16;
            see :func:`histomap.training.device.cpu_bf16_enabled`). The autocast dtype and the
            torch thread count are recorded in the attrs (``autocast``, ``threads``).
        extra_attrs: JSON-able values stored in the group attrs (e.g. the model's provenance).

    Returns the written map opened read-only (:func:`read_dense`). The file is written under a
    temporary name and renamed at the end, so a failure leaves nothing; a SIGTERM leaves the
    partial store with the bands written, which the rerun resumes (module docstring).
    """
    out_stride = _check_options(model, dtype, batch_size, band_tile_rows)
    genes = _model_genes(model, genes)
    slide_path, out_zarr = Path(slide_path), Path(out_zarr)
    boxes = tissue_boxes(tiles)
    device = resolve_device(device)
    amp_type = amp_dtype(device, amp, cpu_bf16=cpu_bf16)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format).eval()
    start = time.perf_counter()
    probe = torch.rand(1, 3, tile_px, tile_px, generator=torch.Generator().manual_seed(0)).to(
        device).contiguous(memory_format=memory_format)
    fused = fold_batchnorm(model, probe)  # the same function, a quarter faster on a CPU
    with open_slide(slide_path) as slide:
        mpp0 = slide_mpp(slide, slide_path)
        grid = plan_grid(boxes, slide_mpp=mpp0, input_mpp=input_mpp, out_stride=out_stride,
                         tile_px=tile_px, overlap_px=overlap_px)
        mask = coverage_mask(grid, boxes)
        todo = tiles_to_run(grid, mask)
        log.info("%s: dense map %d x %d px at %.3g um/px (origin level-0 %s), %d genes; "
                 "%d of %d grid tiles of %d px (overlap %d) touch the %d tissue boxes",
                 slide_path.name, grid.height, grid.width, grid.mpp, grid.origin_px,
                 len(genes), len(todo), grid.n_rows * grid.n_cols, tile_px, overlap_px,
                 len(boxes))
        attrs = {"slide": str(slide_path), "tile_px": int(tile_px),
                 "overlap_px": int(overlap_px), "device": str(device),
                 "autocast": None if amp_type is None else str(amp_type).removeprefix("torch."),
                 "threads": int(torch.get_num_threads()),
                 "memory_format": "channels_last" if channels_last else "contiguous",
                 **(extra_attrs or {})}
        band_tile_rows = band_rows_for(band_tile_rows, grid, len(genes))
        check_dense_map_space(out_zarr, len(genes), grid.height, grid.width, dtype)
        key = _resume_key(model, slide_path, grid, boxes, genes=genes, dtype=dtype,
                          batch_size=batch_size, band_tile_rows=band_tile_rows, attrs=attrs)
        with resumable_output(out_zarr) as (tmp, existed):
            resume = _read_progress(tmp, key) if existed else None
            _write_dense(fused, slide, grid, mask, todo, tmp, genes=genes, dtype=dtype,
                         batch_size=batch_size, band_tile_rows=band_tile_rows, device=device,
                         amp_type=amp_type, attrs=attrs, key=key, resume=resume,
                         memory_format=memory_format)
    elapsed = time.perf_counter() - start
    log.info("%s: wrote %s in %.1f s (%.2f tiles/s)", slide_path.name, out_zarr, elapsed,
             len(todo) / max(elapsed, 1e-9))
    return read_dense(out_zarr)


# --------------------------------------------------------------------------- resume
RESUME_DIR = "_resume"


def _resume_key(model: nn.Module, slide_path: Path, grid: DenseGrid, boxes: np.ndarray, *,
                genes: list[str], dtype: str, batch_size: int, band_tile_rows: int | None,
                attrs: dict) -> str:
    """What decides the map's bytes: an interrupted store resumes only with the same key."""
    import dataclasses
    import hashlib

    from histomap.training.fingerprint import file_identity, fingerprint, source_identity

    weights = hashlib.sha256()
    for name, value in model.state_dict().items():
        weights.update(name.encode() + b"\0" + str(value.dtype).encode() + b"\0")
        weights.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                       .tobytes() if value.numel() else b"")
    return fingerprint({"format": FORMAT, "model": [type(model).__name__, weights.hexdigest()],
                        "slide": file_identity(slide_path),
                        "grid": dataclasses.asdict(grid),
                        "boxes": hashlib.sha256(np.ascontiguousarray(boxes).tobytes())
                        .hexdigest(), "genes": genes, "dtype": dtype,
                        "batch_size": int(batch_size), "band_tile_rows": band_tile_rows,
                        "attrs": attrs, "code": source_identity()})


def _read_progress(path: Path, key: str) -> dict | None:
    """The record of an interrupted earlier run in the partial store, if it is this map's."""
    try:
        state = json.loads((path / RESUME_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("key") != key:
        log.warning("%s: the interrupted map there has another model, slide or settings; "
                    "starting over", path)
        return None
    return state


def _write_progress(path: Path, state: dict) -> None:
    write_text_atomic(path / RESUME_DIR / "state.json", json.dumps(state))


def _open_level0(path: Path, shape: tuple, chunks: tuple, dtype: str, resume: dict | None):
    """(root, level-0 array, bands done): the interrupted store's, emptied of everything but
    its written level 0, or a new one."""
    if resume is not None and resume.get("bands_done", 0) > 0:
        try:
            for entry in path.iterdir():  # pyramid levels, labels of a run stopped after them
                if entry.name not in ("0", "zarr.json", RESUME_DIR):
                    remove_path(entry)
            root = zarr.open_group(path, mode="r+", zarr_format=3)
            dense = root["0"]
            if dense.shape == shape and dense.chunks == chunks and str(dense.dtype) == dtype:
                root.attrs.clear()
                return root, dense, int(resume["bands_done"])
        except (KeyError, ValueError, OSError) as exc:
            log.warning("%s: cannot resume the interrupted map (%s); starting over", path, exc)
    remove_path(path)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    dense = root.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0.0,
                              dimension_names=("c", "y", "x"))
    return root, dense, 0


def _write_dense(model: nn.Module, slide, grid: DenseGrid, mask: np.ndarray,
                 todo: list[tuple[int, int]], path: Path, *, genes: list[str], dtype: str,
                 batch_size: int, band_tile_rows: int | None, device: torch.device,
                 amp_type: torch.dtype | None, attrs: dict, key: str = "",
                 resume: dict | None = None,
                 memory_format: torch.memory_format = torch.channels_last) -> None:
    rows_per_band = grid.n_rows if band_tile_rows is None else min(band_tile_rows, grid.n_rows)
    root, dense, bands_done = _open_level0(
        path, (len(genes), grid.height, grid.width),
        (1, *level0_chunks(rows_per_band * grid.step, grid.height, grid.width)), dtype, resume)

    def write(top: int, rows: np.ndarray) -> None:
        dense[:, top:top + rows.shape[1], :] = rows.astype(dtype, copy=False)

    band_rows = (rows_per_band - 1) * grid.step + grid.tile
    width = max(grid.width, (grid.n_cols - 1) * grid.step + grid.tile)
    acc = BandAccumulator(len(genes), band_rows, width, mask, write)
    log.info("band accumulator: %d grid row(s), %d x %d map px, %.1f MB", rows_per_band,
             band_rows, width, acc.nbytes / 1e6)
    weights = blend_weights(grid.tile, grid.tile - grid.step)
    batches = _band_batches(todo, grid.n_rows, rows_per_band, batch_size)
    n_bands = math.ceil(grid.n_rows / rows_per_band)
    progress = {"key": key, "bands_done": bands_done, "n_uncovered": 0, "complete": False}
    if bands_done:
        progress.update(resume)
        band = bands_done - 1  # re-add its tiles: they reach into the rows still open
        acc.resume_at(band * rows_per_band * grid.step,
                      min(bands_done * rows_per_band, grid.n_rows) * grid.step,
                      int(resume.get("n_uncovered", 0)))
        batches = [] if resume.get("complete") else [(b, items) for b, items in batches
                                                     if b >= band]
        log.info("%s: resuming an interrupted map: %d of %d bands written; %d tile(s) to run",
                 path, bands_done, n_bands, sum(len(items) for _, items in batches))

    def flushed(n_done: int, complete: bool = False) -> None:
        progress.update(bands_done=max(n_done, progress["bands_done"]),
                        n_uncovered=acc.n_uncovered, complete=complete)
        _write_progress(path, progress)

    if not progress["complete"]:
        with deferred("dense map"):
            band = _predict_bands(model, slide, grid, acc, batches, weights, path,
                                  rows_per_band=rows_per_band, device=device, amp_type=amp_type,
                                  n_genes=len(genes), band=max(bands_done - 1, 0),
                                  flushed=flushed, memory_format=memory_format)
            if requested():
                log.warning("%s: stopped after %d of %d bands; the rerun goes on from there",
                            path, progress["bands_done"], n_bands)
                check("dense map")
            while band + 1 < n_bands:  # bands after the last one with tiles: zeros
                band += 1
                acc.flush(band * rows_per_band * grid.step)
                flushed(band)
            acc.flush(max(grid.height, acc.top))
            flushed(n_bands, complete=True)
    if progress["n_uncovered"]:
        log.warning("%d covered map pixels received no tile prediction; set to 0",
                    progress["n_uncovered"])
    remove_path(path / RESUME_DIR)
    _finish_store(root, dense, grid, mask, genes, path, attrs, len(todo))


def _predict_bands(model, slide, grid: DenseGrid, acc: BandAccumulator, batches, weights,
                   path: Path, *, rows_per_band: int, device, amp_type, n_genes: int, band: int,
                   flushed, memory_format: torch.memory_format) -> int:
    """Run ``batches`` into ``acc``, flushing each band as the next begins (``flushed(bands
    done)`` records it); stops early after a SIGTERM. Returns the band last accumulated."""
    s0 = grid.px0_per_input
    side0 = grid.tile * grid.out_stride * s0
    ox, oy = grid.origin_px

    def read(batch: tuple[int, list[tuple[int, int]]]) -> np.ndarray:
        return np.stack([read_region(slide, ox + c * grid.step * grid.out_stride * s0,
                                     oy + r * grid.step * grid.out_stride * s0, side0, side0,
                                     grid.tile * grid.out_stride, grid.tile * grid.out_stride)
                         for r, c in batch[1]])

    bar = Progress(sum(len(items) for _, items in batches),
                   f"dense map {path.name.removesuffix('.partial')}", "tiles", logger=log)
    with torch.no_grad():
        for (b, items), images in _prefetch(read, batches):
            while b > band:  # every tile of earlier bands is in: those rows are final
                band += 1
                acc.flush(min(band * rows_per_band, grid.n_rows) * grid.step)
                flushed(band)
            out = _run_model(model, images, device, amp_type, grid.tile, n_genes, memory_format)
            for (r, c), values in zip(items, out):
                acc.add(values, weights, r * grid.step, c * grid.step)
            bar.update(len(items))
            if requested():
                return band
    bar.close()
    return band


def _finish_store(root, dense, grid: DenseGrid, mask: np.ndarray, genes: list[str], path: Path,
                  attrs: dict, n_tiles: int) -> None:
    """The pyramid from the written level 0, the NGFF metadata, the mask labels, the attrs."""
    name = path.name.removesuffix(".partial")
    n_levels = write_pyramid_levels(root, min_px=PYRAMID_MIN_PX)
    write_ome_metadata(root, grid, genes, n_levels, name)
    write_mask_labels(root, grid, mask, n_levels)
    root.attrs["histomap"] = {"format": FORMAT, "mpp": grid.mpp,
                              "origin_px": list(grid.origin_px), "slide_mpp": grid.slide_mpp,
                              "input_mpp": grid.input_mpp, "out_stride": grid.out_stride,
                              "genes": genes, "n_tiles": n_tiles, **attrs}
    log.info("OME-Zarr: %d pyramid level(s), chunks %s (one gene each)", n_levels, dense.chunks)


# "auto" bands: the accumulator holds at most this many bytes (level-0 chunks are a band tall,
# and writing and reading whole-slide maps in taller chunks is about twice as fast in zarr:
# benchmarks/README.md "Whole slides")
BAND_BYTES = 64 * 2 ** 20


def band_rows_for(band_tile_rows: int | str | None, grid: DenseGrid, n_genes: int
                  ) -> int | None:
    """Grid rows per band: ``band_tile_rows`` as given, or for "auto" the most whose band
    accumulator (``4 (genes + 1) band_rows W`` bytes, module docstring) stays within
    :data:`BAND_BYTES`, at least one and at most the grid's rows."""
    if band_tile_rows != "auto":
        return band_tile_rows
    width = max(grid.width, (grid.n_cols - 1) * grid.step + grid.tile)
    row_bytes = 4 * (n_genes + 1) * width
    fit = (BAND_BYTES // row_bytes - grid.tile) // grid.step + 1
    return int(min(max(1, fit), max(1, grid.n_rows)))


def _band_batches(todo: list[tuple[int, int]], n_rows: int, rows_per_band: int,
                  batch_size: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Batches of tiles, each within one band: [(band index, [(row, col), ...]), ...]."""
    by_band: dict[int, list[tuple[int, int]]] = {}
    for tile in todo:
        by_band.setdefault(tile[0] // rows_per_band, []).append(tile)
    return [(band, items[i:i + batch_size]) for band, items in sorted(by_band.items())
            for i in range(0, len(items), batch_size)]


def _run_model(model: nn.Module, images: np.ndarray, device: torch.device,
               amp_type: torch.dtype | None, tile: int, n_genes: int,
               memory_format: torch.memory_format = torch.channels_last) -> np.ndarray:
    x = torch.from_numpy(images).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, H, W, 3) bytes: channels-last already
    x = x.contiguous(memory_format=memory_format)  # a no-op for channels-last
    with autocast(device, amp_type):
        out = model(x)
    out = out.float().cpu().numpy()
    if out.shape[1:] != (n_genes, tile, tile):
        raise ValueError(f"model output {out.shape[1:]} is not (genes={n_genes}, {tile}, "
                         f"{tile}) for {images.shape[1]} px input tiles")
    bad = ~np.isfinite(out)
    if bad.any():
        log.warning("%d non-finite model outputs set to 0", int(bad.sum()))
        out[bad] = 0.0
    return out


# --------------------------------------------------------------------------- reading
@dataclass
class DenseMap:
    """A dense map file opened read-only: level-0 arrays and geometry (see module docstring).

    ``attrs``: the ``histomap`` attrs (genes, mpp, origin_px, model, ...) plus the NGFF
    ``multiscales`` and ``omero`` entries.
    """

    path: Path
    dense: zarr.Array
    mask: zarr.Array
    genes: list[str]
    mpp: float
    origin_px: tuple[float, float]
    slide_mpp: float
    attrs: dict
    n_levels: int = 1

    def read(self, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None
             ) -> np.ndarray:
        """float32 (genes, y1 - y0, x1 - x0) block of the map (map pixels)."""
        return np.asarray(self.dense[:, y0:y1, x0:x1], dtype=np.float32)

    def level(self, k: int) -> zarr.Array:
        """Pyramid level ``k`` (genes, H_k, W_k): 2^k x 2^k block means of level 0."""
        if not 0 <= k < self.n_levels:
            raise ValueError(f"{self.path}: pyramid level {k} not in 0..{self.n_levels - 1}")
        return checked_array(zarr.open_group(self.path, mode="r")[str(k)], self.path, "dense map")

    def level_for(self, max_px: int) -> int:
        """The finest pyramid level whose longer side is <= ``max_px`` (else the coarsest)."""
        for k in range(self.n_levels):
            if max(self.level(k).shape[1:]) <= max_px:
                return k
        return self.n_levels - 1


def read_dense(path: str | Path) -> DenseMap:
    """Open a dense map written by :func:`predict_dense_map` (structure checked on open, a chunk
    that fails to decode is an InputError naming the store: :mod:`histomap.checked_io`)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "dense map zarr does not exist")
    check_dense_store(path)
    try:
        root = zarr.open_group(path, mode="r")
        ome = dict(root.attrs["ome"])
        attrs = {**dict(root.attrs["histomap"]), "multiscales": ome["multiscales"],
                 "omero": ome.get("omero", {})}
        paths = [d["path"] for d in ome["multiscales"][0]["datasets"]]
        dense, mask = (checked_array(root[paths[0]], path, "dense map"),
                       checked_array(root["labels/mask/0"], path, "dense map"))
        geometry = (list(attrs["genes"]), float(attrs["mpp"]),
                    tuple(float(v) for v in attrs["origin_px"]), float(attrs["slide_mpp"]))
    except (KeyError, IndexError, FileNotFoundError, ValueError, TypeError) as exc:
        raise InputError(path, f"not a dense map written by predict_dense_map: {exc}") from exc
    if dense.shape[0] != len(geometry[0]) or tuple(mask.shape) != tuple(dense.shape[1:]):
        raise InputError(path, f"dense {dense.shape}, mask {mask.shape} and {len(geometry[0])} "
                               "genes do not agree")
    return DenseMap(path, dense, mask, *geometry, attrs=attrs, n_levels=len(paths))


def spots_from_dense(dense_map: DenseMap | str | Path, centres_px: np.ndarray,
                     diameter_um: float | np.ndarray, slide_mpp: float | None = None,
                     mode: str = "mean", block_px: int = 256,
                     square: np.ndarray | bool = False, map_rows=None) -> np.ndarray:
    """Spot values (n, genes) float32 from a dense map, for discs at level-0 ``centres_px``
    (``square``: (n,) bool or one bool, square bins of side ``diameter_um`` instead).

    ``mode="mean"``: area-weighted mean over the part of the disc covered by the map's mask
    (pixels outside tissue tiles are not counted as zero expression); ``"sum"``: sum of map
    value x overlap area (map-pixel area units). Spots whose disc touches no covered pixel come
    back NaN (logged). Spots are grouped by ``block_px`` map-pixel cells and each cell reads
    only its window (cell plus the largest radius) from zarr, so memory stays at about
    ``4 * genes * (block_px + 2 r)^2`` bytes. Cells go top to bottom; ``map_rows`` (a
    :class:`histomap.tasks.dense_readout.MapRows` of this map) reads whole rows of the map
    once and keeps them while the cells move down (the streamed tables' read-out).
    """
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    dmap = dense_map if isinstance(dense_map, DenseMap) else read_dense(dense_map)
    centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    mpp0 = dmap.slide_mpp if slide_mpp is None else float(slide_mpp)
    if abs(mpp0 - dmap.slide_mpp) > 1e-6 * dmap.slide_mpp:
        log.warning("%s: slide_mpp %g differs from the map's recorded %g", dmap.path, mpp0,
                    dmap.slide_mpp)
    centres, radii = discs_from_spots(centres_px, diameter_um, mpp0, dmap.origin_px, dmap.mpp)
    n, n_genes = len(centres), len(dmap.genes)
    square = np.broadcast_to(np.asarray(square, bool), (n,))
    out = np.full((n, n_genes), np.nan, dtype=np.float32)
    if n == 0:
        return out
    if not (np.isfinite(centres).all() and (radii >= 0).all()):
        raise ValueError("spot centres must be finite and diameters >= 0")
    height, width = dmap.mask.shape
    cells = np.floor(centres / block_px).astype(np.int64)
    _, group = np.unique(cells[:, ::-1], axis=0, return_inverse=True)  # row-major cells
    group = group.reshape(-1)
    for g in range(int(group.max()) + 1):
        idx = np.flatnonzero(group == g)
        margin = int(math.ceil(float(radii[idx].max()))) + 1
        lo = np.floor(centres[idx].min(axis=0)).astype(np.int64) - margin
        hi = np.floor(centres[idx].max(axis=0)).astype(np.int64) + margin + 1
        x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        x1, y1 = min(int(hi[0]), width), min(int(hi[1]), height)
        if x1 <= x0 or y1 <= y0:
            continue  # every disc of the cell lies off the map: NaN
        if map_rows is None:
            crop = np.concatenate([dmap.read(y0, y1, x0, x1),
                                   np.asarray(dmap.mask[y0:y1, x0:x1], np.float32)[None]])
        else:  # (values x mask: level 0 is 0 off the mask already)
            values, mask = map_rows.rows(y0, y1)
            crop = np.concatenate([values[:, :, x0:x1], mask[None, :, x0:x1]])
        local = torch.from_numpy(centres[idx] - np.array([x0, y0], dtype=np.float64))
        sums = roi_aggregate(torch.from_numpy(crop)[None], local[None],
                             torch.from_numpy(radii[idx])[None], mode="sum",
                             square=torch.from_numpy(square[idx].copy())[None])[0].numpy()
        covered = sums[:, -1]
        ok = covered > 1e-9
        values = sums[:, :-1] / np.where(ok, covered, 1.0)[:, None] if mode == "mean" \
            else sums[:, :-1]
        out[idx[ok]] = values[ok]
    n_nan = int(np.isnan(out[:, 0]).sum())
    if n_nan:
        log.warning("%s: %d of %d spots touch no covered map pixel; their values are NaN",
                    dmap.path, n_nan, n)
    return out
