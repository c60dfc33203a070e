"""HistoGene-style spot models (train_histogene, predict_histogene): training and prediction of
slide transformers that predict every spot of a slide at once, on the shared loop
(:func:`histomap.train.fit`), written as the spot predictions AnnData of
:func:`histomap.tasks.predict.spots_prediction_anndata` (arrow: normalised spots + slide ->
model -> spot predictions). The crop regressors are in :mod:`histomap.tasks.spot`.

**HistoGene** (:class:`histomap.models.histogene.HistoGene`) predicts all spots of a slide at once:
the sequence is the slide's spots, each a flattened H&E patch plus the spot's (x, y) grid
position. Here:

* **patches**: ``crop_um`` squares centred on the spots (default: the spot diameter), read at
  ``input_mpp`` (default: ``crop_um / patch_px``) and resized to the model's ``patch_px``;
* **positions**: the spot lattice (``array_row``/``array_col``, legacy ST array coordinates or
  ``{x}x{y}`` names, :func:`histomap.data.srpairs.spot_lattice`), else spot centres quantised to
  a grid (:func:`quantise_positions`); shifted to start at 0 per slide and clipped to
  ``n_pos - 1`` (logged);
* **one kind of sequence**: training, validation and prediction all see *spatially contiguous
  windows* of at most ``max_spots`` spots: the ``max_spots`` spots nearest to an anchor spot
  (centres in level-0 px), so the model is never asked to read a sequence longer or sparser
  than the ones it learnt from;
* **training items**: windows around random anchors among a training slide's training spots
  (``items_per_slide`` items per slide per epoch; default: enough to show every spot about once),
  each patch under a random dihedral transform;
* **validation**: spatial blocks of the training slides
  (:func:`histomap.evaluation.folds.validation_split`); fixed windows covering the validation
  spots (training spots as context, :func:`covering_windows`), each validation spot scored in
  exactly one window. Test-fold slides are never seen;
* **prediction**: windows covering every spot of a held-out slide (:func:`covering_windows`:
  each spot lies in the nearer half of at least one window, and windows overlap), each spot's
  prediction the mean over the windows that hold it; written as the spot predictions AnnData of
  :func:`histomap.tasks.predict.spots_prediction_anndata`. A slide with at most ``max_spots``
  spots is one window.

Model options read from the ``histogene`` config besides HistoGene's keyword arguments:
``input_mpp``, ``crop_um``, ``max_spots`` (256), ``items_per_slide``.
"""
from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree
from torch import nn
from torch.utils.data import Dataset

from histomap.compat import torch
from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry
from histomap.data.spot_patches import dihedral, extract_spot_patches
from histomap.data.srpairs import spot_lattice
from histomap.errors import InputError
from histomap.evaluation.folds import validation_split
from histomap.models import build_model
from histomap.tasks.predict import spots_prediction_anndata
from histomap.train import (TrainConfig, amp_dtype, autocast, fit, load_model, resolve_device,
                            save_model, to_device, training_fingerprint)

log = logging.getLogger(__name__)

MODEL_NAME = "histogene"
TASK_KEYS = ("input_mpp", "crop_um", "max_spots", "items_per_slide")
DEFAULT_MAX_SPOTS = 256
ROW_GAP = 0.25  # coordinate gaps below this fraction of the spot spacing stay in one grid line


# --------------------------------------------------------------------------- grid positions
def quantise_positions(xy_px: np.ndarray) -> np.ndarray:
    """(n, 2) spot centres (x, y) px -> (n, 2) int64 grid indices from 0 per axis.

    The spot spacing is the median nearest-neighbour distance; per axis, sorted coordinates
    closer than a quarter of it are one grid line, and the axis step is the median gap between
    lines. A square lattice gives (column, row); a hexagonal lattice with staggered rows gives
    (doubled column, row), like Visium's ``array_col``. Spots that end on a shared index (a
    rotated or irregular layout) are logged.
    """
    xy = np.asarray(xy_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(f"spot centres must be finite (n, 2) (x, y) px, got {xy.shape}")
    out = np.zeros(xy.shape, dtype=np.int64)
    if len(xy) < 2:
        return out
    dist, _ = cKDTree(xy).query(xy, k=2)
    spacing = float(np.median(dist[:, 1]))
    if spacing <= 0:
        raise ValueError("more than half of the spots share their centre with another spot: "
                         "no grid spacing")
    for axis in (0, 1):
        out[:, axis] = _axis_indices(xy[:, axis], spacing)
    _, counts = np.unique(out, axis=0, return_counts=True)
    if (counts > 1).any():
        log.info("grid quantisation: %d of %d spots share a grid index with another spot "
                 "(rotated or irregular layout)", int(counts[counts > 1].sum()), len(xy))
    return out


def _axis_indices(values: np.ndarray, spacing: float) -> np.ndarray:
    """Grid-line index of each coordinate: sorted values split into lines at gaps above
    ``ROW_GAP * spacing``; the step is the median distance between line centres, refined by a
    least-squares fit of the centres on their indices."""
    order = np.sort(values)
    breaks = np.flatnonzero(np.diff(order) > ROW_GAP * spacing) + 1
    centres = np.array([part.mean() for part in np.split(order, breaks)])
    if len(centres) < 2:
        return np.zeros(len(values), dtype=np.int64)
    step = float(np.median(np.diff(centres)))
    index = np.rint((centres - centres[0]) / step)
    step, offset = np.polyfit(index, centres, 1)
    index = np.rint((values - offset) / step)
    return (index - index.min()).astype(np.int64)


def spot_positions(spots: ad.AnnData, *, n_pos: int, what: str = "spots") -> np.ndarray:
    """(n, 2) int64 (x, y) grid indices of the spots, starting at 0, clipped to ``n_pos - 1``."""
    try:
        row, col, how = spot_lattice(spots, what)
        positions = np.column_stack([col, row]).astype(np.int64)
    except InputError:
        positions = quantise_positions(np.asarray(spots.obsm["spatial"]))
        how = "spot centres quantised to the median spot spacing"
    if len(positions):
        positions = positions - positions.min(axis=0)
    over = positions > n_pos - 1
    if over.any():
        log.warning("%s: %d of %d spots have a grid index beyond n_pos - 1 = %d (largest x %d, "
                    "y %d); clipped (raise n_pos to keep them apart)", what,
                    int(over.any(axis=1).sum()), len(positions), n_pos - 1,
                    int(positions[:, 0].max()), int(positions[:, 1].max()))
        positions = np.minimum(positions, n_pos - 1)
    log.info("%s: grid positions from %s, extent %s", what, how,
             (positions.max(axis=0) + 1).tolist() if len(positions) else [0, 0])
    return positions


# --------------------------------------------------------------------------- slide sequences
def resize_patches(patches: np.ndarray, patch_px: int, chunk: int = 256) -> torch.Tensor:
    """uint8 (n, s, s, 3) patches -> uint8 (n, 3, patch_px, patch_px) (antialiased bilinear)."""
    tensor = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)
    if tensor.shape[-2:] == (patch_px, patch_px):
        return tensor.contiguous()
    out = torch.empty((len(tensor), 3, patch_px, patch_px), dtype=torch.uint8)
    for start in range(0, len(tensor), chunk):
        part = tensor[start:start + chunk].float()
        out[start:start + chunk] = nn.functional.interpolate(
            part, size=(patch_px, patch_px), mode="bilinear", antialias=True,
            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass
class SlideSequence:
    """Every spot of one slide as HistoGene input: ``patches`` uint8 (n, 3, p, p), ``positions``
    long (n, 2) (x, y) grid indices, ``targets`` float32 (n, genes) or None, ``centres_px``
    float (n, 2) spot centres (level-0 px) that windows are drawn by (None: the grid
    positions)."""

    name: str
    patches: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor | None = None
    centres_px: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def xy(self) -> np.ndarray:
        """Coordinates windows are built on: the centres, else the grid positions."""
        xy = self.centres_px if self.centres_px is not None else self.positions.numpy()
        return np.asarray(xy, dtype=np.float64)


def window_around(tree: cKDTree, xy: np.ndarray, anchor: int, size: int) -> np.ndarray:
    """Sorted indices of the ``size`` points nearest to point ``anchor`` (the anchor included,
    also when other points share its position)."""
    size = min(int(size), len(xy))
    _, idx = tree.query(xy[anchor], k=size)
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    if anchor not in idx:
        idx[-1] = anchor
    return np.sort(idx)


def covering_windows(xy: np.ndarray, max_spots: int, targets: np.ndarray | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Spatially contiguous windows of at most ``max_spots`` of the points ``xy`` that cover
    every target point (default: all): ``[(indices, owned), ...]``, ``indices`` sorted into
    ``xy``, ``owned`` a bool mask over them.

    Anchors are taken in raster order (by y, then x) among the target points not yet owned; a
    window is the ``max_spots`` points nearest its anchor, and it owns the uncovered targets in
    its nearer half (the ``ceil(max_spots / 2)`` nearest), so every target is owned by exactly
    one window, well inside it, and neighbouring windows overlap. Deterministic."""
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    targets = np.ones(n, dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    if max_spots < 1:
        raise ValueError(f"max_spots must be >= 1, got {max_spots}")
    if n <= max_spots:
        return [(np.arange(n), targets.copy())] if targets.any() else []
    tree = cKDTree(xy)
    core_size = (int(max_spots) + 1) // 2
    uncovered = targets.copy()
    windows = []
    for anchor in np.lexsort((xy[:, 0], xy[:, 1])):
        if not uncovered[anchor]:
            continue
        idx = window_around(tree, xy, anchor, max_spots)
        core = window_around(tree, xy, anchor, core_size)
        owned = np.isin(idx, core) & uncovered[idx]
        uncovered[idx[owned]] = False
        windows.append((idx, owned))
    return windows


def slide_sequence(spots: ad.AnnData, slide: str | Path, genes: Sequence[str] | None, *,
                   crop_um: float, input_mpp: float | None, patch_px: int, n_pos: int,
                   path: str | Path = "spots.h5ad") -> SlideSequence:
    """Patches, grid positions and (with ``genes``) targets of every spot of one sample."""
    name = Path(path).name
    input_mpp = float(input_mpp) if input_mpp else crop_um / patch_px
    patches = extract_spot_patches(slide, np.asarray(spots.obsm["spatial"]), crop_um=crop_um,
                                   out_mpp=input_mpp)
    targets = None
    if genes is not None:
        targets = torch.from_numpy(np.ascontiguousarray(
            expression_matrix(spots, genes, path=path), dtype=np.float32))
    positions = torch.from_numpy(spot_positions(spots, n_pos=n_pos, what=name))
    log.info("%s: %d spots, %g um patches at %.3g um/px resized to %d px", name, spots.n_obs,
             crop_um, input_mpp, patch_px)
    return SlideSequence(name, resize_patches(patches, patch_px), positions, targets,
                         np.asarray(spots.obsm["spatial"], dtype=np.float64))


class SpotSequenceDataset(Dataset):
    """Sequences of spots of single slides, padded to one length.

    ``context[s]``: bool mask of the spots of slide ``s`` that may enter its sequences;
    ``scored[s]``: bool mask of the spots whose targets count in the loss (a subset of the
    context). With ``max_spots`` each item is a spatially contiguous window: the ``max_spots``
    context spots nearest to a random context spot (torch RNG), ``items_per_slide`` items per
    slide (default ``ceil(context / max_spots)``); with ``max_spots`` and ``cover=True`` the
    items are the fixed :func:`covering_windows` of the scored spots, each scored spot scored in
    the one window that owns it (validation); without ``max_spots`` each slide is one item
    holding its whole context in order. ``augment`` applies a random dihedral transform to each
    patch.

    Items are dicts: ``patches`` uint8 (L, 3, p, p), ``positions`` long (L, 2), ``targets``
    float32 (L, genes), ``valid`` bool (L,) (False = padding), ``scored`` bool (L,).
    """

    def __init__(self, slides: Sequence[SlideSequence], context: Sequence[np.ndarray],
                 scored: Sequence[np.ndarray], *, max_spots: int | None = None,
                 items_per_slide: int | None = None, augment: bool = False,
                 cover: bool = False):
        if not (len(slides) == len(context) == len(scored)):
            raise ValueError("need one context and one scored mask per slide")
        if max_spots is not None and max_spots < 1:
            raise ValueError(f"max_spots must be >= 1, got {max_spots}")
        self.slides, self.context, self.scored, self.trees = [], [], [], []
        items: list[int] = []
        self.fixed: list[tuple[np.ndarray, np.ndarray]] = []  # cover: (spots, scored) per item
        for slide, ctx, sc in zip(slides, context, scored):
            if slide.targets is None:
                raise ValueError(f"{slide.name}: training sequences need targets")
            ctx, sc = np.asarray(ctx, bool), np.asarray(sc, bool)
            if ctx.shape != (len(slide),) or sc.shape != (len(slide),) or (sc & ~ctx).any():
                raise ValueError(f"{slide.name}: masks must be ({len(slide)},) with scored "
                                 "spots inside the context")
            if not sc.any():
                log.info("%s: no scored spot; left out of this dataset", slide.name)
                continue
            n_ctx = int(ctx.sum())
            context = np.flatnonzero(ctx)
            if max_spots is not None and cover:
                windows = covering_windows(slide.xy[context], max_spots, sc[context])
                self.fixed += [(context[idx], context[idx][owned]) for idx, owned in windows]
                n_items = len(windows)
            else:
                n_items = 1 if max_spots is None else int(
                    items_per_slide or math.ceil(n_ctx / max_spots))
            items += [len(self.slides)] * n_items
            self.slides.append(slide)
            self.context.append(torch.from_numpy(context))
            self.scored.append(torch.from_numpy(sc))
            self.trees.append(cKDTree(slide.xy[context])
                              if max_spots is not None and not cover else None)
        if not self.slides:
            raise ValueError("no slide has a scored spot")
        self.items = np.array(items, dtype=np.int64)
        longest = max(len(c) for c in self.context)
        self.length = longest if max_spots is None else min(int(max_spots), longest)
        self.max_spots = max_spots
        self.cover = bool(cover) and max_spots is not None
        self.augment = bool(augment)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.items[i])
        slide, idx = self.slides[s], self.context[s]
        scored = self.scored[s]
        if self.cover:
            spots, owned = self.fixed[i]
            idx = torch.from_numpy(spots)
            scored = torch.zeros(len(slide), dtype=torch.bool)
            scored[torch.from_numpy(owned)] = True
        elif self.max_spots is not None and len(idx) > self.max_spots:
            anchor = int(torch.randint(len(idx), (1,)))
            ctx = idx.numpy()
            window = window_around(self.trees[s], slide.xy[ctx], anchor, self.max_spots)
            idx = torch.from_numpy(ctx[window])
        patches = slide.patches[idx]
        if self.augment:
            ks = torch.randint(8, (len(idx),))
            patches = patches.clone()
            for k in range(1, 8):
                sel = ks == k
                if sel.any():
                    patches[sel] = dihedral(patches[sel], k)
        m, length = len(idx), self.length
        out = {"patches": torch.zeros((length, *patches.shape[1:]), dtype=torch.uint8),
               "positions": torch.zeros((length, 2), dtype=torch.long),
               "targets": torch.zeros((length, slide.targets.shape[1]), dtype=torch.float32),
               "valid": torch.zeros(length, dtype=torch.bool),
               "scored": torch.zeros(length, dtype=torch.bool)}
        out["patches"][:m] = patches
        out["positions"][:m] = slide.positions[idx]
        out["targets"][:m] = slide.targets[idx]
        out["valid"][:m] = True
        out["scored"][:m] = scored[idx]
        return out


def histogene_batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                         device: torch.device, loss_fn: Callable | None) -> torch.Tensor:
    """``fit``'s batch_to_loss: HistoGene over the padded sequences, ``loss_fn`` (default MSE)
    on the scored spots only."""
    batch = to_device(batch, device)
    pred = model(batch["patches"].float().div_(255.0), batch["positions"], ~batch["valid"])
    scored = batch["scored"]
    loss_fn = loss_fn or nn.functional.mse_loss
    return loss_fn(pred[scored].float(), batch["targets"][scored])


# --------------------------------------------------------------------------- training
def task_options(model_cfg: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split the ``histogene`` config into (task options, HistoGene keyword arguments)."""
    cfg = dict(model_cfg)
    task = {k: cfg.pop(k, None) for k in TASK_KEYS}
    task["max_spots"] = int(task["max_spots"] or DEFAULT_MAX_SPOTS)
    if task["items_per_slide"] is not None:
        task["items_per_slide"] = int(task["items_per_slide"])
    if cfg.pop("checkpoint", None):
        raise ValueError("HistoGene has no pretrained backbone: remove 'checkpoint' from its "
                         "config")
    return task, cfg


def train_histogene(st_paths: Sequence[str | Path], slide_paths: Sequence[str | Path],
                    genes: Sequence[str], *, model_cfg: Mapping, train_cfg: Mapping,
                    validation: Mapping, seed: int, out_model: str | Path, out_log: str | Path,
                    checkpoint_dir: str | Path,
                    on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train HistoGene on the given (training-fold) samples; write ``model.pt`` and the log.

    Validation spots are spatial blocks of the training slides (``validation``: fraction,
    block_um), scored in whole-slide sequences. Resumes from ``checkpoint_dir/last.pt``.
    """
    if len(st_paths) != len(slide_paths) or not st_paths:
        raise ValueError(f"need one slide per spots file, got {len(st_paths)} and "
                         f"{len(slide_paths)}")
    task, hg_cfg = task_options(model_cfg)
    torch.manual_seed(seed)
    model = build_model(MODEL_NAME, len(genes), **hg_cfg)
    slides, train_masks, val_masks = [], [], []
    for i, (st_path, slide) in enumerate(zip(st_paths, slide_paths)):
        spots = ad.read_h5ad(st_path)
        crop_um = float(task["crop_um"] or geometry(spots)["spot_diameter_um"])
        seq = slide_sequence(spots, slide, genes, crop_um=crop_um, input_mpp=task["input_mpp"],
                             patch_px=model.patch_px, n_pos=model.n_pos, path=st_path)
        xy = np.asarray(spots.obsm["spatial"])
        block_px = float(validation["block_um"]) / geometry(spots)["mpp"]
        val = validation_split(xy, fraction=float(validation["fraction"]), block_px=block_px,
                               seed=seed + i)
        log.info("%s: %d training spots, %d validation spots (spatial blocks of %g um)",
                 seq.name, int((~val).sum()), int(val.sum()), validation["block_um"])
        slides.append(seq)
        train_masks.append(~val)
        val_masks.append(val)
    train_ds = SpotSequenceDataset(slides, train_masks, train_masks, max_spots=task["max_spots"],
                                   items_per_slide=task["items_per_slide"], augment=True)
    val_ds = None
    if any(v.any() for v in val_masks):  # windows over whole slides, validation spots scored
        val_ds = SpotSequenceDataset(slides, [np.ones(len(s), bool) for s in slides], val_masks,
                                     max_spots=task["max_spots"], cover=True)
    model.init_output_bias(torch.cat([s.targets[torch.from_numpy(m)]
                                      for s, m in zip(slides, train_masks)]).mean(dim=0))
    log.info("HistoGene: %d training windows of up to %d contiguous spots per epoch, %d "
             "validation windows", len(train_ds), train_ds.length, len(val_ds) if val_ds else 0)
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    summary = fit(model, train_ds, val_ds, loss_fn=nn.functional.mse_loss,
                  out_dir=checkpoint_dir, cfg=cfg, batch_to_loss=histogene_batch_loss,
                  on_epoch_end=on_epoch_end,
                  fingerprint=training_fingerprint(
                      [*st_paths, *slide_paths], model_name=MODEL_NAME, model_cfg=model_cfg,
                      genes=list(genes), validation=validation, seed=seed))
    save_model(out_model, model, model_name=MODEL_NAME, model_config=model.config, genes=genes,
               extra={**task, "train": cfg.to_dict(), "validation": dict(validation),
                      "best_epoch": summary["best_epoch"],
                      "best_val_loss": summary["best_val_loss"]})
    Path(out_log).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(checkpoint_dir) / "train_log.csv", out_log)
    return summary


# --------------------------------------------------------------------------- prediction
def predict_sequence(model: nn.Module, seq: SlideSequence, *, max_spots: int | None = None,
                     device: str | torch.device = "auto", amp: bool = True) -> np.ndarray:
    """float32 (n, genes): HistoGene over ``seq``'s spots (eval mode), in the windows it was
    trained on: :func:`covering_windows` of at most ``max_spots`` spots, each spot the mean of
    the windows that hold it (``None``: one sequence of every spot)."""
    device = resolve_device(device)
    dtype = amp_dtype(device, amp)
    model.to(device).eval()
    if len(seq) == 0:
        raise ValueError(f"{seq.name}: no spots to predict")
    windows = ([(np.arange(len(seq)), None)] if max_spots is None
               else covering_windows(seq.xy, max_spots))
    total, hits = None, np.zeros(len(seq), dtype=np.int64)
    with torch.no_grad(), autocast(device, dtype):
        for idx, _ in windows:
            sel = torch.from_numpy(idx)
            out = model(seq.patches[sel][None].to(device).float().div_(255.0),
                        seq.positions[sel][None].to(device))[0].float().cpu().numpy()
            if total is None:
                total = np.zeros((len(seq), out.shape[1]), dtype=np.float64)
            total[idx] += out
            hits[idx] += 1
    pred = (total / hits[:, None]).astype(np.float32)
    log.info("%s: %d spots predicted in %d windows of up to %s spots (each spot in %.1f on "
             "average)", seq.name, len(seq), len(windows), max_spots or len(seq), hits.mean())
    n_bad = int((~np.isfinite(pred)).any(axis=1).sum())
    if n_bad:
        log.warning("%s: %d of %d spots have non-finite predictions", seq.name, n_bad, len(pred))
    return pred


def predict_histogene(model_path: str | Path, st_h5ad: str | Path | ad.AnnData,
                      slide: str | Path, out_h5ad: str | Path | None, *,
                      device: str = "auto") -> ad.AnnData:
    """Predict every spot of one held-out sample (or of an AnnData of spot centres, e.g.
    pseudo-spots) as one sequence; write the AnnData (unless ``out_h5ad`` is None)."""
    model, meta = load_model(model_path)
    spots = st_h5ad if isinstance(st_h5ad, ad.AnnData) else ad.read_h5ad(st_h5ad)
    extra = meta.get("extra", {})
    geo = geometry(spots)
    crop_um = float(extra.get("crop_um") or geo["spot_diameter_um"])
    seq = slide_sequence(spots, slide, None, crop_um=crop_um, input_mpp=extra.get("input_mpp"),
                         patch_px=model.patch_px, n_pos=model.n_pos,
                         path=geo.get("image", "spots") if isinstance(st_h5ad, ad.AnnData)
                         else st_h5ad)
    max_spots = extra.get("max_spots")
    pred = predict_sequence(model, seq, max_spots=int(max_spots) if max_spots else None,
                            device=device)
    out = spots_prediction_anndata(
        pred, spots.obs_names, meta["genes"], spots.obsm["spatial"], geo,
        geo["spot_diameter_um"], model_info={"model": meta["model_name"], "path": str(model_path)},
        scanpy_uns=spots.uns.get("spatial"))
    if out_h5ad is not None:
        Path(out_h5ad).parent.mkdir(parents=True, exist_ok=True)
        out.write_h5ad(out_h5ad)
    return out
