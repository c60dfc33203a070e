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

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.sample import annotate_spots
from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.data.tiling import tissue_mask
from histomap.errors import InputError
from histomap.tasks.bundle import Bundle, read_bundle
from histomap.tasks.dense import predict_dense
from histomap.tasks.dense_map import DenseMap, read_dense, spots_from_dense
from histomap.tasks.predict import spots_prediction_anndata

log = logging.getLogger(__name__)

BIN_ROWS_PER_READ = 8  # bin rows read out of the dense map at once


# --------------------------------------------------------------------------- lattices
def _in_tiles(centres_px: np.ndarray, tiles: pd.DataFrame) -> np.ndarray:
    """Whether each level-0 centre lies in a tile of the index (x0_px, y0_px, size_px0)."""
    inside = np.zeros(len(centres_px), dtype=bool)
    for x0, y0, s in tiles[["x0_px", "y0_px", "size_px0"]].to_numpy(float):
        inside |= ((centres_px[:, 0] >= x0) & (centres_px[:, 0] < x0 + s)
                   & (centres_px[:, 1] >= y0) & (centres_px[:, 1] < y0 + s))
    return inside


def _tiles_bbox(tiles: pd.DataFrame) -> tuple[float, float, float, float]:
    if tiles.empty:
        raise ValueError("the tile index has no tissue tile")
    x0, y0 = tiles["x0_px"].min(), tiles["y0_px"].min()
    x1 = (tiles["x0_px"] + tiles["size_px0"]).max()
    y1 = (tiles["y0_px"] + tiles["size_px0"]).max()
    return float(x0), float(y0), float(x1), float(y1)


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
    step = spacing_um / mpp
    row_step = step * math.sqrt(3) / 2
    x0, y0, x1, y1 = _tiles_bbox(tiles)
    rows = np.arange(math.floor(y0 / row_step), math.ceil(y1 / row_step) + 1)
    cols = np.arange(math.floor(x0 / step) - 1, math.ceil(x1 / step) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    xy = np.column_stack([(cc.ravel() + 0.5 * (rr.ravel() % 2)) * step, rr.ravel() * row_step])
    keep = _in_tiles(xy, tiles)
    return xy[keep], np.column_stack([rr.ravel(), cc.ravel()])[keep]


def square_lattice(tiles: pd.DataFrame, mpp: float, bin_um: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Bins over tissue: squares of side ``bin_um`` tiling the slide from its top-left corner
    (bin (r, c) covers [c b, (c + 1) b) x [r b, (r + 1) b) um); kept when the bin's centre lies
    in a tissue tile. Returns (level-0 centres, (row, col))."""
    step = bin_um / mpp
    x0, y0, x1, y1 = _tiles_bbox(tiles)
    rows = np.arange(math.floor(y0 / step), math.ceil(y1 / step))
    cols = np.arange(math.floor(x0 / step), math.ceil(x1 / step))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rc = np.column_stack([rr.ravel(), cc.ravel()])
    xy = (rc[:, ::-1] + 0.5) * step
    keep = _in_tiles(xy, tiles)
    return xy[keep], rc[keep]


def lattice_spots(centres_px: np.ndarray, rowcol: np.ndarray, *, sample: str, platform: str,
                  mpp: float, diameter_um: float, image: str | Path, prefix: str
                  ) -> ad.AnnData:
    """Pseudo-spots or bins as a spot table without counts (centres, lattice positions,
    geometry), the input of the spot models' predictions."""
    names = [f"{prefix}_{r}_{c}" for r, c in rowcol]
    spots = ad.AnnData(X=sp.csr_matrix((len(names), 0), dtype=np.int32),
                       obs=pd.DataFrame({"array_row": rowcol[:, 0].astype(np.int64),
                                         "array_col": rowcol[:, 1].astype(np.int64)},
                                        index=pd.Index(names)))
    spots.obsm["spatial"] = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    spots.obs["diameter_um"] = float(diameter_um)
    return annotate_spots(spots, sample=sample, platform=platform, mpp=mpp,
                          spot_diameter_um=diameter_um, image=image)


# --------------------------------------------------------------------------- read-out
def _overlap_weights(edges_um: np.ndarray, origin_um: float, pixel_um: float, n_pixels: int
                     ) -> sp.csr_matrix:
    """(bins, pixels) fraction of each map pixel's width lying in each bin interval
    [edges[k], edges[k] + side) along one axis."""
    side = edges_um[1] - edges_um[0] if len(edges_um) > 1 else None
    rows, cols, vals = [], [], []
    for k, lo in enumerate(edges_um):
        hi = lo + (side if side is not None else pixel_um)
        first = max(0, int(math.floor((lo - origin_um) / pixel_um)))
        last = min(n_pixels, int(math.ceil((hi - origin_um) / pixel_um)))
        for j in range(first, last):
            a = max(lo, origin_um + j * pixel_um)
            b = min(hi, origin_um + (j + 1) * pixel_um)
            if b > a:
                rows.append(k)
                cols.append(j)
                vals.append((b - a) / pixel_um)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(edges_um), n_pixels))


def bins_from_dense(dmap: DenseMap, rowcol: np.ndarray, bin_um: float) -> np.ndarray:
    """(n, genes) float32: area-weighted mean of the dense map over each square bin (r, c) of
    side ``bin_um`` (bin lattice anchored at the slide's top-left corner), counting only map
    pixels in the tissue mask; NaN for a bin that covers none. Reads
    :data:`BIN_ROWS_PER_READ` bin rows of the map at a time."""
    n, n_genes = len(rowcol), len(dmap.genes)
    out = np.full((n, n_genes), np.nan, dtype=np.float32)
    if n == 0:
        return out
    height, width = dmap.mask.shape
    ox_um, oy_um = (float(v) * dmap.slide_mpp for v in dmap.origin_px)
    col_ids = np.unique(rowcol[:, 1])
    wx = _overlap_weights(col_ids * bin_um, ox_um, dmap.mpp, width)  # (cols, W)
    col_index = {int(c): i for i, c in enumerate(col_ids)}
    row_ids = np.unique(rowcol[:, 0])
    for start in range(0, len(row_ids), BIN_ROWS_PER_READ):
        block = row_ids[start:start + BIN_ROWS_PER_READ]
        wy = _overlap_weights(block * bin_um, oy_um, dmap.mpp, height)  # (rows, H)
        touched = np.flatnonzero(np.asarray(wy.sum(axis=0)).ravel() > 0)
        if len(touched) == 0:
            continue
        y0, y1 = int(touched[0]), int(touched[-1]) + 1
        mask = np.asarray(dmap.mask[y0:y1, :], dtype=np.float32)
        values = dmap.read(y0, y1) * mask[None]
        wy_b = wy[:, y0:y1].toarray().astype(np.float32)
        wx_t = wx.T.toarray().astype(np.float32)  # (W, cols)
        covered = wy_b @ mask @ wx_t  # (rows, cols)
        sums = np.einsum("ry,gyx,xc->rcg", wy_b, values, wx_t, optimize=True)
        for i, r in enumerate(block):
            pick = np.flatnonzero(rowcol[:, 0] == r)
            cols = np.array([col_index[int(c)] for c in rowcol[pick, 1]])
            ok = covered[i, cols] > 1e-9
            out[pick[ok]] = sums[i, cols[ok]] / covered[i, cols[ok], None]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
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
                 ) -> list[ad.AnnData]:
    """Pseudo-spot tables (one per diameter, ``out_spots``) and bin tables (one per side,
    ``out_bins``) read out of an applied dense map; ``spots_h5ad`` is the sample's ingested spot
    table (its geometry: sample, mpp, image), ``slide_path`` its slide (the tissue mask, at
    ``mask_mpp``). Pseudo-spots lie on a hexagonal lattice of
    ``spot_spacing_um`` (default: the diameter, touching discs)."""
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
    tables = []
    for (shape, size, lattice), path in zip(
            _lattices(tiles, geo, slide_path, mask_mpp, spot_diameters_um, spot_spacing_um,
                      bin_um), outputs):
        xy = np.asarray(lattice.obsm["spatial"])
        if shape == "disc":
            pred = spots_from_dense(dmap, xy, size, dmap.slide_mpp, mode="mean")
        else:
            pred = bins_from_dense(dmap, lattice.obs[["array_row", "array_col"]].to_numpy(),
                                   size)
        table = _table(pred, lattice, dmap.genes, shape, size,
                       _model_info(bundle, dense_map=str(dense_zarr), aggregation="mean"),
                       spatial=geo["spatial"])
        _write(table, path)
        tables.append(table)
    return tables


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
