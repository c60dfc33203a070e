"""Super-resolution task (Diff-ST and its baselines): SR pairs -> model -> HR maps.

The ``train_*`` / ``predict_*`` super-resolution rules' work; the pairs come from
:mod:`histomap.data.srpairs`, the maps are scored by :mod:`histomap.evaluation.metrics`
(``evaluate_sr``) and tabled by :mod:`histomap.evaluation.report` (``sr_tables``). Every method sees the same inputs from an SR-pairs zarr
(:mod:`histomap.data.srpairs`): the LR map upsampled onto the HR grid (``lr_up``), the LR map itself,
the H&E patch and the tissue mask, the LR map in the HR map's units; every method predicts the
HR map in the truth's units (log1p pairs: re-expressed with the target sum of the model's
training pairs, kept in ``model.pt`` as ``pairs.target_sum``), and predictions are also
de-normalised to counts with prediction-time statistics only
(:func:`histomap.data.srpairs.prediction_denormaliser`: the LR patch, the training target sum).

Methods (``method``):

* ``"diffst"`` (:class:`~histomap.models.diffst.DiffST`) and ``"guided"`` (its guided-diffusion
  baseline :class:`~histomap.models.diffst.ConditionalUNet`): conditional DDPMs trained with
  :meth:`GaussianDiffusion.p_losses` on tissue pixels (T = 1000 by default); Diff-ST adds its
  disentangling loss (returned by the model, already weighted), gets its CIGC gene graph once from
  the training HR maps (:func:`training_adjacency`) and its entropy curriculum per epoch
  (:class:`~histomap.models.diffst.CurriculumSchedule`; the scheduled and the observed kept
  sub-patch fractions are logged and written to the training log). Maps are moved to [-1, 1]
  for the diffusion (:class:`ValueRange`).
* every baseline of :mod:`histomap.models.srnets` (``bicubic``, ``unet``, ``unetpp``,
  ``attention_unet``, ``histogene_sr``, ``tesla``): ``forward(lr_up, image, lr=None) -> hr``;
  trainable ones are fitted with MSE on tissue pixels, the others (``.trainable`` False) are
  saved with their configuration only.

Training uses the shared loop :func:`histomap.train.fit` (checkpoints, resume, early stopping,
AMP). Validation patches are a spatially separated share of the TRAINING samples' patches
(:func:`split_patches`); the test fold is never seen.

Files:

* ``model.pt`` (:func:`save_sr_model`): dict(format, method, variant, model_config, genes,
  state_dict, trainable, diffusion, value_range, task, pairs, train, validation, summary,
  adjacency) loadable with ``torch.load(weights_only=True)``; :func:`load_sr_model`.
* maps zarr (:func:`predict_sr`, format :data:`histomap.data.srmaps.MAPS_FORMAT`): per patch ``pred`` (G, h, w)
  normalised mean, ``pred_counts``, for diffusion methods ``pred_std`` / ``pred_std_counts``
  (per-pixel std over K samples, ddof 0), plus ``mask``, ``origin_px``, ``origin_um``,
  ``grid_index`` copied from the pairs; attrs = the pair geometry + how it was predicted
  (method, sampler, steps, K, seed, ``device``, ``batch_chains``, ``autocast``, ``threads``).
* HR-bin AnnData (:func:`predict_sr`): one row per HR pixel inside the mask of every patch
  (overlapping patches give one row each); ``obsm["spatial"]`` bin centres in level-0 px; X =
  predicted counts; layers ``pred`` and ``truth`` (normalised), ``truth_counts``, and for diffusion
  ``pred_std``, ``pred_std_counts``.

Applied to a sample with LR ST and H&E but no HR truth (``apply.superres``):
:func:`lr_inputs_for_model` makes the sample's measured spots the LR-only inputs of a model
(:func:`histomap.data.srpairs.build_lr_pairs`, in the model's layout and units), and
:func:`predict_sr` writes the same maps zarr and HR-bin AnnData without truth layers
(``uns["superres"]["truth"]`` False).

Units: ``pred`` and layer ``truth`` are in the model's units (attrs ``normalisation``,
``target_sum``); ``pred_counts`` come from the prediction and the LR patch alone (no statistic of
the HR truth), ``truth_counts`` are the measured HR counts.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr

from histomap import __version__
from histomap.data.scanpy_spatial import add_scanpy_spatial
from histomap.data.srmaps import MAPS_FORMAT
from histomap.data.srpairs import (
    SRPairDataset,
    build_lr_pairs,
    has_truth,
    pairs_denormaliser,
    prediction_denormaliser,
    read_sr_pairs,
    retarget_log1p,
    training_target_sum,
)
from histomap.errors import InputError
from histomap.logs import Progress
from histomap.evaluation.folds import validation_split
from histomap.evaluation.metrics import patch_gene_metrics, summarise_sr
from histomap.outputs import partial_path, remove_path

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from histomap.models.diffst import CurriculumSchedule, DiffST
    from histomap.models.diffusion import GaussianDiffusion

log = logging.getLogger(__name__)

SR_MODEL_FORMAT = "histomap.srmodel/1"
# diffusion denoisers by method name -> class name in histomap.models.diffst
DIFFUSION_METHODS = {"diffst": "DiffST", "guided": "ConditionalUNet"}
# options of a method's config handled here, not by the network constructor
TASK_KEYS = ("curriculum", "upsample", "adjacency_max_pixels", "adjacency_binarize")
DEFAULT_DIFFUSION = {"T": 1000, "schedule": "linear", "loss": "mse", "prediction": "eps",
                     "target": "x0"}
EXTRA_LOG_COLUMNS = ("keep_fraction", "kept_observed", "denoise", "dis")
# sampling defaults measured by benchmarks/cpu_bf16.py and benchmarks/whole_slide.py
# (benchmarks/README.md): bf16 autocast on the CPU (``cpu_bf16: auto``) and the K chains of a
# batch as one batch on the CPU (``batch_chains: auto``; always on CUDA)
SR_CPU_BF16_DEFAULT = False
SR_BATCH_CHAINS_CPU = True


# ============================================================================ methods
# torch and the networks are imported where they are used, so pairs, metrics and tables (light
# jobs) start without loading torch.
def _torch():
    from histomap.compat import torch

    return torch


def _diffst():
    from histomap.models import diffst

    return diffst


def _gaussian_diffusion(cfg: Mapping, clip_x0: tuple[float, float] | None = None
                        ) -> GaussianDiffusion:
    """The diffusion process of a ``superres.diffusion`` config (merged over the defaults)."""
    from histomap.models.diffusion import GaussianDiffusion

    return GaussianDiffusion(T=int(cfg["T"]), schedule=cfg["schedule"], loss=cfg["loss"],
                             prediction=cfg["prediction"], clip_x0=clip_x0)


def _baselines():
    """The non-diffusion baselines module (imported lazily; it is written separately)."""
    from histomap.models import srnets

    return srnets


def known_methods() -> list[str]:
    return [*DIFFUSION_METHODS, *_baselines().SR_BASELINES]


def is_diffusion(method: str) -> bool:
    return method in DIFFUSION_METHODS


def split_task_options(model_cfg: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """(task options, network keyword arguments) of a method's config."""
    cfg = dict(model_cfg or {})
    task = {k: cfg.pop(k) for k in TASK_KEYS if k in cfg}
    task.setdefault("upsample", "bicubic")
    return task, cfg


def build_sr_model(method: str, n_genes: int, model_cfg: Mapping[str, Any] | None = None
                   ) -> nn.Module:
    """The network of ``method`` for ``n_genes`` genes from its keyword configuration."""
    cfg = dict(model_cfg or {})
    cfg.pop("n_genes", None)
    if method in DIFFUSION_METHODS:
        return getattr(_diffst(), DIFFUSION_METHODS[method])(n_genes, **cfg)
    srnets = _baselines()
    if method not in srnets.SR_BASELINES:
        raise ValueError(f"unknown super-resolution method {method!r}; known: "
                         f"{sorted([*DIFFUSION_METHODS, *srnets.SR_BASELINES])}")
    return srnets.build_sr_baseline(method, n_genes, **cfg)


def is_trainable(method: str, model: nn.Module) -> bool:
    if is_diffusion(method):
        return True
    return bool(getattr(model, "trainable", True)) and any(True for _ in model.parameters())


@dataclass(frozen=True)
class ValueRange:
    """Affine map between normalised maps [lo, hi] and the diffusion's [-1, 1].

    ``bounded``: the data cannot exceed ``hi`` (min-max maps), so sampled x_0 are clipped to
    [-1, 1]; otherwise (log1p, raw) only the lower bound (zero expression) is clipped."""

    lo: float = 0.0
    hi: float = 1.0
    bounded: bool = True

    def to_model(self, values):
        return (values - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0

    def from_model(self, x):
        return (x + 1.0) * ((self.hi - self.lo) / 2.0) + self.lo

    @property
    def clip(self) -> tuple[float, float | None]:
        return (-1.0, 1.0) if self.bounded else (-1.0, None)

    def as_list(self) -> list:
        return [float(self.lo), float(self.hi), bool(self.bounded)]


@dataclass(frozen=True)
class DiffusionTarget:
    """What the diffusion generates, in the model's [-1, 1] units (``diffusion.target``).

    ``"x0"`` (the paper): the HR map itself. ``"residual"`` (as SRDiff / ResShift do for image
    super-resolution): half the difference between the HR map and the LR map upsampled onto the
    HR grid, so the chain only has to add the detail the LR map lacks; the HR map is then
    ``2 x + lr_up``. Both condition the denoiser on the same LR map and H&E patch.
    """

    kind: str = "x0"

    def __post_init__(self):
        if self.kind not in ("x0", "residual"):
            raise ValueError(f"diffusion target must be 'x0' or 'residual', got {self.kind!r}")

    def encode(self, hr, lr_up):
        return hr if self.kind == "x0" else (hr - lr_up) / 2.0

    def decode(self, x, lr_up):
        return x if self.kind == "x0" else 2.0 * x + lr_up

    def clip(self, vrange: ValueRange) -> tuple[float, float | None]:
        """Range the sampler clips each x_0 estimate to. The HR map: the value range's clip. A
        residual: [-1, 1], half the difference of two maps inside the training range [-1, 1]
        (for unbounded units too, where the HR map has no upper clip). Without a clip, the x_0
        estimates of eps-prediction at large t (the noise divided by sqrt(alpha_bar_t), which
        is about 0.006 at t = T) are unbounded and the chain diverges."""
        if self.kind == "x0":
            return vrange.clip
        return (-1.0, 1.0)


# ============================================================================ pairs, splits
def pairs_attrs(pairs_zarrs: Sequence[str | Path]) -> dict[str, Any]:
    """Attrs of the first zarr after checking that all agree on genes, grids and units."""
    if not pairs_zarrs:
        raise ValueError("no SR pairs given")
    first = None
    for path in pairs_zarrs:
        _, attrs = read_sr_pairs(path, lazy=True)
        if first is None:
            first, first_path = attrs, path
            continue
        for key in ("genes", "scale", "hr_shape", "lr_shape", "normalisation", "source"):
            if attrs.get(key) != first.get(key):
                raise InputError(path, f"SR pairs disagree with {first_path} on {key!r}: "
                                       f"{attrs.get(key)!r} vs {first.get(key)!r}")
    return dict(first)


def split_patches(pairs_zarrs: Sequence[str | Path], *, fraction: float, block_um: float,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) patch indices of each training zarr.

    Validation patches are whole spatial blocks (:func:`histomap.evaluation.folds.validation_split` on the
    patch origins, blocks at least one patch wide); training patches overlapping a validation
    patch are dropped (logged), so validation tissue is never seen in training.
    """
    splits = []
    for k, path in enumerate(pairs_zarrs):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        origin = np.asarray(arrays["origin_um"][...], np.float64).reshape(-1, 2)
        n = len(origin)
        side = np.array([float(attrs["patch_um"]),
                         float(attrs.get("hr_um_row", attrs["hr_um"])) * attrs["hr_shape"][0]])
        val = validation_split(origin, fraction=float(fraction),
                               block_px=max(float(block_um), float(side.max())), seed=seed + k)
        overlaps = np.zeros(n, bool)
        if val.any():
            d = np.abs(origin[:, None, :] - origin[None, val, :])
            overlaps = ((d < side[None, None, :] - 1e-6).all(axis=2)).any(axis=1) & ~val
        train = ~val & ~overlaps
        if not train.any():
            log.warning("%s: validation would leave no training patch; all %d patches train", path,
                        n)
            train, val, overlaps = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        log.info("%s: %d training, %d validation patches (blocks of %g um); %d patches "
                 "overlapping validation tissue dropped", Path(path).name, int(train.sum()),
                 int(val.sum()), max(float(block_um), float(side.max())), int(overlaps.sum()))
        splits.append((np.flatnonzero(train), np.flatnonzero(val)))
    return splits


def common_image_hw(pairs_zarrs: Sequence[str | Path]) -> tuple[int, int]:
    """One H&E patch size for pairs of several sections: the most common one (spot-grid
    sections differ by a pixel or two with their measured spot pitch)."""
    sizes = [tuple(int(v) for v in read_sr_pairs(p, lazy=True)[0]["he"].shape[-2:])
             for p in pairs_zarrs]
    common = max(sorted(set(sizes)), key=sizes.count)
    if len(set(sizes)) > 1:
        log.info("H&E patches of %s px are resized to %s px to stack in batches",
                 sorted(set(sizes)), common)
    return common


def _datasets(pairs_zarrs, splits, upsample: str, image_hw: tuple[int, int],
              target_sum: float | None = None,
              augment: bool = False) -> tuple[Dataset, Dataset | None]:
    from torch.utils.data import ConcatDataset

    train = [SRPairDataset(p, upsample=upsample, indices=tr, image_hw=image_hw,
                           target_sum=target_sum, augment=augment)
             for p, (tr, _) in zip(pairs_zarrs, splits) if len(tr)]
    val = [SRPairDataset(p, upsample=upsample, indices=va, image_hw=image_hw,
                         target_sum=target_sum)
           for p, (_, va) in zip(pairs_zarrs, splits) if len(va)]
    if not train:
        raise ValueError("no training patch in the given SR pairs")
    return ConcatDataset(train), (ConcatDataset(val) if val else None)


def training_pixels(pairs_zarrs: Sequence[str | Path], indices: Sequence[np.ndarray], *,
                    max_pixels: int = 50_000, seed: int = 0,
                    target_sum: float | None = None) -> np.ndarray:
    """(n, G) normalised HR values of tissue pixels of the given patches, at most
    ``max_pixels`` rows (an equal random share per patch, logged when subsampled)."""
    rng = np.random.default_rng(seed)
    n_patches = sum(len(i) for i in indices)
    if n_patches == 0:
        raise ValueError("no training patch to compute the gene graph from")
    per_patch = max(1, math.ceil(max_pixels / n_patches))
    rows, total = [], 0
    for path, idx in zip(pairs_zarrs, indices):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        for i in idx:
            hr = _model_units(np.asarray(arrays["hr"][int(i)], np.float64), attrs, target_sum)
            mask = np.asarray(arrays["mask"][int(i)], bool)
            values = hr[:, mask].T
            total += len(values)
            if len(values) > per_patch:
                values = values[rng.choice(len(values), per_patch, replace=False)]
            rows.append(values)
    out = np.concatenate(rows) if rows else np.zeros((0, 0))
    if len(out) < total:
        log.info("gene graph: %d of %d training tissue pixels sampled", len(out), total)
    return out


def training_adjacency(pairs_zarrs: Sequence[str | Path], indices: Sequence[np.ndarray], *,
                       max_pixels: int = 50_000, binarize: bool = False, seed: int = 0,
                       target_sum: float | None = None) -> np.ndarray:
    """Raw CIGC co-expression adjacency (G, G) from the training patches' HR tissue pixels."""
    pixels = training_pixels(pairs_zarrs, indices, max_pixels=max_pixels, seed=seed,
                             target_sum=target_sum)
    adj = _diffst().coexpression_adjacency(np.clip(pixels, 0.0, None), binarize=binarize)
    log.info("CIGC gene graph from %d training pixels of %d patches: mean off-diagonal "
             "co-expression %.3f", len(pixels), sum(len(i) for i in indices),
             float((adj.sum() - np.trace(adj)) / max(1, adj.size - len(adj))))
    return adj


def _model_units(values: np.ndarray, attrs: Mapping, target_sum: float | None) -> np.ndarray:
    """Stored pair values in a model's units (log1p: its training target sum)."""
    if attrs["normalisation"] != "log1p" or target_sum is None:
        return values
    return retarget_log1p(values, float(attrs["hr_target_sum"]), float(target_sum))


def value_range(normalisation: str, pairs_zarrs, indices, target_sum: float | None = None
                ) -> ValueRange:
    """[-1, 1] mapping of the pairs' units: [0, 1] for min-max, else [0, max training value]."""
    if normalisation == "minmax":
        return ValueRange(0.0, 1.0, True)
    hi = 0.0
    for path, idx in zip(pairs_zarrs, indices):
        arrays, attrs = read_sr_pairs(path, lazy=True)
        for i in idx:
            top = np.asarray([np.max(arrays["hr"][int(i)], initial=0.0)], np.float64)
            hi = max(hi, float(_model_units(top, attrs, target_sum)[0]))
    return ValueRange(0.0, hi if hi > 0 else 1.0, False)


def curriculum_schedule(spec: Mapping[str, Any] | None, epochs: int, model: DiffST
                        ) -> CurriculumSchedule:
    """The per-epoch curriculum: ``spec`` = dict(at = milestones as fractions of the epochs,
    values = kept fractions (mode "fraction", default 0.25, 0.5, 1.0) or entropy thresholds
    (mode "threshold", required), mode = the model's ``curriculum_mode``)."""
    spec = dict(spec or {})
    mode = spec.pop("mode", model.cfg.curriculum_mode)
    if mode != model.cfg.curriculum_mode:
        raise ValueError(f"curriculum mode {mode!r} differs from the model's curriculum_mode "
                         f"{model.cfg.curriculum_mode!r}")
    at = tuple(spec.pop("at", (0.0, 1 / 3, 2 / 3)))
    if "values" not in spec and mode == "threshold":
        raise ValueError("a threshold curriculum needs its entropy thresholds as 'values'")
    values = tuple(spec.pop("values", (0.25, 0.5, 1.0)))
    if spec:
        raise ValueError(f"unknown curriculum option(s) {sorted(spec)}; known: at, values, mode")
    return _diffst().CurriculumSchedule.over_training(epochs, at, values, mode)


# ============================================================================ objectives
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the tissue pixels (mask (B, H, W)) of every gene."""
    w = mask[:, None].to(pred.dtype).expand_as(pred)
    return ((pred.float() - target.float()).pow(2) * w).sum() / w.sum().clamp_min(1.0)


def baseline_batch_loss(model: nn.Module, batch: Mapping, device: torch.device,
                        loss_fn=None) -> torch.Tensor:
    """``fit``'s batch_to_loss of the baselines: masked MSE of ``model(lr_up, image, lr)``."""
    from histomap.train import to_device

    batch = to_device(batch, device)
    pred = model(batch["lr_up"], batch["image"], lr=batch["lr"])
    return masked_mse(pred, batch["hr"], batch["mask"])


class DiffusionObjective:
    """``fit``'s batch_to_loss and on_epoch_end for the diffusion methods.

    Before every batch the curriculum of the current epoch is applied (so a resumed run gets the
    right stage); validation batches draw t and noise from a generator seeded by their patch
    indices, so the validation loss is comparable between epochs. Per epoch it records the
    scheduled and the observed kept sub-patch fraction and the loss terms. Validation losses
    (model in eval mode) are computed with every sub-patch at every curriculum stage, so the
    checkpoint is chosen by the loss of the model as it predicts.
    """

    def __init__(self, diffusion: GaussianDiffusion, vrange: ValueRange, *,
                 schedule: CurriculumSchedule | None, seed: int, start_epoch: int = 0,
                 extras_path: Path | None = None,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 target: DiffusionTarget = DiffusionTarget()) -> None:
        self.diffusion, self.vrange, self.schedule = diffusion, vrange, schedule
        self.target = target
        self.seed, self.epoch = int(seed), int(start_epoch)
        self.extras_path, self.user_hook = extras_path, on_epoch_end
        self.rows: list[dict] = _read_extras(extras_path, start_epoch)
        self._reset()

    def _reset(self) -> None:
        self.sums = {"denoise": 0.0, "dis": 0.0, "kept": 0.0}
        self.counts = {"denoise": 0, "dis": 0, "kept": 0}

    def scheduled(self) -> float | None:
        return self.schedule.fraction(self.epoch) if self.schedule is not None else None

    def __call__(self, model: nn.Module, batch: Mapping, device: torch.device,
                 loss_fn=None) -> torch.Tensor:
        from histomap.train import to_device

        # the curriculum selects sub-patches in training mode only: validation batches (eval
        # mode) use every sub-patch at every stage, as inference does
        if self.schedule is not None:
            self.schedule.apply(model, self.epoch)
        batch = to_device(batch, device)
        lr_up = self.vrange.to_model(batch["lr_up"].float())
        x0 = self.target.encode(self.vrange.to_model(batch["hr"].float()), lr_up)
        cond = {"lr_map": lr_up, "image": batch["image"]}
        generator = None
        if not model.training:
            key = int(batch["index"].sum()) + 7919 * int(batch["index"][0])
            generator = _torch().Generator().manual_seed(self.seed * 1_000_003 + key)
        losses = self.diffusion.p_losses(model, x0, cond, mask=batch["mask"][:, None],
                                         generator=generator)
        if model.training:
            self._add("denoise", losses["denoise"])
            if "dis" in losses:
                self._add("dis", losses["dis"])
            kept = getattr(model, "last_cell_mask", None)
            if kept is not None:
                self._add("kept", kept.float().mean())
        return losses["loss"]

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] += float(value.detach())
        self.counts[key] += 1

    def _mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts[key] else math.nan

    def on_epoch_end(self, row: dict) -> None:
        scheduled = self.scheduled()
        extra = {"epoch": int(row["epoch"]),
                 "keep_fraction": math.nan if scheduled is None else scheduled,
                 "kept_observed": self._mean("kept"), "denoise": self._mean("denoise"),
                 "dis": self._mean("dis")}
        self.rows.append(extra)
        if self.schedule is not None:
            log.info("epoch %d: curriculum %s %.3g, observed kept sub-patch fraction %.3f; "
                     "denoise loss %.4g, disentangling loss %.4g", extra["epoch"],
                     self.schedule.mode, scheduled, extra["kept_observed"], extra["denoise"],
                     extra["dis"])
        else:
            log.info("epoch %d: denoise loss %.4g", extra["epoch"], extra["denoise"])
        if self.extras_path is not None:
            _write_csv(self.rows, self.extras_path, ("epoch", *EXTRA_LOG_COLUMNS))
        self.epoch = int(row["epoch"])
        self._reset()
        if self.user_hook is not None:
            self.user_hook({**row, **extra})


def _read_extras(path: Path | None, epochs_done: int) -> list[dict]:
    if path is None or not path.is_file() or epochs_done == 0:
        return []
    rows = pd.read_csv(path).to_dict("records")
    return [r for r in rows if int(r["epoch"]) <= epochs_done]


def _write_csv(rows: Sequence[Mapping], path: Path, columns: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _epochs_done(checkpoint_dir: Path) -> int:
    last = checkpoint_dir / "last.pt"
    if not last.is_file():
        return 0
    try:
        return int(_torch().load(last, map_location="cpu", weights_only=True)["epochs_done"])
    except Exception:  # noqa: BLE001 - fit reports an unreadable checkpoint itself
        return 0


# ============================================================================ model.pt
def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_sr_model(path: str | Path, model: nn.Module, *, method: str, genes: Sequence[str],
                  trainable: bool, **meta: Any) -> Path:
    """Write ``model.pt`` atomically (see the module docstring)."""
    from histomap.train import atomic_save

    torch = _torch()
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"method {method!r}: the model has no .config to rebuild it from")
    payload = {"format": SR_MODEL_FORMAT, "method": method, "model_config": dict(config),
               "genes": [str(g) for g in genes], "trainable": bool(trainable),
               "state_dict": _cpu_state(model) if trainable else {},
               "histomap_version": __version__, "torch_version": str(torch.__version__),
               **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(payload, path)


def _read_sr_payload(path: Path) -> dict:
    """The checked contents of an SR ``model.pt`` (weights included)."""
    from histomap.train import read_model_payload

    return read_model_payload(path, SR_MODEL_FORMAT, "histomap SR model",
                              missing="model file does not exist (run the train_diffst or "
                                      "train_sr_baseline rule)")


def load_sr_model(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, metadata without the state dict) of a ``model.pt``."""
    from histomap.train import resolve_device

    path = Path(path)
    payload = _read_sr_payload(path)
    config = dict(payload["model_config"])
    if "pretrained_checkpoint" in config:  # model.pt holds every weight
        config["pretrained_checkpoint"] = None
    model = build_sr_model(payload["method"], len(payload["genes"]), config)
    if payload["trainable"]:
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise InputError(path, f"weights do not fit method {payload['method']!r}: {exc}"
                             ) from exc
    model.to(resolve_device(device)).eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


# ============================================================================ training
def train_sr(method: str, pairs_zarrs: Sequence[str | Path], *, model_cfg: Mapping | None,
             train_cfg: Mapping, validation: Mapping, seed: int, out_model: str | Path,
             out_log: str | Path, checkpoint_dir: str | Path,
             diffusion: Mapping | None = None, variant: str | None = None,
             on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train ``method`` on the training fold's SR pairs; write ``model.pt`` and the epoch log.

    ``model_cfg``: network keyword arguments plus task options (``curriculum``, ``upsample``,
    ``adjacency_max_pixels``, ``adjacency_binarize``); ``train_cfg``: :class:`TrainConfig`
    fields plus ``augment`` (random flips of the training patches, default off);
    ``validation``: dict(fraction, block_um) of the training patches held out for early
    stopping; ``diffusion``: dict(T, schedule, loss, prediction, target) for diffusion methods
    (missing keys from :data:`DEFAULT_DIFFUSION`); ``variant``: the configured name (e.g.
    ``diffst_no_cam``). Resumes from ``checkpoint_dir/last.pt``. The log has fit's columns plus
    ``keep_fraction`` (scheduled curriculum), ``kept_observed``, ``denoise`` and ``dis`` for
    diffusion methods.
    """
    from histomap.models.diffst import DiffST
    from histomap.train import TrainConfig, discard_stale_checkpoints, fit, training_fingerprint

    torch = _torch()
    pairs_zarrs = [Path(p) for p in pairs_zarrs]
    attrs = pairs_attrs(pairs_zarrs)
    genes = list(attrs["genes"])
    task, net_cfg = split_task_options(model_cfg)
    checkpoint_dir = Path(checkpoint_dir)
    torch.manual_seed(seed)
    model = build_sr_model(method, len(genes), net_cfg)
    trainable = is_trainable(method, model)
    pairs_meta = {k: attrs.get(k) for k in ("scale", "lr_um", "hr_um", "hr_shape", "lr_shape",
                                            "normalisation", "edge", "source", "patch_um")}
    pairs_meta["upsample"] = task["upsample"]
    pairs_meta["image_hw"] = list(common_image_hw(pairs_zarrs))  # H&E size the model saw
    # log1p units of this model: the target sum of its training pairs (never a test section's)
    target_sum = training_target_sum(pairs_zarrs)
    pairs_meta["target_sum"] = target_sum
    if target_sum is not None:
        log.info("log1p units: target sum %.4g (median HR-pixel library of the training pairs)",
                 target_sum)
    meta = {"variant": variant or method, "task": task, "pairs": pairs_meta,
            "train_pairs": [str(p) for p in pairs_zarrs]}
    if not trainable:
        save_sr_model(out_model, model, method=method, genes=genes, trainable=False,
                      diffusion={}, value_range=[], **meta)
        _write_csv([], Path(out_log), ("epoch", "train_loss", "val_loss", "lr", "seconds"))
        log.info("%s is not trainable: wrote its configuration to %s (no fit)", method,
                 out_model)
        return {"trainable": False}

    splits = split_patches(pairs_zarrs, fraction=float(validation.get("fraction", 0.15)),
                           block_um=float(validation.get("block_um", 0.0)), seed=seed)
    train_idx = [tr for tr, _ in splits]
    train_cfg = dict(train_cfg)
    augment = bool(train_cfg.pop("augment", False))
    train_ds, val_ds = _datasets(pairs_zarrs, splits, task["upsample"],
                                 tuple(pairs_meta["image_hw"]), target_sum, augment)
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    extra_meta: dict[str, Any] = {"diffusion": {}, "value_range": []}
    extras_path = checkpoint_dir / "sr_epochs.csv"
    fingerprint = training_fingerprint(pairs_zarrs, method=method, variant=variant,
                                       model_cfg=model_cfg, diffusion=diffusion,
                                       validation=validation, seed=seed, augment=augment)
    if is_diffusion(method):
        diff_cfg = {**DEFAULT_DIFFUSION, **dict(diffusion or {})}
        vrange = value_range(attrs["normalisation"], pairs_zarrs, train_idx, target_sum)
        diff = _gaussian_diffusion(diff_cfg)
        schedule = None
        if isinstance(model, DiffST):
            if model.cfg.cigc:
                adj = training_adjacency(pairs_zarrs, train_idx,
                                         max_pixels=int(task.get("adjacency_max_pixels", 50_000)),
                                         binarize=bool(task.get("adjacency_binarize", False)),
                                         seed=seed, target_sum=target_sum)
                model.set_adjacency(adj)
                extra_meta["adjacency"] = torch.as_tensor(adj, dtype=torch.float32)
            if model.cfg.hierarchical:
                schedule = curriculum_schedule(task.get("curriculum"), cfg.epochs, model)
                log.info("curriculum (%s): %s from epochs %s of %d", schedule.mode,
                         list(schedule.fractions),
                         [math.ceil(m - 1e-9) + 1 for m in schedule.milestones], cfg.epochs)
            else:
                log.info("hierarchical features off: no sub-patches, the curriculum is unused")
        # stale checkpoints go before their epoch count is read (a no-op again in fit)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        discard_stale_checkpoints(checkpoint_dir, model, cfg, fingerprint)
        objective = DiffusionObjective(diff, vrange, schedule=schedule, seed=seed,
                                       start_epoch=_epochs_done(checkpoint_dir),
                                       extras_path=extras_path, on_epoch_end=on_epoch_end,
                                       target=DiffusionTarget(diff_cfg["target"]))
        batch_to_loss, hook = objective, objective.on_epoch_end
        extra_meta["diffusion"] = diff_cfg
        extra_meta["value_range"] = vrange.as_list()
    else:
        batch_to_loss, hook = baseline_batch_loss, on_epoch_end
    summary = fit(model, train_ds, val_ds, loss_fn=None, out_dir=checkpoint_dir, cfg=cfg,
                  batch_to_loss=batch_to_loss, on_epoch_end=hook, fingerprint=fingerprint)
    if isinstance(model, DiffST) and model.cfg.hierarchical:
        # the curriculum is a training device: the saved model predicts (and was validated)
        # with every sub-patch, whatever stage its best epoch was trained at
        log.info("best epoch %d was trained at curriculum keep fraction %.3g, entropy threshold "
                 "%.3g; the saved model uses every sub-patch at inference", summary["best_epoch"],
                 float(model.keep_fraction), float(model.entropy_threshold))
        model.set_curriculum(keep_fraction=1.0, entropy_threshold=0.0)
    save_sr_model(out_model, model, method=method, genes=genes, trainable=True,
                  train={**cfg.to_dict(), "augment": augment}, validation=dict(validation),
                  summary={k: summary[k] for k in ("best_epoch", "best_val_loss",
                                                   "epochs_done", "stopped_early")},
                  **extra_meta, **meta)
    _write_train_log(checkpoint_dir, extras_path if is_diffusion(method) else None, out_log)
    return {**summary, "trainable": True}


def _write_train_log(checkpoint_dir: Path, extras_path: Path | None, out_log: str | Path) -> None:
    rows = pd.read_csv(checkpoint_dir / "train_log.csv")
    if extras_path is not None and extras_path.is_file():
        rows = rows.merge(pd.read_csv(extras_path), on="epoch", how="left")
    Path(out_log).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out_log) + ".partial")
    rows.to_csv(tmp, index=False)
    os.replace(tmp, out_log)


# ============================================================================ prediction
def _meta_range(meta: Mapping) -> ValueRange:
    values = meta.get("value_range") or []
    return ValueRange(*values) if values else ValueRange()


def _diffusion_target(meta: Mapping) -> DiffusionTarget:
    return DiffusionTarget({**DEFAULT_DIFFUSION, **dict(meta.get("diffusion") or {})}["target"])


def _model_dataset(meta: Mapping, pairs_zarr: str | Path,
                   indices: Sequence[int] | None = None) -> SRPairDataset:
    """The pairs as a trained model saw them: its LR upsampling and its H&E patch size."""
    return SRPairDataset(pairs_zarr, upsample=meta["pairs"].get("upsample", "bicubic"),
                         indices=indices, image_hw=meta["pairs"].get("image_hw"),
                         target_sum=meta["pairs"].get("target_sum"))


def _diffusion_of(meta: Mapping) -> GaussianDiffusion | None:
    if not is_diffusion(meta["method"]):
        return None
    return _gaussian_diffusion({**DEFAULT_DIFFUSION, **dict(meta.get("diffusion") or {})},
                               clip_x0=_diffusion_target(meta).clip(_meta_range(meta)))


def _repeat_batch(value: Any, k: int) -> Any:
    """``value`` with every tensor repeated ``k`` times along the batch (first) dimension: a
    tensor, a dict or dataclass (e.g. an encoded condition) of tensors; anything else as is."""
    import dataclasses

    torch = _torch()
    if isinstance(value, torch.Tensor):
        return value.repeat(k, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, Mapping):
        return {key: _repeat_batch(v, k) for key, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _repeat_batch(getattr(value, f.name), k)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def predict_chains(model: nn.Module, meta: Mapping, batch: Mapping, *, device: torch.device,
                   sampler: str = "respaced", steps: int | None = 20, n_samples: int = 1,
                   eta: float = 0.0, generator: torch.Generator | None = None,
                   diffusion: GaussianDiffusion | None = None, batch_chains: bool = False,
                   amp_type: torch.dtype | None = None) -> Iterator[np.ndarray]:
    """Predicted HR maps (B, G, h, w) float64 in the pairs' normalised units: one per reverse
    chain (``n_samples``) for diffusion methods, one for a baseline. Gradients are off while
    computing (not between the yields).

    ``batch_chains``: run the ``n_samples`` chains as one batch of ``n_samples x B`` (the
    condition encoded once and repeated); each chain draws its noise from its own copy of
    ``generator`` placed where the sequential chain would start
    (:meth:`~histomap.models.diffusion.GaussianDiffusion.chain_generators`), so the chains get
    the numbers they get one after another and ``generator`` ends in the same state. Needs a
    generator (without one, the chains run one after another). ``amp_type``: autocast dtype of
    the network (e.g. bf16 on the CPU, :func:`histomap.train.amp_dtype`), None for fp32.
    """
    from histomap.train import autocast, to_device

    torch = _torch()
    batch = to_device(batch, device)
    if not is_diffusion(meta["method"]):
        with torch.no_grad(), autocast(device, amp_type):
            out = model(batch["lr_up"], batch["image"], lr=batch["lr"])
        yield out.double().cpu().numpy()
        return
    diffusion = diffusion or _diffusion_of(meta)
    vrange, target = _meta_range(meta), _diffusion_target(meta)
    lr_up = vrange.to_model(batch["lr_up"].float())
    cond: dict[str, Any] = {"lr_map": lr_up, "image": batch["image"]}
    shape = tuple(batch["lr_up"].shape)  # the HR patch's (LR-only inputs have no hr)
    encode = getattr(model, "encode_condition", None)
    if callable(encode):  # encode LR + histology once, reuse at every step of every chain
        with torch.no_grad(), autocast(device, amp_type):
            cond = {"condition": encode(hr_shape=shape[-2:], **cond)}
    n_samples = int(n_samples)
    chains = 1
    if batch_chains and n_samples > 1 and generator is not None:
        chains = n_samples
        cond = _repeat_batch(cond, chains)
        lr_up = _repeat_batch(lr_up, chains)
    b = shape[0]
    for _ in range(n_samples // chains):
        with torch.no_grad():
            gen = generator if chains == 1 else diffusion.chain_generators(
                generator, chains, shape, sampler=sampler, steps=steps, eta=eta)
            with autocast(device, amp_type):
                x = diffusion.sample_one(model, (chains * b, *shape[1:]), cond, sampler=sampler,
                                         steps=steps, eta=eta, generator=gen, device=device)
            x = target.decode(x.float(), lr_up)
            if target.kind == "residual":  # back inside the data range of the maps
                x = x.clamp(*vrange.clip)
            out = vrange.from_model(x.double()).cpu().numpy()
        for k in range(chains):
            yield out[k * b:(k + 1) * b]


def _sampling_modes(device: torch.device, batch_chains: bool | str, cpu_bf16: bool | str
                    ) -> tuple[bool, torch.dtype | None]:
    """(batch the chains?, autocast dtype) of a sampling run from the config values."""
    from histomap.train import amp_dtype, cpu_bf16_enabled

    if isinstance(batch_chains, str):
        if batch_chains.lower() not in ("auto", "true", "false"):
            raise ValueError(f"batch_chains must be auto, true or false, got {batch_chains!r}")
        batched = (device.type == "cuda" or SR_BATCH_CHAINS_CPU) \
            if batch_chains.lower() == "auto" else batch_chains.lower() == "true"
    else:
        batched = bool(batch_chains)
    amp_type = amp_dtype(device, True, cpu_bf16=cpu_bf16_enabled(cpu_bf16, SR_CPU_BF16_DEFAULT)) \
        if device.type == "cpu" else None
    return batched, amp_type


class _Welford:
    """Running mean and (ddof 0) variance of equally shaped arrays."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.astype(np.float64).copy(), np.zeros_like(x, np.float64)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


def hr_pixel_centres(origin_px: np.ndarray, grid_index: np.ndarray, attrs: Mapping
                     ) -> Callable[[int], np.ndarray]:
    """Function of a patch index giving its HR pixel centres (h, w, 2) as level-0 (x, y) px.

    Point data: pixels are squares of ``hr_um / slide_mpp`` px from the patch origin. Spot
    grids: the lattice-to-slide affine is fitted from the patches' origins (lattice corner
    (r0 - 0.5, c0 - 0.5)), so flipped, transposed or slightly rotated lattices are placed
    exactly; with patches in a single row or column an axis-aligned lattice is assumed (logged).
    Odd lattice rows of a hexagonal lattice are shifted by the pairs' ``stagger_px``.
    """
    h, w = (int(v) for v in attrs["hr_shape"])
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mpp = float(attrs["slide_mpp"])
    origin_px = np.asarray(origin_px, np.float64).reshape(-1, 2)
    grid_index = np.asarray(grid_index, np.int64).reshape(-1, 2)
    if attrs.get("source") == "lr_only":  # HR pixels subdivide the spots of a known lattice
        affine = np.asarray(attrs["lattice_affine"], np.float64)  # (2, 3): 1, col, row
        f = int(attrs["scale"])
        r_min, c_min = (int(v) for v in attrs["lattice_origin"])
        shift = np.asarray(attrs.get("stagger_px") or (0.0, 0.0), np.float64)

        def sub_spot_centres(i: int) -> np.ndarray:
            rows, cols = grid_index[i, 0] + ii, grid_index[i, 1] + jj  # HR grid, from 0
            pts = np.stack([np.ones_like(ii, np.float64), c_min + (cols + 0.5) / f - 0.5,
                            r_min + (rows + 0.5) / f - 0.5], axis=-1)
            odd = ((r_min + rows // f) % 2)[..., None]
            return pts @ affine.T + odd * shift

        return sub_spot_centres
    if attrs.get("source") != "spot_grid":
        side = float(attrs["hr_um"]) / mpp

        def centres(i: int) -> np.ndarray:
            return np.stack([origin_px[i, 0] + (jj + 0.5) * side,
                             origin_px[i, 1] + (ii + 0.5) * side], axis=-1)

        return centres
    design = np.column_stack([np.ones(len(grid_index)), grid_index[:, 1] - 0.5,
                              grid_index[:, 0] - 0.5])
    if np.linalg.matrix_rank(design) == 3:
        coef, *_ = np.linalg.lstsq(design, origin_px, rcond=None)  # (3, 2): 1, col, row
    else:
        log.warning("spot-grid patches span a single lattice row or column: bin centres assume "
                    "an axis-aligned lattice with pitch %g x %g um", attrs["hr_um"],
                    attrs.get("hr_um_row", attrs["hr_um"]))
        step_c, step_r = float(attrs["hr_um"]) / mpp, float(attrs.get("hr_um_row",
                                                                      attrs["hr_um"])) / mpp
        r0, c0 = grid_index[0, 0] - 0.5, grid_index[0, 1] - 0.5
        coef = np.array([[origin_px[0, 0] - c0 * step_c, origin_px[0, 1] - r0 * step_r],
                         [step_c, 0.0], [0.0, step_r]])

    stagger = np.asarray(attrs.get("stagger_px") or (0.0, 0.0), np.float64)
    first_row = int((attrs.get("lattice_origin") or (0, 0))[0])

    def lattice_centres(i: int) -> np.ndarray:
        r0, c0 = grid_index[i]
        pts = np.stack([np.ones_like(ii, np.float64), c0 + jj, r0 + ii], axis=-1)
        odd = ((first_row + r0 + ii) % 2)[..., None]   # hexagonal lattices: odd rows shifted
        return pts @ coef + odd * stagger

    return lattice_centres




def predict_sr(model_path: str | Path, pairs_zarr: str | Path, out_maps_zarr: str | Path,
               out_h5ad: str | Path, *, sampler: str = "respaced", steps: int | None = 20,
               n_samples: int = 4, batch_size: int = 4, device: str = "auto", seed: int = 0,
               eta: float = 0.0, sample: str | None = None, batch_chains: bool | str = "auto",
               cpu_bf16: bool | str = False) -> dict[str, Any]:
    """Predict the HR map of every patch of ``pairs_zarr``; write the maps zarr and the HR-bin
    AnnData (module docstring) atomically: both appear only when both are complete.

    Diffusion methods draw ``n_samples`` reverse chains per patch with ``sampler`` ("ddpm": all
    T steps; "respaced" / "ddim": ``steps`` steps) from a CPU generator seeded with ``seed``
    (the same numbers on CPU and GPU); the maps hold their mean and per-pixel std.
    ``batch_chains``: the chains of a batch as one batch (same numbers, :func:`predict_chains`;
    "auto": on CUDA, and on the CPU where measured faster); ``cpu_bf16``: bf16 autocast on the
    CPU (true / false / "auto", :func:`histomap.train.cpu_bf16_enabled`). Both, and the torch
    thread count, are recorded in the maps' attrs and ``uns["superres"]``.
    """
    from torch.utils.data import DataLoader

    from histomap.tasks.predict import _h5ad_value
    from histomap.train import resolve_device

    torch = _torch()
    out_maps_zarr, out_h5ad = Path(out_maps_zarr), Path(out_h5ad)
    dev = resolve_device(device)
    model, meta = load_sr_model(model_path, dev)
    arrays, attrs = read_sr_pairs(pairs_zarr, lazy=True)
    genes = list(attrs["genes"])
    if genes != list(meta["genes"]):
        raise InputError(pairs_zarr, f"genes differ from those the model {model_path} was "
                                     f"trained on ({len(genes)} vs {len(meta['genes'])})")
    for key in ("scale", "hr_shape", "normalisation"):
        if attrs.get(key) != meta["pairs"].get(key):
            raise InputError(pairs_zarr, f"{key} {attrs.get(key)!r} differs from the model's "
                                         f"training pairs ({meta['pairs'].get(key)!r})")
    diffusion = is_diffusion(meta["method"])
    truth = has_truth(attrs)  # LR-only inputs (an applied sample): no truth layers
    n = int(arrays["lr"].shape[0])
    g, (h, w) = len(genes), (int(v) for v in attrs["hr_shape"])
    dataset = _model_dataset(meta, pairs_zarr)
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False)
    generator = torch.Generator().manual_seed(int(seed))
    diff = _diffusion_of(meta)
    batched, amp_type = _sampling_modes(dev, batch_chains, cpu_bf16)
    target_sum = meta["pairs"].get("target_sum")
    to_counts = prediction_denormaliser(arrays, attrs, target_sum)   # LR patch + training stats
    truth_counts = pairs_denormaliser(arrays, attrs) if truth else None  # measured HR counts
    origin_px = np.asarray(arrays["origin_px"][...], np.float64)
    grid_index = np.asarray(arrays["grid_index"][...], np.int64)
    centres = hr_pixel_centres(origin_px, grid_index, attrs)
    info = {"method": meta["method"], "variant": meta.get("variant", meta["method"]),
            "model": str(model_path), "pairs": str(pairs_zarr), "sample": sample,
            "sampler": sampler if diffusion else None,
            "steps": (steps if sampler != "ddpm" else int(meta["diffusion"]["T"]))
            if diffusion else None, "n_samples": int(n_samples) if diffusion else 1,
            "eta": float(eta) if diffusion else None, "seed": int(seed),
            "target_sum": target_sum, "uses_lr_map": bool(getattr(model, "uses_lr_map", True)),
            "device": str(dev), "batch_chains": bool(batched and diffusion),
            "autocast": None if amp_type is None else str(amp_type).removeprefix("torch."),
            "threads": int(torch.get_num_threads())}
    geometry = {k: attrs.get(k) for k in ("genes", "scale", "lr_um", "hr_um", "hr_um_row",
                                          "patch_um", "edge", "normalisation", "source", "slide",
                                          "slide_mpp", "image_mpp", "hr_shape", "lr_shape",
                                          "hr_target_sum")}
    tmp_zarr, tmp_h5ad = partial_path(out_maps_zarr), partial_path(out_h5ad)
    out_maps_zarr.parent.mkdir(parents=True, exist_ok=True)
    out_h5ad.parent.mkdir(parents=True, exist_ok=True)
    for path in (tmp_zarr, tmp_h5ad):
        remove_path(path)
    renamed: list[Path] = []
    try:
        root = zarr.open_group(tmp_zarr, mode="w")
        root.attrs.update({"format": MAPS_FORMAT, **geometry, **info, "n_patches": n})
        names = ["pred", "pred_counts"] + (["pred_std", "pred_std_counts"] if diffusion else [])
        maps = {name: root.create_array(name, shape=(n, g, h, w), dtype="float32",
                                        chunks=(1, g, h, w), fill_value=0,
                                        dimension_names=("patch", "gene", "y", "x"))
                for name in names}
        for name in ("mask", "origin_px", "origin_um", "grid_index"):
            values = np.asarray(arrays[name][...])
            root.create_array(name, shape=values.shape, dtype=values.dtype,
                              chunks=values.shape, fill_value=0)[...] = values
        layers: dict[str, list[np.ndarray]] = {k: [] for k in
                                               ("X", "pred",
                                                *(("truth", "truth_counts") if truth else ()),
                                                *(("pred_std", "pred_std_counts")
                                                  if diffusion else ()))}
        obs_parts = []
        start = time.perf_counter()
        bar = Progress(n, f"SR prediction {Path(pairs_zarr).name}", "patches", logger=log)
        for batch in loader:
            stats = [(_Welford(), _Welford()) for _ in range(len(batch["index"]))]
            for chain in predict_chains(model, meta, batch, device=dev, sampler=sampler,
                                        steps=steps, n_samples=n_samples, eta=eta,
                                        generator=generator, diffusion=diff,
                                        batch_chains=batched, amp_type=amp_type):
                for b, i in enumerate(batch["index"].tolist()):
                    stats[b][0].add(chain[b])
                    stats[b][1].add(to_counts(chain[b], i))
            for b, i in enumerate(batch["index"].tolist()):
                norm, counts = stats[b]
                maps["pred"][i] = norm.mean.astype(np.float32)
                maps["pred_counts"][i] = counts.mean.astype(np.float32)
                if diffusion:
                    maps["pred_std"][i] = norm.std.astype(np.float32)
                    maps["pred_std_counts"][i] = counts.std.astype(np.float32)
                mask = batch["mask"][b].numpy()
                layers["X"].append(counts.mean[:, mask].T)
                layers["pred"].append(norm.mean[:, mask].T)
                if truth:
                    hr = batch["hr"][b].numpy().astype(np.float64)
                    layers["truth"].append(hr[:, mask].T)
                    stored = np.asarray(arrays["hr"][i], np.float64)
                    layers["truth_counts"].append(truth_counts(stored, i)[:, mask].T)
                if diffusion:
                    layers["pred_std"].append(norm.std[:, mask].T)
                    layers["pred_std_counts"].append(counts.std[:, mask].T)
                ii, jj = np.nonzero(mask)
                obs_parts.append(pd.DataFrame({
                    "patch": i, "i": ii, "j": jj, "row": grid_index[i, 0] + ii,
                    "col": grid_index[i, 1] + jj,
                    "x_px": centres(i)[ii, jj, 0], "y_px": centres(i)[ii, jj, 1]}))
            bar.update(len(batch["index"]))
        bar.close()
        seconds = time.perf_counter() - start
        root.attrs["seconds"] = seconds
        obs = pd.concat(obs_parts, ignore_index=True) if obs_parts else pd.DataFrame(
            {c: [] for c in ("patch", "i", "j", "row", "col", "x_px", "y_px")})
        obs.index = [f"p{p}_{a}_{b}" for p, a, b in zip(obs["patch"], obs["i"], obs["j"])]
        if sample is not None:
            obs["sample"] = pd.Categorical([sample] * len(obs))

        def stack(key: str) -> np.ndarray:
            parts = layers[key]
            return (np.concatenate(parts) if parts else np.zeros((0, g))).astype(np.float32)

        adata = ad.AnnData(X=stack("X"), obs=obs.drop(columns=["x_px", "y_px"]),
                           var=pd.DataFrame(index=pd.Index(genes)))
        adata.obsm["spatial"] = obs[["x_px", "y_px"]].to_numpy(np.float64)
        for key in layers:
            if key != "X":
                adata.layers[key] = stack(key)
        adata.uns["histomap"] = _h5ad_value({"sample": sample, "mpp": attrs.get("slide_mpp"),
                                             "image": attrs.get("slide"),
                                             "bin_um": attrs.get("hr_um")})
        adata.uns["superres"] = _h5ad_value({**{k: v for k, v in geometry.items()
                                                if k != "genes"}, **info,
                                             "X": "predicted counts (mean over samples)",
                                             "truth": bool(truth),
                                             "units": "layers pred/truth: normalised maps"})
        slide = attrs.get("slide")
        if slide and Path(slide).is_file() and attrs.get("slide_mpp") and attrs.get("hr_um"):
            add_scanpy_spatial(adata, slide, library_id=str(sample or Path(slide).stem),
                               spot_diameter_um=float(attrs["hr_um"]),
                               mpp=float(attrs["slide_mpp"]))
        adata.write_h5ad(tmp_h5ad)
        remove_path(out_maps_zarr)
        os.replace(tmp_zarr, out_maps_zarr)
        renamed.append(out_maps_zarr)
        remove_path(out_h5ad)
        os.replace(tmp_h5ad, out_h5ad)
        renamed.append(out_h5ad)
    except BaseException:
        for path in renamed:
            remove_path(path)
        raise
    finally:
        for path in (tmp_zarr, tmp_h5ad):
            remove_path(path)
    log.info("%s: %d patches (%d HR bins in tissue) predicted by %s in %.1f s (%.3g s per "
             "patch)%s -> %s, %s", Path(pairs_zarr).name, n, adata.n_obs, info["variant"],
             seconds, seconds / max(n, 1),
             f", {info['sampler']} sampler, {info['steps']} steps, K={n_samples}"
             if diffusion else "", out_maps_zarr, out_h5ad)
    return {"n_patches": n, "n_bins": int(adata.n_obs), "seconds": seconds, **info}


# ============================================================================ apply
def sr_model_meta(model_path: str | Path) -> dict:
    """An SR ``model.pt``'s description (no network built): method, genes, ``pairs`` (factor,
    shapes, normalisation, training target sum, H&E size)."""
    payload = _read_sr_payload(Path(model_path))
    return {k: v for k, v in payload.items() if k != "state_dict"}


def lr_inputs_for_model(model_path: str | Path, spots_h5ad: str | Path, slide: str | Path,
                        out_zarr: str | Path, *, min_measured: float = 0.0,
                        sample: str = "") -> dict[str, Any]:
    """LR-only inputs (:func:`histomap.data.srpairs.build_lr_pairs`) of a sample with spots
    and H&E but no HR truth, in the layout and units of an SR model trained elsewhere (its
    factor, patch shapes, H&E size, genes, normalisation and training target sum: nothing of
    this sample enters the units). ``spots_h5ad``: the sample's raw spots (ingest)."""
    meta = sr_model_meta(model_path)
    pairs = meta["pairs"]
    spots = ad.read_h5ad(spots_h5ad)
    missing = [g for g in meta["genes"] if g not in spots.var_names]
    if missing:
        raise InputError(spots_h5ad, f"{len(missing)} genes of the SR model {model_path} are not "
                                     f"measured, e.g. {', '.join(missing[:5])}")
    image_hw = pairs.get("image_hw")
    if not image_hw:
        raise InputError(model_path, "the SR model does not record its H&E patch size")
    return build_lr_pairs(spots, slide, meta["genes"], out_zarr, factor=int(pairs["scale"]),
                          n_lr=int(pairs["lr_shape"][0]), n_hr=int(pairs["hr_shape"][0]),
                          he_hw=image_hw, normalisation=pairs["normalisation"],
                          target_sum=pairs.get("target_sum"), min_measured=min_measured,
                          trained_lr_um=pairs.get("lr_um"),
                          source_name=f"{sample or spots_h5ad} spots")


# ============================================================================ sampling speed
def time_sampling(model_path: str | Path, pairs_zarr: str | Path, *,
                  steps: Sequence[int] = (1000, 250, 50, 20), sampler: str = "respaced",
                  n_samples: int = 1, max_patches: int | None = 4, batch_size: int = 4,
                  device: str = "auto", seed: int = 0, eta: float = 0.0,
                  batch_chains: bool | str = "auto", cpu_bf16: bool | str = False
                  ) -> pd.DataFrame:
    """Steps-vs-quality table of a diffusion model: for each number of steps (T steps: the full
    ancestral DDPM; fewer: ``sampler``), seconds per patch and RMSE / PCC (normalised; per gene
    per patch, averaged) on the first ``max_patches`` patches of ``pairs_zarr``."""
    from torch.utils.data import DataLoader

    from histomap.train import resolve_device

    torch = _torch()
    dev = resolve_device(device)
    model, meta = load_sr_model(model_path, dev)
    if not is_diffusion(meta["method"]):
        raise ValueError(f"{model_path}: {meta['method']} is not a diffusion model")
    arrays, attrs = read_sr_pairs(pairs_zarr, lazy=True)
    if list(attrs["genes"]) != list(meta["genes"]):
        raise InputError(pairs_zarr, "genes differ from the model's")
    n = int(arrays["hr"].shape[0]) if max_patches is None else min(int(max_patches),
                                                                  int(arrays["hr"].shape[0]))
    dataset = _model_dataset(meta, pairs_zarr, indices=np.arange(n))
    diff = _diffusion_of(meta)
    batched, amp_type = _sampling_modes(dev, batch_chains, cpu_bf16)
    rows = []
    for k in steps:
        chain_sampler = "ddpm" if int(k) >= diff.T else sampler
        generator = torch.Generator().manual_seed(int(seed))
        metrics = []
        elapsed = 0.0
        for batch in DataLoader(dataset, batch_size=int(batch_size), shuffle=False):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            mean = _Welford()
            for chain in predict_chains(model, meta, batch, device=dev, sampler=chain_sampler,
                                        steps=int(k), n_samples=n_samples, eta=eta,
                                        generator=generator, diffusion=diff,
                                        batch_chains=batched, amp_type=amp_type):
                mean.add(chain)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed += time.perf_counter() - start
            for b, i in enumerate(batch["index"].tolist()):
                rmse, pcc, _ = patch_gene_metrics(batch["hr"][b].numpy(), mean.mean[b],
                                                  batch["mask"][b].numpy())
                metrics.append((i, rmse, pcc))
        per_gene = pd.DataFrame([{"patch": i, "gene": g, "rmse": r, "pcc": p,
                                  "rmse_counts": math.nan, "pcc_counts": math.nan}
                                 for i, rmse, pcc in metrics
                                 for g, r, p in zip(attrs["genes"], rmse, pcc)])
        per_gene["method"] = meta.get("variant", meta["method"])
        summary = summarise_sr(per_gene, ["method"]).set_index("metric")
        rows.append({"method": meta.get("variant", meta["method"]), "sampler": chain_sampler,
                     "steps": int(min(int(k), diff.T)), "n_samples": int(n_samples),
                     "n_patches": n, "seconds_per_patch": elapsed / max(n, 1),
                     "RMSE": summary.loc["RMSE", "value"], "PCC": summary.loc["PCC", "value"],
                     "n_nan_pcc": int(summary.loc["PCC", "n_nan_pcc"]), "device": str(dev),
                     "batch_chains": bool(batched), "autocast": str(amp_type),
                     "threads": int(torch.get_num_threads())})
        log.info("%d steps (%s): %.3g s per patch, RMSE %.4f, PCC %.4f", rows[-1]["steps"],
                 chain_sampler, rows[-1]["seconds_per_patch"], rows[-1]["RMSE"],
                 rows[-1]["PCC"])
    return pd.DataFrame(rows)


__all__ = ["DiffusionObjective", "ValueRange", "baseline_batch_loss", "build_sr_model",
           "curriculum_schedule", "hr_pixel_centres", "known_methods", "load_sr_model",
           "masked_mse", "predict_chains", "predict_sr", "save_sr_model", "split_patches",
           "time_sampling", "train_sr", "training_adjacency", "training_pixels", "value_range"]
