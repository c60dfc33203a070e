"""PixNet training and prediction from normalised spots + slides (the ``*_pixnet`` rules' work).

Training sees square image windows, not single-spot crops: each window of ``window_px`` pixels
at ``input_mpp`` is centred on an anchor spot (with random jitter in training) and carries every
spot of its split whose whole disc lies inside it, as discs in dense-map pixels
(:func:`histomap.models.roi.discs_from_spots`, each spot with its own diameter, so mixed spot sizes
train together). PixNet predicts the dense map of the window, the discs are aggregated
(``roi_aggregate``, mode "mean") and compared with the spots' log-normalised expression by
PixNet's joint loss.

The windows, their dataset and the loss on a batch are in :mod:`histomap.tasks.dense_windows`.

Prediction runs PixNet over the slide's tissue tiles
(:func:`histomap.tasks.dense_map.predict_dense_map`) and reads spots of any diameter out of the
dense map (:func:`histomap.tasks.dense_map.spots_from_dense`).

Model options read from the ``pixnet`` config besides PixNet's own keyword arguments:
``input_mpp`` and ``window_px`` (unless passed explicitly), ``checkpoint`` (local encoder
weights), ``loss`` (joint | mse | pcc), ``pcc_weight`` (0.5), ``mse_weight`` (1.0),
``jitter_um`` (cap on the training-window jitter; default: as far as the anchor stays inside),
``anchor_stride_um`` (one anchor per grid cell of this size instead of one per spot, for dense
bins), ``predict_tile_px`` / ``predict_overlap_px`` (default: the window and a quarter of it).
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from histomap.checked_io import read_h5ad_checked, read_parquet_checked
from histomap.compat import torch
from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry, square_mask
from histomap.data.slide import open_slide, slide_mpp
from histomap.data.stain import StainJitter
from histomap.errors import InputError
from histomap.evaluation.folds import validation_split
from histomap.models import build_model
from histomap.tasks.dense_map import (CPU_BF16_DEFAULT, DenseMap, predict_dense_map, read_dense,
                                      spots_from_dense)
from histomap.tasks.dense_windows import (SlideSpots, WindowDataset, make_loss_fn,
                                          pixnet_batch_loss)
from histomap.tasks.feature_cache import cached_datasets, cached_dense_batch_loss
from histomap.tasks.predict import spots_prediction_anndata
from histomap.train import (TrainConfig, cpu_bf16_enabled, fit, load_model, resolve_device,
                            save_model, training_fingerprint)

log = logging.getLogger(__name__)

from histomap.models import DENSE_MODELS  # noqa: E402  models with forward_spots and out_stride
TASK_KEYS = ("input_mpp", "window_px", "checkpoint", "loss", "pcc_weight", "mse_weight",
             "jitter_um", "anchor_stride_um", "predict_tile_px", "predict_overlap_px",
             "stain_augment")


# --------------------------------------------------------------------------- training
def task_options(model_cfg: Mapping[str, Any], *, window_px: int | None = None,
                 input_mpp: float | None = None) -> tuple[dict, dict]:
    """Split the ``pixnet`` config into (task options, PixNet keyword arguments)."""
    cfg = dict(model_cfg)
    task = {k: cfg.pop(k) for k in TASK_KEYS if k in cfg}
    if window_px is not None:
        task["window_px"] = window_px
    if input_mpp is not None:
        task["input_mpp"] = input_mpp
    missing = [k for k in ("window_px", "input_mpp") if task.get(k) is None]
    if missing:
        raise ValueError(f"PixNet needs {missing} (config or arguments)")
    task["window_px"], task["input_mpp"] = int(task["window_px"]), float(task["input_mpp"])
    task.setdefault("loss", "joint")
    task.setdefault("pcc_weight", 0.5)
    task.setdefault("mse_weight", 1.0)
    return task, cfg


def _check_mpp(spots: ad.AnnData, slide_path: Path, st_path: str | Path) -> float:
    with open_slide(slide_path) as slide:
        mpp0 = slide_mpp(slide, slide_path)
    recorded = float(geometry(spots)["mpp"])
    if abs(recorded - mpp0) > 1e-3 * mpp0:
        raise InputError(st_path, f"spots are in pixels of a {recorded} um/px image but the "
                                  f"slide {slide_path} is {mpp0} um/px")
    return mpp0


def slide_spots(st_path: str | Path, slide_path: str | Path, genes: Sequence[str]
                ) -> tuple[SlideSpots, ad.AnnData]:
    """Spots of one normalised sample (``results/st/{sample}.h5ad``) with their targets."""
    spots = read_h5ad_checked(st_path, what="spot table")
    _check_mpp(spots, Path(slide_path), st_path)
    diameter = (spots.obs["diameter_um"].to_numpy(dtype=np.float64)
                if "diameter_um" in spots.obs else geometry(spots)["spot_diameter_um"])
    return SlideSpots(Path(slide_path), np.asarray(spots.obsm["spatial"]), diameter,
                      expression_matrix(spots, genes, path=st_path), Path(st_path).stem,
                      square_mask(spots)), spots


def _split_spots(st_paths, slide_paths, extra_st_paths, genes: Sequence[str],
                 validation: Mapping, seed: int) -> tuple[list[SlideSpots], list[SlideSpots]]:
    """Per sample, its spots (with the extra spot tables of the same slide) split into training
    and validation spots by spatial blocks: (train parts, validation parts)."""
    train_parts, val_parts = [], []
    for i, (st_path, slide, extra) in enumerate(zip(st_paths, slide_paths, extra_st_paths)):
        spots, adata = slide_spots(st_path, slide, genes)
        for extra_path in extra:
            more = slide_spots(extra_path, slide, genes)[0]
            log.info("%s: + %d spots of %s um from %s (mixed-scale training)", spots.name,
                     len(more.centres_px), ", ".join(f"{d:g}" for d in
                                                     np.unique(more.diameter_um)), extra_path)
            spots = spots.concat(more)
        block_px = float(validation["block_um"]) / float(geometry(adata)["mpp"])
        val = validation_split(spots.centres_px, fraction=float(validation["fraction"]),
                               block_px=block_px, seed=seed + i)
        log.info("%s: %d training spots, %d validation spots (spatial blocks of %g um)",
                 spots.name, int((~val).sum()), int(val.sum()), validation["block_um"])
        train_parts.append(spots.subset(~val))
        val_parts.append(spots.subset(val))
    return train_parts, val_parts


def _window_datasets(model, task: Mapping, train_parts: list[SlideSpots],
                     val_parts: list[SlideSpots], feature_caches: Sequence[str | Path] | None):
    """(training windows, validation windows or None, fit's batch_to_loss): image windows, or
    windows of the encoder-feature caches when given."""
    window = {"window_px": task["window_px"], "input_mpp": task["input_mpp"],
              "out_stride": model.out_stride}
    if feature_caches:
        train_ds, val_ds = cached_datasets(model, feature_caches, train_parts, val_parts,
                                           checkpoint=task.get("checkpoint"),
                                           jitter_um=task.get("jitter_um"),
                                           anchor_stride_um=task.get("anchor_stride_um"),
                                           **window)
        return train_ds, val_ds, cached_dense_batch_loss
    train_ds = WindowDataset(train_parts, augment=True, jitter_um=task.get("jitter_um"),
                             anchor_stride_um=task.get("anchor_stride_um"),
                             color=StainJitter.from_config(task.get("stain_augment")), **window)
    val_ds = None
    if any(len(p.centres_px) for p in val_parts):
        val_ds = WindowDataset(val_parts, augment=False,
                               anchor_stride_um=task.get("anchor_stride_um"), **window)
    return train_ds, val_ds, pixnet_batch_loss


def train_pixnet(st_paths: Sequence[str | Path], slide_paths: Sequence[str | Path],
                 genes: Sequence[str], *, model_cfg: Mapping, train_cfg: Mapping,
                 validation: Mapping, seed: int, out_model: str | Path, out_log: str | Path,
                 checkpoint_dir: str | Path, window_px: int | None = None,
                 input_mpp: float | None = None, model_name: str = "pixnet",
                 extra_st_paths: Sequence[Sequence[str | Path]] | None = None,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 feature_caches: Sequence[str | Path] | None = None) -> dict:
    """Train PixNet (or another dense model of :data:`DENSE_MODELS`, ``model_name``) on the
    given (training-fold) samples; write ``model.pt`` and the log.

    ``extra_st_paths``: per sample, further normalised spot tables of the same slide with other
    spot or bin sizes (e.g. ground truth re-measured at 55 um from synthetic cells or Xenium
    transcripts); they train together with the sample's own spots, each spot with its own
    diameter (mixed-scale supervision). Validation windows come from spatial blocks of the
    training slides (``validation``: fraction, block_um), the same blocks for every size.
    ``feature_caches``: per sample, the ``encode_slide`` cache of the model's frozen encoder at
    ``input_mpp``; training windows then come from it and only the part after the encoder runs
    (:mod:`histomap.tasks.feature_cache`). Only for a frozen encoder (PixNet
    ``freeze_encoder``, iStar ``features: encoder``).
    Resumes from ``checkpoint_dir/last.pt`` after an interruption.
    """
    if len(st_paths) != len(slide_paths) or not st_paths:
        raise ValueError(f"need one slide per spots file, got {len(st_paths)} and "
                         f"{len(slide_paths)}")
    extra_st_paths = list(extra_st_paths) if extra_st_paths else [[] for _ in st_paths]
    if len(extra_st_paths) != len(st_paths):
        raise ValueError(f"extra_st_paths needs one list per sample, got {len(extra_st_paths)} "
                         f"for {len(st_paths)} samples")
    if model_name not in DENSE_MODELS:
        raise ValueError(f"model_name must be one of {DENSE_MODELS}, got {model_name!r}")
    task, pixnet_cfg = task_options(model_cfg, window_px=window_px, input_mpp=input_mpp)
    train_parts, val_parts = _split_spots(st_paths, slide_paths, extra_st_paths, genes,
                                          validation, seed)
    torch.manual_seed(seed)
    model = build_model(model_name, len(genes), pretrained_checkpoint=task.get("checkpoint"),
                        **pixnet_cfg)
    train_ds, val_ds, batch_loss = _window_datasets(model, task, train_parts, val_parts,
                                                    feature_caches)
    model.init_output_bias(train_ds.targets.mean(axis=0))
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    loss_fn = make_loss_fn(task["loss"], task["pcc_weight"], task["mse_weight"])
    fingerprint = training_fingerprint(
        [*st_paths, *slide_paths, *(p for paths in extra_st_paths for p in paths),
         *(feature_caches or [])],
        model_name=model_name, model_cfg=model_cfg, window_px=window_px, input_mpp=input_mpp,
        extra_st=[[str(p) for p in paths] for paths in extra_st_paths], genes=list(genes),
        validation=validation, seed=seed)
    summary = fit(model, train_ds, val_ds, loss_fn=loss_fn, out_dir=checkpoint_dir, cfg=cfg,
                  batch_to_loss=batch_loss, on_epoch_end=on_epoch_end,
                  fingerprint=fingerprint)
    task_extra = {k: v for k, v in task.items() if v is not None}
    save_model(out_model, model, model_name=model_name, model_config=model.config, genes=genes,
               extra={**task_extra, "out_stride": model.out_stride, "train": cfg.to_dict(),
                      "validation": dict(validation), "best_epoch": summary["best_epoch"],
                      "best_val_loss": summary["best_val_loss"]})
    Path(out_log).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(checkpoint_dir) / "train_log.csv", out_log)
    return summary


# --------------------------------------------------------------------------- prediction
def _spot_boxes(centres_px: np.ndarray, diameter_um: float, mpp0: float) -> pd.DataFrame:
    side = diameter_um / mpp0
    return pd.DataFrame({"x0_px": centres_px[:, 0] - side / 2, "y0_px": centres_px[:, 1] - side / 2,
                         "size_px0": np.full(len(centres_px), side)})


def outside_tiles(centres_px: np.ndarray, tiles: pd.DataFrame) -> np.ndarray:
    """True for each centre that lies in no tile ([x0, x0 + size) x [y0, y0 + size)).

    Linear in spots + tiles: tiles are registered in the cells of a square grid (cell = the
    largest tile side) they overlap, and each centre is tested only against its cell's tiles.
    """
    centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    x0, y0 = tiles["x0_px"].to_numpy(float), tiles["y0_px"].to_numpy(float)
    size = tiles["size_px0"].to_numpy(float)
    outside = np.ones(len(centres_px), dtype=bool)
    if len(centres_px) == 0 or len(x0) == 0:
        return outside
    cell = float(size.max()) if size.max() > 0 else 1.0
    cx0, cy0 = np.floor(x0 / cell).astype(np.int64), np.floor(y0 / cell).astype(np.int64)
    cx1 = np.floor((x0 + size) / cell).astype(np.int64)
    cy1 = np.floor((y0 + size) / cell).astype(np.int64)
    px = np.floor(centres_px[:, 0] / cell).astype(np.int64)
    py = np.floor(centres_px[:, 1] / cell).astype(np.int64)
    lo = min(int(cx0.min()), int(cy0.min()), int(px.min()), int(py.min()))
    span = max(int(cx1.max()), int(cy1.max()), int(px.max()), int(py.max())) - lo + 1
    # every (tile, cell) pair a tile overlaps; a tile spans at most 2 x 2 cells of its own size
    tile_ids, keys = [], []
    for dx in range(int((cx1 - cx0).max()) + 1):
        for dy in range(int((cy1 - cy0).max()) + 1):
            ok = (cx0 + dx <= cx1) & (cy0 + dy <= cy1)
            tile_ids.append(np.flatnonzero(ok))
            keys.append((cx0[ok] + dx - lo) * span + (cy0[ok] + dy - lo))
    tile_ids, keys = np.concatenate(tile_ids), np.concatenate(keys)
    order = np.argsort(keys, kind="stable")
    tile_ids, keys = tile_ids[order], keys[order]
    point_keys = (px - lo) * span + (py - lo)
    first = np.searchsorted(keys, point_keys, side="left")
    last = np.searchsorted(keys, point_keys, side="right")
    x, y = centres_px[:, 0], centres_px[:, 1]
    for j in range(int((last - first).max())):
        has = first + j < last
        t = tile_ids[np.minimum(first + j, len(tile_ids) - 1)]
        a, b, s = x0[t], y0[t], size[t]
        outside &= ~(has & (x >= a) & (x < a + s) & (y >= b) & (y < b + s))
    return outside


def predict_dense(model_path: str | Path, slide_path: str | Path, tiles_parquet: str | Path,
                  spots_h5ad: str | Path | None, out_dense_zarr: str | Path, *,
                  tile_px: int | None = None, overlap_px: int | None = None,
                  batch_size: int = 8, device: str = "auto", dtype: str = "float32",
                  band_tile_rows: int | str | None = "auto", cover_um: float | None = None,
                  cover: Sequence[tuple[str | Path, float]] = (),
                  cpu_bf16: bool | str = False):
    """Dense map (OME-zarr) of one held-out slide from a trained dense model (PixNet, iStar).

    The map covers the slide's tissue tiles; with ``cover_um`` the discs (of that diameter) of
    spots of ``spots_h5ad`` outside every tissue tile are added to the coverage (logged), and
    likewise the discs of every ``(spots file, diameter_um)`` of ``cover`` (e.g. the
    cross-scale ground truth), so every spot that will be read out of the map is covered.
    ``spots_h5ad=None`` (an H&E-only slide, ``apply``): the tissue tiles alone. ``cpu_bf16``:
    bf16 autocast on the CPU (true / false / "auto": on where the benchmark holds,
    :data:`histomap.tasks.dense_map.CPU_BF16_DEFAULT`). Returns
    :class:`histomap.tasks.dense_map.DenseMap`.
    """
    model, meta = load_model(model_path, device=resolve_device(device))
    extra = meta.get("extra", {})
    input_mpp = float(extra["input_mpp"])
    window_px = int(extra.get("window_px") or 256)
    out_stride = int(model.out_stride)
    tile_px = int(tile_px or extra.get("predict_tile_px") or window_px)
    if overlap_px is None:
        overlap_px = extra.get("predict_overlap_px")
    if overlap_px is None:
        overlap_px = (tile_px // 4) // out_stride * out_stride
    slide_path = Path(slide_path)
    tiles = read_parquet_checked(tiles_parquet, what="tile index")
    if tiles.empty:
        raise InputError(tiles_parquet, "tile index has no tissue tile")
    to_cover = []
    if spots_h5ad is not None:
        spots = read_h5ad_checked(spots_h5ad, what="spot table")
        mpp0 = _check_mpp(spots, slide_path, spots_h5ad)
        xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        to_cover = [(spots_h5ad, xy, float(cover_um))] if cover_um else []
    else:
        with open_slide(slide_path) as slide:
            mpp0 = slide_mpp(slide, slide_path)
    to_cover += [(path, np.asarray(read_h5ad_checked(path).obsm["spatial"], np.float64), float(um))
                 for path, um in cover]
    boxes = [tiles[["x0_px", "y0_px", "size_px0"]]]
    for path, centres, um in to_cover:
        outside = outside_tiles(centres, tiles) if len(centres) else np.zeros(0, bool)
        if outside.any():
            log.info("%s: %d of %d spot centres lie outside every tissue tile; their discs "
                     "(%g um) are added to the map", path, int(outside.sum()), len(centres), um)
            boxes.append(_spot_boxes(centres[outside], um, mpp0))
    tiles = pd.concat(boxes, ignore_index=True)
    return predict_dense_map(model, slide_path, tiles, input_mpp=input_mpp, tile_px=tile_px,
                             overlap_px=int(overlap_px), out_zarr=out_dense_zarr,
                             batch_size=batch_size, device=device, genes=meta["genes"],
                             dtype=dtype, band_tile_rows=band_tile_rows,
                             cpu_bf16=cpu_bf16_enabled(cpu_bf16, CPU_BF16_DEFAULT),
                             extra_attrs={"model": {"model": meta["model_name"],
                                                    "path": str(model_path)}})


def dense_spot_table(dense_map, spots_h5ad: str | Path, diameter_um: float,
                     out_h5ad: str | Path | None = None) -> ad.AnnData:
    """Spots of ``spots_h5ad`` (centres, names, geometry) read out of a dense map as discs of
    ``diameter_um`` (area-weighted mean of G); written to ``out_h5ad`` when given."""
    dmap = dense_map if isinstance(dense_map, DenseMap) else read_dense(dense_map)
    spots = read_h5ad_checked(spots_h5ad, what="spot table")
    xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    pred = spots_from_dense(dmap, xy, float(diameter_um), geometry(spots)["mpp"], mode="mean",
                            square=square_mask(spots))
    out = spots_prediction_anndata(
        pred, spots.obs_names, dmap.genes, xy, geometry(spots), float(diameter_um),
        model_info={**dmap.attrs.get("model", {}), "dense_map": str(dmap.path),
                    "aggregation": "mean", "tile_px": dmap.attrs.get("tile_px"),
                    "overlap_px": dmap.attrs.get("overlap_px")},
        scanpy_uns=spots.uns.get("spatial"))
    if "shape" in spots.obs:
        out.obs["shape"] = spots.obs["shape"].to_numpy()
    if out_h5ad is not None:
        out_h5ad = Path(out_h5ad)
        out_h5ad.parent.mkdir(parents=True, exist_ok=True)
        out.write_h5ad(out_h5ad)
        log.info("%s: %d spots at %g um -> %s", dmap.path, out.n_obs, diameter_um, out_h5ad)
    return out


def predict_pixnet(model_path: str | Path, slide_path: str | Path,
                   tiles_parquet: str | Path, out_dense_zarr: str | Path,
                   spots_h5ad: str | Path, out_spot_files: Mapping[float | str, str | Path], *,
                   cover_spots: bool = True, **dense_kwargs) -> dict[float, ad.AnnData]:
    """Dense map of one held-out slide (:func:`predict_dense`), then spot tables at every
    requested diameter (:func:`dense_spot_table`): ``out_spot_files`` = {diameter_um: path},
    every table with the sample's spot centres. ``dense_kwargs`` go to :func:`predict_dense`.
    """
    if not out_spot_files:
        raise ValueError("out_spot_files is empty: name at least one spot diameter")
    diameters = {float(d): Path(p) for d, p in out_spot_files.items()}
    dense = predict_dense(model_path, slide_path, tiles_parquet, spots_h5ad, out_dense_zarr,
                          cover_um=max(diameters) if cover_spots else None, **dense_kwargs)
    return {d: dense_spot_table(dense, spots_h5ad, d, path) for d, path in diameters.items()}
