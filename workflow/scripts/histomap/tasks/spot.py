"""Spot models: training and prediction of the models that predict one value per spot.

Two families, both trained on the shared loop (:func:`histomap.train.fit`) from normalised spots
and slides, and both written as the spot predictions AnnData of
:func:`histomap.tasks.predict.spots_prediction_anndata` (arrow: normalised spots + slide ->
model -> spot predictions):

**Crop regressors (ST-Net style)**: the H&E crop around each spot predicts the spot's
log-normalised expression of the gene panel (``train_stnet`` / ``predict_stnet`` rules).

**HistoGene** (slide transformers predicting all spots of a slide at once) is the other
family: :mod:`histomap.tasks.histogene`.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
from torch.utils.data import ConcatDataset

from histomap.compat import torch
from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry
from histomap.data.spot_patches import SpotDataset, extract_spot_patches
from histomap.data.stain import StainJitter
from histomap.evaluation.folds import validation_split
from histomap.models import build_model
from histomap.tasks.predict import predict_spots, spots_prediction_anndata
from histomap.train import TrainConfig, fit, load_model, save_model, training_fingerprint

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


def crop_um_for(model_cfg: Mapping, spots: ad.AnnData) -> float:
    return float(model_cfg.get("crop_um") or geometry(spots)["spot_diameter_um"])


def _slide_datasets(spots: ad.AnnData, slide: str | Path, genes: Sequence[str], *,
                    crop_um: float, input_mpp: float, validation: Mapping, seed: int,
                    path: str | Path, color=None) -> tuple[SpotDataset, SpotDataset | None]:
    """Training and validation datasets of one training slide (validation = spatial blocks)."""
    xy = np.asarray(spots.obsm["spatial"])
    patches = extract_spot_patches(slide, xy, crop_um=crop_um, out_mpp=input_mpp)
    targets = expression_matrix(spots, genes, path=path)
    block_px = float(validation["block_um"]) / geometry(spots)["mpp"]
    val = validation_split(xy, fraction=float(validation["fraction"]), block_px=block_px,
                           seed=seed)
    log.info("%s: %d training spots, %d validation spots (spatial blocks of %g um)",
             Path(path).name, int((~val).sum()), int(val.sum()), validation["block_um"])
    train_ds = SpotDataset(patches[~val], targets[~val], augment=True, color=color)
    val_ds = SpotDataset(patches[val], targets[val], augment=False) if val.any() else None
    return train_ds, val_ds


def train_spot_model(st_paths: Sequence[str | Path], slide_paths: Sequence[str | Path],
                     genes: Sequence[str], *, model_name: str, model_cfg: Mapping,
                     train_cfg: Mapping, validation: Mapping, seed: int,
                     out_model: str | Path, out_log: str | Path,
                     checkpoint_dir: str | Path,
                     feature_caches: Sequence[str | Path] | None = None) -> dict:
    """Train on the given (training-fold) samples; write ``model.pt`` and ``train_log.csv``.

    ``feature_caches`` (one ``encode_slide`` cache per sample; ST-Net-style with
    ``freeze_backbone: true``): the head trains on the cached pooled crop features
    (:func:`histomap.tasks.feature_cache.cached_spot_datasets`; crops of the cache's
    ``crop_um``, no augmentation). Resumes from ``checkpoint_dir/last.pt`` after an interruption.
    """
    torch.manual_seed(seed)
    fingerprint = training_fingerprint([*st_paths, *slide_paths, *(feature_caches or [])],
                                       model_name=model_name, model_cfg=model_cfg,
                                       genes=list(genes), validation=validation, seed=seed)
    model_cfg = dict(model_cfg)
    input_mpp = float(model_cfg.pop("input_mpp"))
    crop_cfg = model_cfg.pop("crop_um", None)
    checkpoint = model_cfg.pop("checkpoint", None)
    color = StainJitter.from_config(model_cfg.pop("stain_augment", None))
    if feature_caches:
        return _train_spot_head_cached(st_paths, genes, model_name=model_name,
                                       model_cfg=model_cfg, input_mpp=input_mpp,
                                       checkpoint=checkpoint, train_cfg=train_cfg,
                                       validation=validation, seed=seed, out_model=out_model,
                                       out_log=out_log, checkpoint_dir=checkpoint_dir,
                                       feature_caches=feature_caches, fingerprint=fingerprint)
    train_parts, val_parts = [], []
    for i, (st_path, slide) in enumerate(zip(st_paths, slide_paths)):
        spots = ad.read_h5ad(st_path)
        crop_um = float(crop_cfg or geometry(spots)["spot_diameter_um"])
        tr, va = _slide_datasets(spots, slide, genes, crop_um=crop_um, input_mpp=input_mpp,
                                 validation=validation, seed=seed + i, path=st_path,
                                 color=color)
        train_parts.append(tr)
        if va is not None:
            val_parts.append(va)
    model = build_model(model_name, len(genes), pretrained_checkpoint=checkpoint, **model_cfg)
    if hasattr(model, "init_output_bias"):
        model.init_output_bias(torch.cat([part.targets for part in train_parts]).mean(dim=0))
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    summary = fit(model, ConcatDataset(train_parts),
                  ConcatDataset(val_parts) if val_parts else None,
                  loss_fn=torch.nn.functional.mse_loss, out_dir=checkpoint_dir, cfg=cfg,
                  fingerprint=fingerprint)
    save_model(out_model, model, model_name=model_name, model_config=model.config, genes=genes,
               extra={"input_mpp": input_mpp, "crop_um": crop_cfg, "train": cfg.to_dict(),
                      "validation": dict(validation), "best_epoch": summary["best_epoch"],
                      "best_val_loss": summary["best_val_loss"]})
    shutil.copyfile(Path(checkpoint_dir) / "train_log.csv", out_log)
    return summary


def _train_spot_head_cached(st_paths, genes, *, model_name, model_cfg, input_mpp, checkpoint,
                            train_cfg, validation, seed, out_model, out_log, checkpoint_dir,
                            feature_caches, fingerprint) -> dict:
    """``train_spot_model`` from cached pooled features: only the head trains."""
    from histomap.tasks.feature_cache import cached_spot_batch_loss, cached_spot_datasets

    model = build_model(model_name, len(genes), pretrained_checkpoint=checkpoint, **model_cfg)
    if not getattr(model, "freeze_backbone", False):
        raise ValueError("cached features train the head of a frozen backbone only: set "
                         f"{model_name}.freeze_backbone: true")
    train_ds, val_ds, crop_um = cached_spot_datasets(
        feature_caches, st_paths, genes, encoder=model.backbone_name, mpp=input_mpp,
        checkpoint=checkpoint, validation=validation, seed=seed)
    model.init_output_bias(train_ds.tensors[1].mean(dim=0))
    cfg = TrainConfig.from_dict({**train_cfg, "seed": seed})
    summary = fit(model, train_ds, val_ds, loss_fn=torch.nn.functional.mse_loss,
                  out_dir=checkpoint_dir, cfg=cfg, batch_to_loss=cached_spot_batch_loss,
                  fingerprint=fingerprint)
    save_model(out_model, model, model_name=model_name, model_config=model.config, genes=genes,
               extra={"input_mpp": input_mpp, "crop_um": crop_um, "train": cfg.to_dict(),
                      "validation": dict(validation), "best_epoch": summary["best_epoch"],
                      "best_val_loss": summary["best_val_loss"], "feature_cache": True})
    shutil.copyfile(Path(checkpoint_dir) / "train_log.csv", out_log)
    return summary


def predict_spot_model(model_path: str | Path, st_path: str | Path | ad.AnnData,
                       slide: str | Path, out_path: str | Path | None, *, batch_size: int = 64,
                       device: str = "auto") -> ad.AnnData:
    """Predict every spot of one held-out sample (or of an AnnData of spot centres, e.g.
    pseudo-spots) at its own spot size; write the AnnData (unless ``out_path`` is None)."""
    model, meta = load_model(model_path)
    spots = st_path if isinstance(st_path, ad.AnnData) else ad.read_h5ad(st_path)
    extra = meta.get("extra", {})
    crop_um = float(extra.get("crop_um") or geometry(spots)["spot_diameter_um"])
    patches = extract_spot_patches(slide, np.asarray(spots.obsm["spatial"]), crop_um=crop_um,
                                   out_mpp=float(extra["input_mpp"]))
    pred = predict_spots(model, SpotDataset(patches), batch_size=batch_size, device=device)
    out = spots_prediction_anndata(
        pred, spots.obs_names, meta["genes"], spots.obsm["spatial"], geometry(spots),
        geometry(spots)["spot_diameter_um"],
        model_info={"model": meta["model_name"], "path": str(model_path)},
        scanpy_uns=spots.uns.get("spatial"))
    if out_path is not None:
        out.write_h5ad(out_path)
    return out
