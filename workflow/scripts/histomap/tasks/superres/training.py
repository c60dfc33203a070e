"""Training an SR method on its fold's pairs: the train_diffst / train_sr_baseline rules' work.

Arrow: SR pairs -> **SR model** (``model.pt`` and ``train_log.csv``), on the shared loop
:func:`histomap.train.fit` (checkpoints, resume, early stopping, AMP).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from histomap.data.srpairs.dataset import augment_mode
from histomap.data.srpairs.store import training_target_sum
from histomap.tasks.superres.epoch_log import epochs_done, write_rows_csv, write_train_log
from histomap.tasks.superres.methods import (
    DEFAULT_DIFFUSION,
    build_sr_model,
    gaussian_diffusion,
    is_diffusion,
    is_trainable,
    split_task_options,
)
from histomap.tasks.superres.model_file import save_sr_model
from histomap.tasks.superres.objectives import (
    DiffusionObjective,
    DiffusionTarget,
    baseline_batch_loss,
    curriculum_schedule,
    value_range,
)
from histomap.tasks.superres.training_data import (
    common_image_hw,
    limit_training_patches,
    pairs_attrs,
    split_patches,
    training_adjacency,
    training_datasets,
)

log = logging.getLogger(__name__)


def _pairs_meta(pairs_zarrs: Sequence[Path], attrs: Mapping, task: Mapping) -> dict:
    """What ``model.pt`` records of its training pairs: geometry, units, the LR upsampling, the
    H&E size the model saw and, for log1p, the target sum of its training pairs (never a test
    section's)."""
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
    return pairs_meta


def _prepare_diffst(model, pairs_zarrs: Sequence[Path], train_idx: Sequence, task: Mapping, *,
                    seed: int, target_sum: float | None, epochs: int, extra_meta: dict):
    """Diff-ST's training-data parts: the CIGC gene graph from the training patches (kept in
    ``extra_meta["adjacency"]``) and the curriculum schedule (None without hierarchy)."""
    from histomap.compat import torch

    if model.cfg.cigc:
        adj = training_adjacency(pairs_zarrs, train_idx,
                                 max_pixels=int(task.get("adjacency_max_pixels", 50_000)),
                                 binarize=bool(task.get("adjacency_binarize", False)),
                                 seed=seed, target_sum=target_sum)
        model.set_adjacency(adj)
        extra_meta["adjacency"] = torch.as_tensor(adj, dtype=torch.float32)
    if not model.cfg.hierarchical:
        log.info("hierarchical features off: no sub-patches, the curriculum is unused")
        return None
    schedule = curriculum_schedule(task.get("curriculum"), epochs, model)
    log.info("curriculum (%s): %s from epochs %s of %d", schedule.mode,
             list(schedule.fractions),
             [math.ceil(m - 1e-9) + 1 for m in schedule.milestones], epochs)
    return schedule


def _diffusion_objective(model, pairs_zarrs: Sequence[Path], train_idx: Sequence, *,
                         normalisation: str, diffusion: Mapping | None, task: Mapping, cfg,
                         seed: int, target_sum: float | None, checkpoint_dir: Path,
                         fingerprint: dict, on_epoch_end, extra_meta: dict
                         ) -> DiffusionObjective:
    """``fit``'s objective of a diffusion method (resumed at the checkpoint's epoch); records
    the diffusion config and value range (and Diff-ST's gene graph) in ``extra_meta``."""
    from histomap.models.diffst import DiffST
    from histomap.train import discard_stale_checkpoints

    diff_cfg = {**DEFAULT_DIFFUSION, **dict(diffusion or {})}
    vrange = value_range(normalisation, pairs_zarrs, train_idx, target_sum)
    diff = gaussian_diffusion(diff_cfg)
    schedule = None
    if isinstance(model, DiffST):
        schedule = _prepare_diffst(model, pairs_zarrs, train_idx, task, seed=seed,
                                   target_sum=target_sum, epochs=cfg.epochs,
                                   extra_meta=extra_meta)
    # stale checkpoints go before their epoch count is read (a no-op again in fit)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    discard_stale_checkpoints(checkpoint_dir, model, cfg, fingerprint)
    objective = DiffusionObjective(diff, vrange, schedule=schedule, seed=seed,
                                   start_epoch=epochs_done(checkpoint_dir),
                                   extras_path=checkpoint_dir / "sr_epochs.csv",
                                   on_epoch_end=on_epoch_end,
                                   target=DiffusionTarget(diff_cfg["target"]))
    extra_meta["diffusion"] = diff_cfg
    extra_meta["value_range"] = vrange.as_list()
    return objective


def _use_every_subpatch(model, summary: Mapping) -> None:
    """The curriculum is a training device: the saved model predicts (and was validated) with
    every sub-patch, whatever stage its best epoch was trained at."""
    from histomap.models.diffst import DiffST

    if isinstance(model, DiffST) and model.cfg.hierarchical:
        log.info("best epoch %d was trained at curriculum keep fraction %.3g, entropy threshold "
                 "%.3g; the saved model uses every sub-patch at inference", summary["best_epoch"],
                 float(model.keep_fraction), float(model.entropy_threshold))
        model.set_curriculum(keep_fraction=1.0, entropy_threshold=0.0)


def train_sr(method: str, pairs_zarrs: Sequence[str | Path], *, model_cfg: Mapping | None,
             train_cfg: Mapping, validation: Mapping, seed: int, out_model: str | Path,
             out_log: str | Path, checkpoint_dir: str | Path,
             diffusion: Mapping | None = None, variant: str | None = None,
             on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train ``method`` on the training fold's SR pairs; write ``model.pt`` and the epoch log.

    ``model_cfg``: network keyword arguments plus task options (``curriculum``, ``upsample``,
    ``adjacency_max_pixels``, ``adjacency_binarize``); ``train_cfg``:
    :class:`~histomap.train.TrainConfig` fields plus ``augment`` (random flips of the training
    patches, default off); ``validation``: dict(fraction, block_um) of the training patches held
    out for early stopping; ``diffusion``: dict(T, schedule, loss, prediction, target) for
    diffusion methods (missing keys from :data:`.methods.DEFAULT_DIFFUSION`); ``variant``: the
    configured name (e.g. ``diffst_no_cam``). Resumes from ``checkpoint_dir/last.pt``. The log has
    fit's columns plus ``keep_fraction`` (scheduled curriculum), ``kept_observed``, ``denoise`` and
    ``dis`` for diffusion methods.
    """
    from histomap.compat import torch
    from histomap.train import TrainConfig, fit, training_fingerprint

    pairs_zarrs = [Path(p) for p in pairs_zarrs]
    attrs = pairs_attrs(pairs_zarrs)
    genes = list(attrs["genes"])
    task, net_cfg = split_task_options(model_cfg)
    checkpoint_dir = Path(checkpoint_dir)
    torch.manual_seed(seed)
    model = build_sr_model(method, len(genes), net_cfg)
    pairs_meta = _pairs_meta(pairs_zarrs, attrs, task)
    target_sum = pairs_meta["target_sum"]
    meta = {"variant": variant or method, "task": task, "pairs": pairs_meta,
            "train_pairs": [str(p) for p in pairs_zarrs]}
    if not is_trainable(method, model):
        save_sr_model(out_model, model, method=method, genes=genes, trainable=False,
                      diffusion={}, value_range=[], **meta)
        write_rows_csv([], Path(out_log), ("epoch", "train_loss", "val_loss", "lr", "seconds"))
        log.info("%s is not trainable: wrote its configuration to %s (no fit)", method,
                 out_model)
        return {"trainable": False}

    splits = split_patches(pairs_zarrs, fraction=float(validation.get("fraction", 0.15)),
                           block_um=float(validation.get("block_um", 0.0)), seed=seed)
    train_cfg = dict(train_cfg)
    augment = augment_mode(train_cfg.pop("augment", False)) or False
    max_patches = train_cfg.pop("max_patches", None)
    splits = limit_training_patches(splits, max_patches, seed)
    train_ds, val_ds = training_datasets(pairs_zarrs, splits, task["upsample"],
                                         tuple(pairs_meta["image_hw"]), target_sum, augment)
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    extra_meta: dict[str, Any] = {"diffusion": {}, "value_range": []}
    fingerprint = training_fingerprint(pairs_zarrs, method=method, variant=variant,
                                       model_cfg=model_cfg, diffusion=diffusion,
                                       validation=validation, seed=seed, augment=augment,
                                       max_patches=max_patches)
    batch_to_loss, hook = baseline_batch_loss, on_epoch_end
    if is_diffusion(method):
        batch_to_loss = _diffusion_objective(
            model, pairs_zarrs, [tr for tr, _ in splits], normalisation=attrs["normalisation"],
            diffusion=diffusion, task=task, cfg=cfg, seed=seed, target_sum=target_sum,
            checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, on_epoch_end=on_epoch_end,
            extra_meta=extra_meta)
        hook = batch_to_loss.on_epoch_end
    summary = fit(model, train_ds, val_ds, loss_fn=None, out_dir=checkpoint_dir, cfg=cfg,
                  batch_to_loss=batch_to_loss, on_epoch_end=hook, fingerprint=fingerprint)
    _use_every_subpatch(model, summary)
    save_sr_model(out_model, model, method=method, genes=genes, trainable=True,
                  train={**cfg.to_dict(), "augment": augment, "max_patches": max_patches},
                  validation=dict(validation),
                  summary={k: summary[k] for k in ("best_epoch", "best_val_loss",
                                                   "epochs_done", "stopped_early")},
                  **extra_meta, **meta)
    extras_path = checkpoint_dir / "sr_epochs.csv" if is_diffusion(method) else None
    write_train_log(checkpoint_dir, extras_path, out_log)
    return {**summary, "trainable": True}
