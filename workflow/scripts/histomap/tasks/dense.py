"""PixNet training and prediction from normalised spots + slides (the ``*_pixnet`` rules' work).

Training sees square image windows, not single-spot crops: each window of ``window_px`` pixels
at ``input_mpp`` is centred on an anchor spot (with random jitter in training) and carries every
spot of its split whose whole disc lies inside it, as discs in dense-map pixels
(:func:`histomap.models.roi.discs_from_spots`, each spot with its own diameter, so mixed spot sizes
train together). PixNet predicts the dense map of the window, the discs are aggregated
(``roi_aggregate``, mode "mean") and compared with the spots' log-normalised expression by
PixNet's joint loss.

Prediction runs PixNet over the slide's tissue tiles (:func:`histomap.tasks.dense_map.predict_dense_map`)
and reads spots of any diameter out of the dense map (:func:`histomap.tasks.dense_map.spots_from_dense`).

Model options read from the ``pixnet`` config besides PixNet's own keyword arguments:
``input_mpp`` and ``window_px`` (unless passed explicitly), ``checkpoint`` (local encoder
weights), ``loss`` (joint | mse | pcc), ``pcc_weight`` (0.5), ``mse_weight`` (1.0),
``jitter_um`` (cap on the training-window jitter; default: as far as the anchor stays inside),
``anchor_stride_um`` (one anchor per grid cell of this size instead of one per spot, for dense
bins), ``predict_tile_px`` / ``predict_overlap_px`` (default: the window and a quarter of it).
"""
from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from histomap.compat import torch
from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry, square_mask
from histomap.data.slide import open_slide, read_region, slide_mpp
from histomap.data.spot_patches import dihedral
from histomap.errors import InputError
from histomap.evaluation.folds import validation_split
from histomap.models import build_model
from histomap.models.pixnet import pixnet_loss
from histomap.models.roi import discs_from_spots
from histomap.tasks.dense_map import (CPU_BF16_DEFAULT, DenseMap, predict_dense_map, read_dense,
                                      spots_from_dense)
from histomap.tasks.predict import spots_prediction_anndata
from histomap.train import (TrainConfig, cpu_bf16_enabled, fit, load_model, resolve_device,
                            save_model, to_device, training_fingerprint)

log = logging.getLogger(__name__)

DENSE_MODELS = ("pixnet", "istar")  # models with forward_spots and out_stride
LOSS_MODES = ("joint", "mse", "pcc")
TASK_KEYS = ("input_mpp", "window_px", "checkpoint", "loss", "pcc_weight", "mse_weight",
             "jitter_um", "anchor_stride_um", "predict_tile_px", "predict_overlap_px")
BLOCK_PX = 256  # side of the cached image blocks (input pixels)


# --------------------------------------------------------------------------- spots of a slide
@dataclass
class SlideSpots:
    """The spots of one slide used for training windows.

    ``centres_px``: (n, 2) level-0 (x, y); ``diameter_um``: (n,) per-spot diameters (square
    bins: side); ``targets``: (n, genes) float32 log-normalised expression; ``square``: (n,)
    bool, square bins (Visium HD) rather than discs.
    """

    slide_path: Path
    centres_px: np.ndarray
    diameter_um: np.ndarray
    targets: np.ndarray
    name: str = ""
    square: np.ndarray | bool = False

    def __post_init__(self):
        self.slide_path = Path(self.slide_path)
        self.centres_px = np.asarray(self.centres_px, dtype=np.float64).reshape(-1, 2)
        n = len(self.centres_px)
        self.diameter_um = np.broadcast_to(np.asarray(self.diameter_um, np.float64), (n,)).copy()
        self.targets = np.ascontiguousarray(self.targets, dtype=np.float32)
        self.square = np.broadcast_to(np.asarray(self.square, bool), (n,)).copy()
        if self.targets.ndim != 2 or len(self.targets) != n:
            raise ValueError(f"targets must be ({n}, genes), got {self.targets.shape}")
        if not (np.isfinite(self.centres_px).all() and (self.diameter_um > 0).all()):
            raise ValueError(f"{self.name or self.slide_path}: spot centres must be finite and "
                             "diameters positive")
        self.name = self.name or self.slide_path.name

    def subset(self, keep: np.ndarray) -> SlideSpots:
        return SlideSpots(self.slide_path, self.centres_px[keep], self.diameter_um[keep],
                          self.targets[keep], self.name, self.square[keep])

    def concat(self, other: SlideSpots) -> SlideSpots:
        """These spots and ``other``'s (same slide, e.g. the same tissue measured with another
        spot or bin size), each keeping its own diameter."""
        if other.slide_path != self.slide_path:
            raise ValueError(f"{other.name}: spots of {other.slide_path} cannot join spots of "
                             f"{self.slide_path}")
        return SlideSpots(self.slide_path, np.concatenate([self.centres_px, other.centres_px]),
                          np.concatenate([self.diameter_um, other.diameter_um]),
                          np.concatenate([self.targets, other.targets]), self.name,
                          np.concatenate([self.square, other.square]))


def dihedral_points(xy: np.ndarray, k: int, side: float) -> np.ndarray:
    """Map (x, y) points of a ``side`` x ``side`` square (continuous coordinates, pixel j
    covering [j, j + 1)) the way :func:`histomap.data.spot_patches.dihedral` maps the image: ``k %
    4`` quarter turns of ``torch.rot90`` (x, y) -> (y, side - x), then a left-right flip
    x -> side - x when ``k >= 4``."""
    out = np.array(xy, dtype=np.float64, copy=True)
    for _ in range(k % 4):
        out = np.stack([out[..., 1], side - out[..., 0]], axis=-1)
    if k >= 4:
        out[..., 0] = side - out[..., 0]
    return out


# --------------------------------------------------------------------------- image blocks
class _BlockCache:
    """The slide at ``input_mpp`` around the anchors, as uint8 blocks read once.

    Pixel (i, j) of the global input grid covers level-0 [j s, (j + 1) s) x [i s, (i + 1) s),
    s = input_mpp / slide_mpp; only blocks any training window can reach are read, so memory
    follows the spotted area, not the slide.
    """

    def __init__(self, slide_path: Path, px0_per_input: float, boxes: np.ndarray,
                 block_px: int = BLOCK_PX):
        self.block = block_px
        keys = set()
        for x0, y0, x1, y1 in boxes:  # input-pixel boxes [x0, x1) x [y0, y1)
            for by in range(int(y0 // block_px), int((y1 - 1) // block_px) + 1):
                for bx in range(int(x0 // block_px), int((x1 - 1) // block_px) + 1):
                    keys.add((by, bx))
        self.index = {key: i for i, key in enumerate(sorted(keys))}
        self.blocks = np.empty((len(keys), block_px, block_px, 3), dtype=np.uint8)
        side0 = block_px * px0_per_input
        with open_slide(slide_path) as slide:
            for (by, bx), i in tqdm(self.index.items(), desc="window blocks", unit="block",
                                    disable=None, leave=False):
                self.blocks[i] = read_region(slide, bx * side0, by * side0, side0, side0,
                                             block_px, block_px)

    def crop(self, x0: int, y0: int, side: int) -> np.ndarray:
        """(side, side, 3) uint8 of global input pixels [x0, x0 + side) x [y0, y0 + side)."""
        out = np.full((side, side, 3), 255, dtype=np.uint8)
        b = self.block
        for by in range(y0 // b, (y0 + side - 1) // b + 1):
            for bx in range(x0 // b, (x0 + side - 1) // b + 1):
                i = self.index.get((by, bx))
                if i is None:
                    continue
                ys, xs = max(y0, by * b), max(x0, bx * b)
                ye, xe = min(y0 + side, (by + 1) * b), min(x0 + side, (bx + 1) * b)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = \
                    self.blocks[i, ys - by * b:ye - by * b, xs - bx * b:xe - bx * b]
        return out

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


# --------------------------------------------------------------------------- dataset
class WindowDataset(Dataset):
    """Training windows: an image window and the spot discs lying wholly inside it.

    One window per anchor spot (every spot, or one per ``anchor_stride_um`` cell), centred on
    it; with ``augment`` the window is shifted by a uniform integer jitter that keeps the anchor's
    disc inside (capped by ``jitter_um``) and one of the 8 dihedral transforms is applied to the
    image and the disc centres together. Images are cached once as uint8 blocks.

    Items are dicts: ``image`` uint8 (3, w, w) (RGB; divide by 255 for PixNet), ``centres``
    float32 (max_spots, 2) disc centres (x, y) in dense-map pixels of the window (map pixel =
    ``out_stride`` input pixels), ``radii`` float32 (max_spots,) in map pixels, ``valid`` bool
    (max_spots,), ``targets`` float32 (max_spots, genes). Padding entries are invalid zeros.
    ``max_spots`` (default: the most spots any window can hold) is the same for every item;
    pass the same value to datasets that are batched together.
    """

    def __init__(self, slides: Sequence[SlideSpots], *, window_px: int, input_mpp: float,
                 out_stride: int, augment: bool = False, jitter_um: float | None = None,
                 anchor_stride_um: float | None = None, max_spots: int | None = None,
                 block_px: int = BLOCK_PX, read_images: bool = True):
        if window_px < 1 or window_px % out_stride:
            raise ValueError(f"window_px ({window_px}) must be a positive multiple of "
                             f"out_stride ({out_stride})")
        if input_mpp <= 0:
            raise ValueError(f"input_mpp must be positive, got {input_mpp}")
        self.window_px, self.input_mpp, self.out_stride = int(window_px), float(input_mpp), \
            int(out_stride)
        self.augment = bool(augment)
        self.slides: list[SlideSpots] = []
        self._px0_per_input: list[float] = []
        self._slide_mpp: list[float] = []
        self._caches: list[_BlockCache | None] = []
        self.read_images = bool(read_images)  # False: windows of cached features instead
        self._neighbours: list[list[np.ndarray]] = []
        anchors: list[tuple[int, int, int]] = []  # (slide, spot, jitter px)
        n_genes = {s.targets.shape[1] for s in slides}
        if len(n_genes) > 1:
            raise ValueError(f"slides have different gene counts {sorted(n_genes)}")
        for spots in slides:
            if len(spots.centres_px) == 0:
                log.info("%s: no spots in this split; no windows", spots.name)
                continue
            s_idx = len(self.slides)
            found = self._add_slide(spots, s_idx, jitter_um, anchor_stride_um, block_px)
            anchors += found
        if not anchors:
            raise ValueError("no training window: every slide is empty or its spots are larger "
                             f"than the {window_px} px window")
        self.anchors = np.array(anchors, dtype=np.int64)
        self._starts = np.searchsorted(self.anchors[:, 0], np.arange(len(self.slides)))
        self.n_genes = n_genes.pop()
        bound = max(len(nb) for nbs in self._neighbours for nb in nbs)
        self.max_spots = bound if max_spots is None else int(max_spots)
        if self.max_spots < bound:
            log.warning("max_spots=%d is below the %d spots a window can hold: extra spots of a "
                        "window are left out (first by distance order kept)", self.max_spots,
                        bound)
        log.info("window dataset: %d windows of %d px at %.3g um/px on %d slide(s), up to %d "
                 "spots each, %.1f MB of cached image blocks", len(self.anchors), window_px,
                 input_mpp, len(self.slides), self.max_spots,
                 sum(c.nbytes for c in self._caches if c is not None) / 1e6)

    def _add_slide(self, spots: SlideSpots, s_idx: int, jitter_um: float | None,
                   anchor_stride_um: float | None, block_px: int) -> list[tuple[int, int, int]]:
        with open_slide(spots.slide_path) as slide:
            mpp0 = slide_mpp(slide, spots.slide_path)
        s0 = self.input_mpp / mpp0
        centres = spots.centres_px / s0                      # input pixels
        radius = spots.diameter_um / (2.0 * self.input_mpp)  # input pixels
        half = self.window_px / 2.0
        fits = radius <= half - 1.0
        if not fits.all():
            log.warning("%s: %d spots are too large for the %d px window (diameter > %.1f um) "
                        "and never used", spots.name, int((~fits).sum()), self.window_px,
                        (self.window_px - 2) * self.input_mpp)
        candidates = np.flatnonzero(fits)
        if anchor_stride_um:
            cells = np.floor(spots.centres_px[candidates] * mpp0 / anchor_stride_um)
            _, first = np.unique(cells, axis=0, return_index=True)
            candidates = candidates[np.sort(first)]
        jitter = np.floor(np.maximum(half - radius[candidates] - 1.0, 0.0)).astype(np.int64)
        if jitter_um is not None:
            jitter = np.minimum(jitter, int(jitter_um / self.input_mpp))
        if not self.augment:
            jitter[:] = 0
        # spots that can lie wholly inside some window of each anchor
        tree = cKDTree(centres)
        reach = half + jitter + 1.0
        neighbours = []
        for a, j in zip(candidates, reach):
            near = np.asarray(tree.query_ball_point(centres[a], r=j, p=np.inf), dtype=np.int64)
            near = near[fits[near]]
            order = np.argsort(np.abs(centres[near] - centres[a]).max(axis=1), kind="stable")
            neighbours.append(near[order])
        starts = np.round(centres[candidates] - half).astype(np.int64)
        boxes = np.column_stack([starts - jitter[:, None],
                                 starts + jitter[:, None] + self.window_px]).astype(np.int64)
        cache = _BlockCache(spots.slide_path, s0, boxes, block_px) if self.read_images else None
        self.slides.append(spots)
        self._px0_per_input.append(s0)
        self._slide_mpp.append(mpp0)
        self._caches.append(cache)
        self._neighbours.append(neighbours)
        log.info("%s: %d anchor windows over %d spots (jitter up to %d px)", spots.name,
                 len(candidates), len(centres), int(jitter.max()) if len(jitter) else 0)
        return [(s_idx, int(a), int(j)) for a, j in zip(candidates, jitter)]

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        jitter = int(self.anchors[i, 2])
        k, offset = 0, (0, 0)
        if self.augment:
            k = int(torch.randint(8, ()).item())
            if jitter > 0:
                offset = tuple(int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        return self.window(i, k=k, offset=offset)

    def window_origin(self, i: int, offset: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Global input-pixel (x, y) of the top-left of anchor ``i``'s window."""
        s_idx, a, _ = (int(v) for v in self.anchors[i])
        centre = self.slides[s_idx].centres_px[a] / self._px0_per_input[s_idx]
        start = np.round(centre - self.window_px / 2.0).astype(np.int64)
        return int(start[0] + offset[0]), int(start[1] + offset[1])

    def window(self, i: int, *, k: int = 0, offset: tuple[int, int] = (0, 0)
               ) -> dict[str, torch.Tensor]:
        """Anchor ``i``'s window shifted by ``offset`` input px, dihedral transform ``k``."""
        s_idx = int(self.anchors[i, 0])
        spots, s0 = self.slides[s_idx], self._px0_per_input[s_idx]
        x0, y0 = self.window_origin(i, offset)
        near = self._neighbours[s_idx][i - int(self._starts[s_idx])]
        side = self.window_px / self.out_stride
        centres, radii = discs_from_spots(spots.centres_px[near], spots.diameter_um[near],
                                          self._slide_mpp[s_idx], (x0 * s0, y0 * s0),
                                          self.input_mpp * self.out_stride)
        inside = ((centres - radii[:, None] >= -1e-6)
                  & (centres + radii[:, None] <= side + 1e-6)).all(axis=1)
        near, centres, radii = near[inside], centres[inside], radii[inside]
        if len(near) > self.max_spots:
            near, centres, radii = (near[:self.max_spots], centres[:self.max_spots],
                                    radii[:self.max_spots])
        centres = dihedral_points(centres, k, side)
        m = len(near)
        out_c = np.zeros((self.max_spots, 2), np.float32)
        out_r = np.zeros(self.max_spots, np.float32)
        out_s = np.zeros(self.max_spots, bool)
        out_t = np.zeros((self.max_spots, self.n_genes), np.float32)
        valid = np.zeros(self.max_spots, bool)
        out_c[:m], out_r[:m], out_t[:m], valid[:m] = centres, radii, spots.targets[near], True
        out_s[:m] = spots.square[near]
        item = {"centres": torch.from_numpy(out_c), "radii": torch.from_numpy(out_r),
                "valid": torch.from_numpy(valid), "square": torch.from_numpy(out_s),
                "targets": torch.from_numpy(out_t)}
        if self._caches[s_idx] is not None:
            image = self._caches[s_idx].crop(x0, y0, self.window_px)
            item["image"] = dihedral(torch.from_numpy(image).permute(2, 0, 1), k)
        return item

    @property
    def targets(self) -> np.ndarray:
        """Targets of every spot of every slide (for the output-bias initialisation)."""
        return np.concatenate([s.targets for s in self.slides])


# --------------------------------------------------------------------------- loss
def make_loss_fn(mode: str = "joint", pcc_weight: float = 0.5, mse_weight: float = 1.0
                 ) -> Callable[..., torch.Tensor]:
    """PixNet's loss on (pred, target, valid) spots: joint (MSE + pcc_weight (1 - PCC)), mse
    or pcc."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    return functools.partial(pixnet_loss, mode=mode, pcc_weight=float(pcc_weight),
                             mse_weight=float(mse_weight))


def pixnet_batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                      device: torch.device, loss_fn: Callable[..., torch.Tensor] | None
                      ) -> torch.Tensor:
    """``fit``'s batch_to_loss for :class:`WindowDataset` batches: disc means of the dense map
    (``forward_spots`` mode "mean") against the spot targets; ``loss_fn(pred, target, valid)``
    defaults to the joint loss."""
    batch = to_device(batch, device)
    images = batch["image"].float().div_(255.0)
    _, pred = model.forward_spots(images, batch["centres"], batch["radii"], mode="mean",
                                  valid=batch["valid"], square=batch.get("square"))
    loss_fn = loss_fn or make_loss_fn()
    return loss_fn(pred, batch["targets"], batch["valid"])


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
    spots = ad.read_h5ad(st_path)
    _check_mpp(spots, Path(slide_path), st_path)
    diameter = (spots.obs["diameter_um"].to_numpy(dtype=np.float64)
                if "diameter_um" in spots.obs else geometry(spots)["spot_diameter_um"])
    return SlideSpots(Path(slide_path), np.asarray(spots.obsm["spatial"]), diameter,
                      expression_matrix(spots, genes, path=st_path), Path(st_path).stem,
                      square_mask(spots)), spots


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

    torch.manual_seed(seed)
    model = build_model(model_name, len(genes), pretrained_checkpoint=task.get("checkpoint"),
                        **pixnet_cfg)
    window = {"window_px": task["window_px"], "input_mpp": task["input_mpp"],
              "out_stride": model.out_stride}
    batch_loss = pixnet_batch_loss
    if feature_caches:
        from histomap.tasks.feature_cache import cached_datasets, cached_dense_batch_loss
        train_ds, val_ds = cached_datasets(model, feature_caches, train_parts, val_parts,
                                           checkpoint=task.get("checkpoint"),
                                           jitter_um=task.get("jitter_um"),
                                           anchor_stride_um=task.get("anchor_stride_um"),
                                           **window)
        batch_loss = cached_dense_batch_loss
    else:
        train_ds = WindowDataset(train_parts, augment=True, jitter_um=task.get("jitter_um"),
                                 anchor_stride_um=task.get("anchor_stride_um"), **window)
        val_ds = None
        if any(len(p.centres_px) for p in val_parts):
            val_ds = WindowDataset(val_parts, augment=False,
                                   anchor_stride_um=task.get("anchor_stride_um"), **window)
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


def _outside_tiles(centres_px: np.ndarray, tiles: pd.DataFrame) -> np.ndarray:
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
                  band_tile_rows: int | None = 1, cover_um: float | None = None,
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
    tiles = pd.read_parquet(tiles_parquet)
    if tiles.empty:
        raise InputError(tiles_parquet, "tile index has no tissue tile")
    to_cover = []
    if spots_h5ad is not None:
        spots = ad.read_h5ad(spots_h5ad)
        mpp0 = _check_mpp(spots, slide_path, spots_h5ad)
        xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        to_cover = [(spots_h5ad, xy, float(cover_um))] if cover_um else []
    else:
        with open_slide(slide_path) as slide:
            mpp0 = slide_mpp(slide, slide_path)
    to_cover += [(path, np.asarray(ad.read_h5ad(path).obsm["spatial"], np.float64), float(um))
                 for path, um in cover]
    boxes = [tiles[["x0_px", "y0_px", "size_px0"]]]
    for path, centres, um in to_cover:
        outside = _outside_tiles(centres, tiles) if len(centres) else np.zeros(0, bool)
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
    spots = ad.read_h5ad(spots_h5ad)
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
