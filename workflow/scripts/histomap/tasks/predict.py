"""Spot-level prediction shared by all spot regressors, and the predictions AnnData contract.

Predictions AnnData (``spots_{um}um.h5ad``): ``X`` = predicted log-normalised expression
(float32, dense), ``var_names`` = genes, ``obs_names`` = source spot names, ``obsm["spatial"]``
= (x, y) level-0 pixels, ``obs["diameter_um"]``, ``uns["histomap"]`` = the sample geometry
(:mod:`histomap.data.sample`) with ``spot_diameter_um`` set to the predicted scale, plus ``model``
(name, config, ...), and ``uns["spatial"]``: the source table's H&E in scanpy's convention with
this table's spot diameter (:mod:`histomap.data.scanpy_spatial`), so ``sc.pl.spatial`` works.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import DataLoader, Dataset

from histomap.compat import torch
from histomap.data.sample import UNS_KEY
from histomap.data.scanpy_spatial import carry_scanpy_spatial
from histomap.logs import progress
from histomap.training.device import amp_dtype, autocast, resolve_device

log = logging.getLogger(__name__)


def predict_spots(model: nn.Module, dataset: Dataset, *, batch_size: int = 64,
                  device: str | torch.device = "auto", amp: bool = True,
                  num_workers: int = 0) -> np.ndarray:
    """Model outputs for every item of ``dataset`` in order: float32 (n, genes).

    Items are input tensors, or tuples whose first element is the input (targets are ignored).
    Eval mode, no gradients, autocast on CUDA.
    """
    device = resolve_device(device)
    dtype = amp_dtype(device, amp)
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    outputs = []
    with torch.no_grad():
        for batch in progress(loader, "predict", "batches", logger=log):
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            with autocast(device, dtype):
                pred = model(inputs.to(device, non_blocking=True))
            outputs.append(pred.float().cpu().numpy())
    if not outputs:
        raise ValueError("the prediction dataset is empty")
    pred = np.concatenate(outputs).astype(np.float32, copy=False)
    n_bad = int((~np.isfinite(pred)).any(axis=1).sum())
    if n_bad:
        log.warning("%d of %d spots have non-finite predictions", n_bad, len(pred))
    return pred


def h5ad_value(value):
    """Make a metadata value writable to h5ad (which has no None): None -> "" ."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return {str(k): h5ad_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [h5ad_value(v) for v in value]
    return value


def spots_prediction_anndata(pred: np.ndarray, obs_names: Sequence[str], genes: Sequence[str],
                             spatial_px: np.ndarray, geometry: Mapping,
                             diameter_um: float | np.ndarray, *,
                             model_info: Mapping | None = None,
                             scanpy_uns: Mapping | None = None) -> ad.AnnData:
    """Predictions at spots as an AnnData following the contract in the module docstring.

    ``spatial_px``: (n, 2) spot centres (x, y) in level-0 pixels; ``geometry``: the source
    ``uns["histomap"]`` dict (sample, platform, mpp, image, ...); ``diameter_um``: the predicted
    spot scale (scalar or per spot); ``model_info``: e.g. dict(name, config, fold) stored as
    ``uns["histomap"]["model"]`` (None values become ""); ``scanpy_uns``: the source table's
    ``uns["spatial"]`` (scanpy's H&E and scale factors), carried with this table's diameter.
    """
    pred = np.asarray(pred, dtype=np.float32)
    obs_names = pd.Index([str(n) for n in obs_names])
    genes = pd.Index([str(g) for g in genes])
    spatial = np.asarray(spatial_px, dtype=np.float64)
    n = len(obs_names)
    if pred.shape != (n, len(genes)):
        raise ValueError(f"predictions {pred.shape} do not match {n} spots x {len(genes)} genes")
    if spatial.shape != (n, 2):
        raise ValueError(f"spatial_px must be ({n}, 2) level-0 pixels, got {spatial.shape}")
    if obs_names.has_duplicates or genes.has_duplicates:
        raise ValueError("spot names and gene names must be unique")
    diameter = np.broadcast_to(np.asarray(diameter_um, dtype=np.float64), (n,)).copy()
    adata = ad.AnnData(X=pred, obs=pd.DataFrame({"diameter_um": diameter}, index=obs_names),
                       var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = spatial
    uns = dict(geometry)
    if np.ndim(diameter_um) == 0:
        uns["spot_diameter_um"] = float(diameter_um)
    else:
        uns["spot_diameter_um"] = float(np.median(diameter)) if n else float("nan")
        log.info("per-spot diameters: uns spot_diameter_um is their median")
    if model_info is not None:
        uns["model"] = dict(model_info)
    adata.uns[UNS_KEY] = h5ad_value(uns)
    if scanpy_uns:
        carry_scanpy_spatial(adata, scanpy_uns, spot_diameter_um=uns["spot_diameter_um"],
                             mpp=float(geometry["mpp"]))
    else:  # every prediction table is made here: one without the H&E says so in the log
        log.warning("%s predictions have no source uns['spatial']: no H&E for scanpy "
                    "(pass the source table's uns['spatial'] as scanpy_uns)",
                    uns.get("sample", "the"))
    return adata
