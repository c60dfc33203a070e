"""Linear probe training (the ``train_probe`` rule's work): frozen features -> ridge -> model.pt.

Arrow: (encoder features, cached) + normalised spots -> model. Each training sample's spots get
the frozen encoder's pooled features of their crop, from the ``encode_slide`` cache
(:class:`histomap.tasks.feature_cache.FeaturePyramid`) or, without one, computed here from the
slide (``crop_um`` at ``input_mpp``). The ridge penalty is chosen on spatial validation blocks
of the training slides (:func:`histomap.evaluation.folds.validation_split`, the blocks every
model validates on), then the probe is refitted on all training spots
(:func:`histomap.models.probe.select_ridge`). The fitted :class:`LinearProbe` is saved like any
crop model, so ``predict_spot_model`` (rule ``predict_probe``) writes its spot tables.

Options of the ``probe`` config block: ``encoder``, ``input_mpp``, ``crop_um`` (default: the
spot diameter; with a cache, the cache's crop), ``checkpoint`` (local weights of a plain timm
encoder), ``alphas`` (penalty grid, ``lambda = alpha * n_train``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.compat import torch
from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry
from histomap.data.spot_patches import SpotDataset, extract_spot_patches
from histomap.evaluation.folds import validation_split
from histomap.models.probe import DEFAULT_ALPHAS, LinearProbe, ridge_fit, select_ridge
from histomap.tasks.feature_cache import FeaturePyramid
from histomap.train import save_model

log = logging.getLogger(__name__)

MODEL_NAME = "probe"


@torch.no_grad()
def crop_features(model: LinearProbe, slide: str | Path, centres_px: np.ndarray, *,
                  crop_um: float, input_mpp: float, batch_size: int = 32) -> np.ndarray:
    """(n, F) pooled features of the spots' crops, computed from the slide."""
    patches = extract_spot_patches(slide, centres_px, crop_um=crop_um, out_mpp=input_mpp)
    data = SpotDataset(patches)
    out = [model.features(torch.stack([data[j] for j in range(i, min(i + batch_size,
                                                                     len(data)))])).numpy()
           for i in range(0, len(data), batch_size)]
    return np.concatenate(out).astype(np.float32)


def train_probe(st_paths: Sequence[str | Path], slide_paths: Sequence[str | Path],
                genes: Sequence[str], *, model_cfg: Mapping, validation: Mapping, seed: int,
                out_model: str | Path, out_log: str | Path,
                feature_caches: Sequence[str | Path] | None = None) -> dict:
    """Fit the linear probe on the training samples of a fold; write ``model.pt`` and a log of
    the validation MSE of every penalty (``out_log``, CSV)."""
    cfg = dict(model_cfg)
    encoder = str(cfg.get("encoder", "efficientnet_lite0_imagenet"))
    input_mpp = float(cfg["input_mpp"])
    checkpoint = cfg.get("checkpoint")
    alphas = [float(a) for a in cfg.get("alphas") or DEFAULT_ALPHAS]
    model = LinearProbe(len(genes), encoder=encoder, pretrained_checkpoint=checkpoint)
    caches = list(feature_caches or [])
    if caches and len(caches) != len(st_paths):
        raise ValueError(f"{len(caches)} feature caches for {len(st_paths)} samples")
    crop_cfg = cfg.get("crop_um")
    tr_x, tr_y, va_x, va_y = [], [], [], []
    crops = set()
    for i, (st_path, slide) in enumerate(zip(st_paths, slide_paths)):
        spots = ad.read_h5ad(st_path)
        xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        if caches:
            pyr = FeaturePyramid(caches[i])
            pyr.check(encoder, input_mpp, checkpoint)
            feats = pyr.spot_features(list(spots.obs_names))
            crops.add(float(pyr.attrs["crop_um"]))
        else:
            crop_um = float(crop_cfg or geometry(spots)["spot_diameter_um"])
            feats = crop_features(model, slide, xy, crop_um=crop_um, input_mpp=input_mpp)
            crops.add(crop_um)
        targets = expression_matrix(spots, genes, path=st_path)
        block_px = float(validation["block_um"]) / float(geometry(spots)["mpp"])
        val = validation_split(xy, fraction=float(validation["fraction"]), block_px=block_px,
                               seed=seed + i)
        log.info("%s: %d training spots, %d validation spots (spatial blocks of %g um)",
                 Path(st_path).name, int((~val).sum()), int(val.sum()), validation["block_um"])
        tr_x.append(feats[~val]), tr_y.append(targets[~val])
        va_x.append(feats[val]), va_y.append(targets[val])
    if len(crops) > 1:
        raise ValueError(f"training samples were encoded with different crops {sorted(crops)}")
    tr_x, tr_y = np.concatenate(tr_x), np.concatenate(tr_y)
    va_x, va_y = np.concatenate(va_x), np.concatenate(va_y)
    alpha, rows = select_ridge(tr_x, tr_y, va_x, va_y, alphas)
    all_x, all_y = np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])
    lam = alpha * len(all_x)
    model.set_ridge(*ridge_fit(all_x, all_y, lam))
    log.info("probe: %s features (%d), alpha %g chosen on %d validation spots; refitted on %d "
             "spots (lambda %g)", encoder, all_x.shape[1], alpha, len(va_x), len(all_x), lam)
    save_model(out_model, model, model_name=MODEL_NAME, genes=genes,
               extra={"input_mpp": input_mpp, "crop_um": crops.pop(), "alpha": alpha,
                      "lambda": lam, "validation": dict(validation),
                      "feature_cache": bool(caches)})
    Path(out_log).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).assign(chosen=lambda d: d["alpha"] == alpha).to_csv(out_log, index=False)
    return {"alpha": alpha, "lambda": lam, "grid": rows}
