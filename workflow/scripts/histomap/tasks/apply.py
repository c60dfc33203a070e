"""Apply a trained bundle to a slide with no (or no usable) spatial transcriptomics.

Arrow of the DESIGN.md picture: ``model -> dense map -> spots or bins at any scale``, the branch
``applied to H&E-only slides -> maps, tables, figures for the user`` (the ``apply_*`` rules).

* **Dense models** (PixNet, iStar-style; :attr:`Bundle.is_dense`): the dense map over the slide's
  tissue tiles (:func:`apply_dense`, exactly the benchmark's ``predict_dense`` with the bundle's
  weights and no spots), then tables read out of it (:func:`dense_tables`): pseudo-spots (discs)
  of each requested diameter on a hexagonal lattice over tissue, area-weighted means of the
  map as in the benchmark's read-out, and square bins of each requested side on a lattice
  anchored at the slide's top-left corner, exact area-weighted means of the map pixels they
  overlap. Only the part of a disc or bin covered by the map's tissue mask counts.
* **Spot models** (ST-Net-style, HistoGene-style): one prediction per pseudo-spot, from the crop
  the model was trained on (``bundle.json`` ``input.crop_um``) centred on each lattice point
  (:func:`spot_model_tables`); the crop, not the pseudo-spot's diameter, is what the model saw,
  so pseudo-spots other than the training size are logged as such. HistoGene reads all
  pseudo-spots of a slide as one sequence with their lattice indices as positions, so give
  ``spot_spacing_um`` the training spots' spacing for positions on the scale it learnt. Spot
  models have no bins.

Lattices cover tissue: a pseudo-spot or bin is kept when its centre lies in a tissue tile of the
``tile_slide`` index and on tissue in the slide's tissue mask (:func:`histomap.data.tiling.
tissue_mask` at ``mask_mpp``; tiles also hold glass at the tissue's edge). Every table is the predictions AnnData of
:func:`histomap.tasks.predict.spots_prediction_anndata` (``X`` in the bundle's units, e.g. log1p of
counts per ``target_sum``; ``obs["diameter_um"]``: disc diameter or bin side;
``obs["shape"]``: ``disc`` or ``square``; ``obs["array_row"]``, ``obs["array_col"]``: lattice
position; ``uns["histomap"]["model"]``: the bundle's name, path and normalisation).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.sample import annotate_spots
from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.data.streamed_table import StreamedTable
from histomap.data.tiling import tissue_mask
from histomap.errors import InputError
from histomap.outputs import atomic_output
from histomap.tasks.bundle import Bundle, read_bundle
from histomap.tasks.dense import predict_dense
from histomap.tasks.dense_map import DenseMap, read_dense
from histomap.tasks.dense_readout import (BinReader, MapRows, hex_blocks, readout_blocks,
                                          rows_per_block, square_blocks)
from histomap.tasks.predict import spots_prediction_anndata

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- lattices
def tissue_lookup(slide_path: str | Path, mask_mpp: float = 16.0
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """A function telling whether level-0 centres fall on tissue in the slide's tissue mask at
    ``mask_mpp`` (the mask is computed once)."""
    with open_slide(slide_path) as slide:
        mask, used_mpp = tissue_mask(slide, mask_mpp=mask_mpp)
        px0 = used_mpp / slide_mpp(slide, slide_path)

    def lookup(centres_px: np.ndarray) -> np.ndarray:
        centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
        ij = np.floor(centres_px / px0).astype(np.int64)
        inside = ((ij[:, 0] >= 0) & (ij[:, 0] < mask.shape[1]) & (ij[:, 1] >= 0)
                  & (ij[:, 1] < mask.shape[0]))
        out = np.zeros(len(centres_px), dtype=bool)
        out[inside] = mask[ij[inside, 1], ij[inside, 0]]
        return out

    return lookup


def on_tissue(slide_path: str | Path, centres_px: np.ndarray, mask_mpp: float = 16.0
              ) -> np.ndarray:
    """Whether each level-0 centre falls on tissue in the slide's tissue mask at ``mask_mpp``."""
    return tissue_lookup(slide_path, mask_mpp)(centres_px)


def map_on_tissue(dmap: DenseMap, slide_path: str | Path, *, step: int = 1,
                  mask_mpp: float = 16.0) -> np.ndarray:
    """Which pixels of a dense map, sampled every ``step`` map pixels (``[::step, ::step]``;
    pyramid level k's label image for ``step = 2**k``), to draw: those in the map's mask (the
    tissue tiles it was predicted on, which also hold glass at the tissue's edge) whose centre
    lies on tissue in the slide's tissue mask at ``mask_mpp`` (:func:`on_tissue`). bool (h, w).
    Every figure of a dense map masks with it."""
    step = int(step)
    mask = np.asarray(dmap.mask[::step, ::step]) > 0
    s0 = dmap.mpp / dmap.slide_mpp
    ox, oy = dmap.origin_px
    iy, ix = np.mgrid[:mask.shape[0], :mask.shape[1]] * step + 0.5
    centres = np.column_stack([ox + ix.ravel() * s0, oy + iy.ravel() * s0])
    return mask & on_tissue(slide_path, centres, mask_mpp).reshape(mask.shape)


def hex_lattice(tiles: pd.DataFrame, mpp: float, spacing_um: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-spot centres over tissue: a hexagonal lattice (centre-to-centre ``spacing_um``;
    rows ``spacing * sqrt(3) / 2`` apart, odd rows shifted by half a spacing) anchored at the
    slide's top-left corner. Returns (level-0 (x, y) centres, (row, col) lattice positions)."""
    return _concat(hex_blocks(tiles, mpp, spacing_um, 256))


def square_lattice(tiles: pd.DataFrame, mpp: float, bin_um: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Bins over tissue: squares of side ``bin_um`` tiling the slide from its top-left corner
    (bin (r, c) covers [c b, (c + 1) b) x [r b, (r + 1) b) um); kept when the bin's centre lies
    in a tissue tile. Returns (level-0 centres, (row, col))."""
    return _concat(square_blocks(tiles, mpp, bin_um, 256))


def _concat(blocks) -> tuple[np.ndarray, np.ndarray]:
    parts = list(blocks)
    return (np.concatenate([xy for xy, _ in parts]).reshape(-1, 2),
            np.concatenate([rc for _, rc in parts]).reshape(-1, 2).astype(np.int64))


def lattice_names(prefix: str, rowcol: np.ndarray) -> list[str]:
    """``{prefix}_{row}_{col}`` per lattice point. Built from two flat lists of ints, not one
    list per row: millions of small lists make the cyclic garbage collector run over and over
    (seconds of the 2 um bin table of a whole slide: benchmarks/README.md)."""
    rowcol = np.asarray(rowcol).reshape(-1, 2)
    return [f"{prefix}_{r}_{c}" for r, c in zip(rowcol[:, 0].tolist(), rowcol[:, 1].tolist())]


def lattice_spots(centres_px: np.ndarray, rowcol: np.ndarray, *, sample: str, platform: str,
                  mpp: float, diameter_um: float, image: str | Path, prefix: str
                  ) -> ad.AnnData:
    """Pseudo-spots or bins as a spot table without counts (centres, lattice positions,
    geometry), the input of the spot models' predictions."""
    names = lattice_names(prefix, rowcol)
    spots = ad.AnnData(X=sp.csr_matrix((len(names), 0), dtype=np.int32),
                       obs=pd.DataFrame({"array_row": rowcol[:, 0].astype(np.int64),
                                         "array_col": rowcol[:, 1].astype(np.int64)},
                                        index=pd.Index(names)))
    spots.obsm["spatial"] = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    spots.obs["diameter_um"] = float(diameter_um)
    return annotate_spots(spots, sample=sample, platform=platform, mpp=mpp,
                          spot_diameter_um=diameter_um, image=image)


# --------------------------------------------------------------------------- read-out
def bins_from_dense(dmap: DenseMap, rowcol: np.ndarray, bin_um: float) -> np.ndarray:
    """(n, genes) float32: area-weighted mean of the dense map over each square bin (r, c) of
    side ``bin_um`` (bin lattice anchored at the slide's top-left corner), counting only map
    pixels in the tissue mask; NaN for a bin that covers none. Reads the map one chunk row at a
    time (:class:`histomap.tasks.dense_readout.BinReader`); :func:`dense_tables` streams the
    same values to disk block by block."""
    rowcol = np.asarray(rowcol, dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((rowcol[:, 1], rowcol[:, 0]))  # top to bottom: each map row read once
    reader, out = BinReader(dmap, bin_um), np.empty((len(rowcol), len(dmap.genes)), np.float32)
    per_block = rows_per_block(len(np.unique(rowcol[:, 1])), len(dmap.genes), bin_um / dmap.mpp)
    rows = rowcol[order, 0]
    starts = np.searchsorted(rows, np.unique(rows)[::per_block]) if len(rows) else []
    for a, b in zip(starts, [*starts[1:], len(rows)]):
        out[order[a:b]] = reader.read(rowcol[order[a:b]])
    return out


# --------------------------------------------------------------------------- apply
def _bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else read_bundle(bundle)


def apply_dense(bundle: Bundle | str | Path, slide_path: str | Path,
                tiles_parquet: str | Path, out_zarr: str | Path, *, device: str = "auto",
                batch_size: int = 8) -> DenseMap:
    """Dense map of a slide's tissue tiles from a dense-model bundle: the benchmark's
    :func:`histomap.tasks.dense.predict_dense` with the bundle's weights and no spots, so the
    same weights give the same map as the benchmark's prediction of that slide."""
    bundle = _bundle(bundle)
    if not bundle.is_dense:
        raise InputError(bundle.path, f"bundle {bundle.name!r} is a spot model "
                                      f"({bundle.architecture}); it has no dense map")
    dmap = predict_dense(bundle.model_path, slide_path, tiles_parquet, None, out_zarr,
                         device=device, batch_size=batch_size)
    log.info("%s: dense map of bundle %s -> %s", Path(slide_path).name, bundle.name, out_zarr)
    return dmap


def _model_info(bundle: Bundle, **more) -> dict:
    return {"model": bundle.architecture, "bundle": bundle.name, "path": str(bundle.path),
            "normalisation": bundle.meta["normalisation"], **more}


def _geometry(spots_h5ad: str | Path) -> dict:
    """The slide geometry (sample, platform, mpp, image) of an ingested sample, and under
    ``"spatial"`` its scanpy ``uns["spatial"]`` (the downsampled H&E) for the applied tables."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    geo = dict(spots.uns["histomap"])
    geo["spatial"] = dict(spots.uns.get("spatial", {}))
    spots.file.close()
    return geo


def _table(pred: np.ndarray, lattice: ad.AnnData, genes: Sequence[str], shape: str,
           size_um: float, info: dict, spatial: dict | None = None) -> ad.AnnData:
    nan = np.isnan(pred).any(axis=1)
    if nan.any():
        log.warning("%d of %d %ss touch no covered map pixel and are left out", int(nan.sum()),
                    len(nan), shape)
        lattice, pred = lattice[~nan].copy(), pred[~nan]
    geo = dict(lattice.uns["histomap"])
    out = spots_prediction_anndata(pred, lattice.obs_names, genes, lattice.obsm["spatial"], geo,
                                   float(size_um), model_info=info, scanpy_uns=spatial)
    out.obs["shape"] = shape
    out.obs["array_row"] = lattice.obs["array_row"].to_numpy()
    out.obs["array_col"] = lattice.obs["array_col"].to_numpy()
    return out


def _write(adata: ad.AnnData, path: str | Path) -> None:
    path = Path(path)
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp)
    log.info("%d %ss x %d genes -> %s", adata.n_obs, adata.obs["shape"].iloc[0]
             if adata.n_obs else "row", adata.n_vars, path)


def _lattices(tiles: pd.DataFrame, geo: dict, slide_path: str | Path, mask_mpp: float,
              spot_diameters_um: Sequence[float], spot_spacing_um: float | None,
              bin_um: Sequence[float]):
    mpp = float(geo["mpp"])
    common = dict(sample=geo["sample"], platform=geo["platform"], mpp=mpp, image=geo["image"])
    lattices = [("disc", float(d), *hex_lattice(tiles, mpp, float(spot_spacing_um or d)))
                for d in spot_diameters_um]
    lattices += [("square", float(b), *square_lattice(tiles, mpp, float(b))) for b in bin_um]
    tissue = tissue_lookup(slide_path, mask_mpp)
    for shape, size, xy, rc in lattices:
        keep = tissue(xy)
        log.info("%g um %ss: %d of %d lattice points in tissue tiles lie on tissue", size,
                 shape, int(keep.sum()), len(keep))
        yield shape, size, lattice_spots(xy[keep], rc[keep], diameter_um=size,
                                         prefix="spot" if shape == "disc" else "bin", **common)


def dense_tables(bundle: Bundle | str | Path, dense_zarr: str | Path, tiles_parquet: str | Path,
                 spots_h5ad: str | Path, slide_path: str | Path, *, mask_mpp: float = 16.0,
                 spot_diameters_um: Sequence[float] = (),
                 spot_spacing_um: float | None = None, bin_um: Sequence[float] = (),
                 out_spots: Sequence[str | Path] = (), out_bins: Sequence[str | Path] = ()
                 ) -> list[Path]:
    """Pseudo-spot tables (one per diameter, ``out_spots``) and bin tables (one per side,
    ``out_bins``) read out of an applied dense map; ``spots_h5ad`` is the sample's ingested spot
    table (its geometry: sample, mpp, image), ``slide_path`` its slide (the tissue mask, at
    ``mask_mpp``). Pseudo-spots lie on a hexagonal lattice of
    ``spot_spacing_um`` (default: the diameter, touching discs). Each table is streamed to its
    file block by block (:func:`stream_dense_tables`: memory does not grow with the number of
    bins; the map is read once for all tables); returns the paths written."""
    bundle = _bundle(bundle)
    dmap = read_dense(dense_zarr)
    geo = _geometry(spots_h5ad)
    if abs(float(geo["mpp"]) - dmap.slide_mpp) > 1e-3 * dmap.slide_mpp:
        raise InputError(dense_zarr, f"map made on a {dmap.slide_mpp} um/px slide, but "
                                     f"{spots_h5ad} is {geo['mpp']} um/px")
    tiles = pd.read_parquet(tiles_parquet)
    outputs = list(out_spots) + list(out_bins)
    if len(out_spots) != len(spot_diameters_um) or len(out_bins) != len(bin_um):
        raise ValueError("one output per spot diameter and per bin side")
    tissue = tissue_lookup(slide_path, mask_mpp)
    info = _model_info(bundle, dense_map=str(dense_zarr), aggregation="mean")
    scales = [("disc", float(d)) for d in spot_diameters_um] + \
        [("square", float(b)) for b in bin_um]
    stream_dense_tables(dmap, tiles, scales, outputs, geo=geo, tissue=tissue, info=info,
                        spacing_um=spot_spacing_um)
    return [Path(p) for p in outputs]


def stream_dense_table(dmap: DenseMap, tiles: pd.DataFrame, shape: str, size_um: float,
                       path: str | Path, *, geo: dict, tissue: Callable[[np.ndarray], np.ndarray],
                       info: dict, spacing_um: float | None = None) -> int:
    """One table of :func:`stream_dense_tables`; returns the number of rows written."""
    return stream_dense_tables(dmap, tiles, [(shape, size_um)], [path], geo=geo, tissue=tissue,
                               info=info, spacing_um=spacing_um)[0].n_rows


class _TableStream:
    """One table of :func:`stream_dense_tables` being written: its lattice's read-out blocks
    (through the shared map rows) appended to its file; ``seconds`` spent on it."""

    def __init__(self, dmap: DenseMap, tiles: pd.DataFrame, shape: str, size_um: float,
                 path: str | Path, table: StreamedTable, *, geo: dict, tissue, maps,
                 spacing_um: float | None):
        self.shape, self.size_um, self.path, self.table = shape, float(size_um), path, table
        self.prefix = "spot" if shape == "disc" else "bin"
        self.tissue = tissue
        self.blocks = readout_blocks(dmap, tiles, shape, size_um, mpp=float(geo["mpp"]),
                                     spacing_um=spacing_um, maps=maps)
        self.n_lattice = self.n_tissue = self.n_nan = 0
        self.seconds = 0.0

    def step(self) -> bool:
        """Read and append the next block; False when the lattice is done."""
        start = time.perf_counter()
        try:
            block = next(self.blocks, None)
            if block is None:
                self._finish()
                return False
            self._append(*block)
            return True
        finally:
            self.seconds += time.perf_counter() - start

    def _append(self, xy: np.ndarray, rc: np.ndarray, values: np.ndarray) -> None:
        on = self.tissue(xy)
        nan = np.isnan(values).any(axis=1) & on
        keep = on & ~nan
        self.n_lattice, self.n_tissue = self.n_lattice + len(on), self.n_tissue + int(on.sum())
        self.n_nan += int(nan.sum())
        n, size = int(keep.sum()), self.size_um
        self.table.append(lattice_names(self.prefix, rc[keep]), values[keep],
                          {"diameter_um": np.full(n, size), "shape": [self.shape] * n,
                           "array_row": rc[keep, 0], "array_col": rc[keep, 1]},
                          {"spatial": xy[keep]})

    def _finish(self) -> None:
        log.info("%g um %ss: %d of %d lattice points in tissue tiles lie on tissue",
                 self.size_um, self.shape, self.n_tissue, self.n_lattice)
        if self.n_nan:
            log.warning("%d of %d %ss touch no covered map pixel and are left out", self.n_nan,
                        self.n_tissue, self.shape)


@dataclass
class StreamedTableInfo:
    """What :func:`stream_dense_tables` wrote for one table: its file, rows and the seconds
    spent on it (its lattice, its share of the map reads, its writes)."""

    path: Path
    n_rows: int
    seconds: float


def stream_dense_tables(dmap: DenseMap, tiles: pd.DataFrame, scales: Sequence[tuple[str, float]],
                        paths: Sequence[str | Path], *, geo: dict,
                        tissue: Callable[[np.ndarray], np.ndarray], info: dict,
                        spacing_um: float | None = None) -> list[StreamedTableInfo]:
    """Pseudo-spot (``("disc", diameter)``) and bin (``("square", side)``) tables read out of
    ``dmap`` over the tissue tiles, each written to its ``paths`` entry block by block
    (:class:`~histomap.data.streamed_table.StreamedTable`): the tables :func:`_table` would make
    of the whole lattices, never held in memory. The tables move down the map together (the one
    furthest behind goes next) through one cache of map rows, so the map is read once for all
    of them. ``tissue`` tells which level-0 centres lie on tissue (:func:`tissue_lookup`)."""
    if len(scales) != len(paths):
        raise ValueError("one output path per table")
    maps = MapRows(dmap, consumers=len(scales))
    with contextlib.ExitStack() as stack:
        streams = []
        for i, ((shape, size), path) in enumerate(zip(scales, paths)):
            prefix = "spot" if shape == "disc" else "bin"
            empty = lattice_spots(np.zeros((0, 2)), np.zeros((0, 2), np.int64),
                                  diameter_um=size, prefix=prefix, sample=geo["sample"],
                                  platform=geo["platform"], mpp=float(geo["mpp"]),
                                  image=geo["image"])
            template = _table(np.zeros((0, len(dmap.genes)), np.float32), empty, dmap.genes,
                              shape, size, info, spatial=geo.get("spatial"))
            table = stack.enter_context(StreamedTable(
                path, dmap.genes, uns=template.uns, obsm={"spatial": 2},
                obs_columns={"diameter_um": np.float64, "shape": [shape],
                             "array_row": np.int64, "array_col": np.int64}))
            streams.append(_TableStream(dmap, tiles, shape, size, path, table, geo=geo,
                                        tissue=tissue, maps=maps.view(i),
                                        spacing_um=spacing_um))
        active = list(range(len(streams)))
        while active:
            i = min(active, key=maps.position)
            if not streams[i].step():
                maps.done(i)
                active.remove(i)
    return [StreamedTableInfo(Path(s.path), s.table.n_rows, s.seconds) for s in streams]


def spot_model_tables(bundle: Bundle | str | Path, slide_path: str | Path,
                      tiles_parquet: str | Path, spots_h5ad: str | Path, *,
                      spot_diameters_um: Sequence[float], spot_spacing_um: float | None = None,
                      out_spots: Sequence[str | Path], mask_mpp: float = 16.0,
                      device: str = "auto",
                      batch_size: int = 64) -> list[ad.AnnData]:
    """Pseudo-spot tables from a spot-model bundle: one prediction per lattice point from the
    crop the model was trained on (``input.crop_um``)."""
    bundle = _bundle(bundle)
    if bundle.is_dense:
        raise InputError(bundle.path, f"bundle {bundle.name!r} is a dense model; use "
                                      "apply_dense and dense_tables")
    if len(out_spots) != len(spot_diameters_um):
        raise ValueError("one output per spot diameter")
    geo = _geometry(spots_h5ad)
    with open_slide(slide_path) as slide:
        mpp0 = slide_mpp(slide, slide_path)
    if abs(float(geo["mpp"]) - mpp0) > 1e-3 * mpp0:
        raise InputError(spots_h5ad, f"recorded mpp {geo['mpp']} differs from the slide's "
                                     f"{mpp0} ({slide_path})")
    tiles = pd.read_parquet(tiles_parquet)
    trained = bundle.meta["input"].get("spot_diameters_um") or []
    crop = bundle.meta["input"].get("crop_um")
    tables = []
    for (shape, size, lattice), path in zip(
            _lattices(tiles, geo, slide_path, mask_mpp, spot_diameters_um, spot_spacing_um, ()),
            out_spots):
        if trained and not any(math.isclose(size, t, rel_tol=1e-6) for t in trained):
            log.warning("bundle %s was trained on %s um spots; its %g um pseudo-spots are its "
                        "predictions for %g um crops at their centres", bundle.name,
                        ", ".join(f"{t:g}" for t in trained), size, crop)
        if lattice.n_obs == 0:
            raise InputError(tiles_parquet, f"no {size:g} um pseudo-spot centre lies in tissue")
        if bundle.architecture == "histogene":
            from histomap.tasks.histogene import predict_histogene

            pred = predict_histogene(bundle.model_path, lattice, slide_path, None,
                                     device=device)
        else:
            from histomap.tasks.spot import predict_spot_model

            pred = predict_spot_model(bundle.model_path, lattice, slide_path, None,
                                      batch_size=batch_size, device=device)
        table = _table(np.asarray(pred.X), lattice, bundle.genes, shape, size,
                       _model_info(bundle, crop_um=crop), spatial=geo["spatial"])
        _write(table, path)
        tables.append(table)
    return tables


# --------------------------------------------------------------------------- figure
def plot_applied(slide_path: str | Path, genes: Sequence[str], out_png: str | Path, *,
                 dense_zarr: str | Path | None = None, spots_h5ad: str | Path | None = None,
                 title: str = "", max_px: int = 600, mask_mpp: float = 16.0) -> None:
    """The H&E beside the first ``genes`` of an applied model: the dense map (when given; shown
    on tissue only, :func:`on_tissue`) or pseudo-spot values as dots, each gene on its own
    colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histomap.evaluation.figures import save_png

    with open_slide(slide_path) as slide:
        mpp0 = slide_mpp(slide, slide_path)
        w0, h0 = slide.dimensions
        if dense_zarr is not None:
            dmap = read_dense(dense_zarr)
            h, w = dmap.mask.shape
            ox, oy = dmap.origin_px
            s0 = dmap.mpp / mpp0
            box = (ox, oy, w * s0, h * s0)
        else:
            box = (0.0, 0.0, float(w0), float(h0))
        ds = max(1.0, max(box[2], box[3]) / max_px)
        out_w, out_h = max(1, int(box[2] / ds)), max(1, int(box[3] / ds))
        he = read_region(slide, *box, out_w, out_h)
    genes = list(genes)
    fig, axes = plt.subplots(1, len(genes) + 1, figsize=(3.2 * (len(genes) + 1), 3.4),
                             squeeze=False)
    axes = axes[0]
    extent_um = [box[0] * mpp0, (box[0] + box[2]) * mpp0, (box[1] + box[3]) * mpp0,
                 box[1] * mpp0]
    axes[0].imshow(he, extent=extent_um)
    axes[0].set_title("H&E")
    if dense_zarr is not None:
        step = max(1, int(math.ceil(max(dmap.mask.shape) / max_px)))
        mask = map_on_tissue(dmap, slide_path, step=step, mask_mpp=mask_mpp)
        for ax, gene in zip(axes[1:], genes):
            values = np.asarray(dmap.dense[dmap.genes.index(gene), ::step, ::step], np.float32)
            shown = np.ma.masked_where(~mask, values)
            ax.imshow(he, extent=extent_um, alpha=0.35)
            im = ax.imshow(shown, extent=extent_um, cmap="magma", alpha=0.9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(gene)
    else:
        table = ad.read_h5ad(spots_h5ad)
        xy_um = np.asarray(table.obsm["spatial"]) * mpp0
        for ax, gene in zip(axes[1:], genes):
            ax.imshow(he, extent=extent_um, alpha=0.35)
            values = np.asarray(table[:, gene].X).ravel()
            sc = ax.scatter(xy_um[:, 0], xy_um[:, 1], c=values, s=6, cmap="magma")
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(gene)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or Path(slide_path).parent.name)
    save_png(fig, out_png)
    plt.close(fig)
