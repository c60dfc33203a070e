"""The trivial spot baseline ``mean``: the per-gene mean of the training spots, constant over space.

Arrow: normalised spots (a fold's training samples) -> model (one number per gene) -> spot
predictions. Training pools every spot of the fold's training samples (log-normalised ``X`` of
``results/st/{sample}.h5ad``) and takes each panel gene's mean; nothing of the test fold is
read. Prediction writes that vector at every spot (or disc) asked for, in the spot predictions
AnnData of :func:`histomap.tasks.predict.spots_prediction_anndata`, so the constant is scored
like any model at the samples' own spots and at every cross-scale diameter.

It is the MSE-optimal constant on the training spots: a learned model whose test MSE is not
below it has learned nothing spatial from the H&E. Its PCC is that of a constant prediction.

Model file (``means.tsv``): columns ``gene``, ``mean``; a header comment says how many spots of
which training samples it averages.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.preprocess import expression_matrix
from histomap.data.sample import geometry
from histomap.errors import InputError
from histomap.outputs import atomic_output
from histomap.tasks.predict import spots_prediction_anndata

log = logging.getLogger(__name__)

MODEL_NAME = "mean"


def train_mean(st_paths: Sequence[str | Path], genes: Sequence[str], out_tsv: str | Path
               ) -> pd.Series:
    """Per-gene mean over every spot of the training samples; written to ``out_tsv``."""
    genes = list(genes)
    total = np.zeros(len(genes), dtype=np.float64)
    n_spots = 0
    names = []
    for path in st_paths:
        spots = ad.read_h5ad(path)
        x = expression_matrix(spots, genes, path=path).astype(np.float64)
        if not np.isfinite(x).all():
            raise InputError(path, "non-finite normalised expression")
        total += x.sum(axis=0)
        n_spots += x.shape[0]
        names.append(str(geometry(spots).get("sample", Path(path).stem)))
    if n_spots == 0:
        raise InputError(", ".join(map(str, st_paths)) or "<no training samples>",
                         "no training spots to average")
    means = pd.Series(total / n_spots, index=pd.Index(genes, name="gene"), name="mean")
    with atomic_output(out_tsv) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"# per-gene mean of {n_spots} log-normalised training spots of "
                 f"{', '.join(names)}\n")
        means.reset_index().to_csv(fh, sep="\t", index=False, float_format="%.9g")
    log.info("mean model: %d genes averaged over %d spots of %s", len(genes), n_spots,
             ", ".join(names))
    return means


def read_means(path: str | Path) -> pd.Series:
    """The per-gene means written by :func:`train_mean` (index: genes)."""
    try:
        table = pd.read_csv(path, sep="\t", comment="#")
    except Exception as exc:  # an unreadable file
        raise InputError(path, f"cannot read the mean model ({exc})") from exc
    if list(table.columns) != ["gene", "mean"] or table["gene"].duplicated().any():
        raise InputError(path, "mean model must have unique genes in columns gene, mean")
    return pd.Series(table["mean"].to_numpy(np.float64), index=table["gene"].astype(str))


def predict_mean(means_tsv: str | Path, spots_h5ad: str | Path, out_h5ad: str | Path, *,
                 diameter_um: float | None = None) -> ad.AnnData:
    """The means at every spot of ``spots_h5ad`` (a sample's spots or cross-scale discs), as
    the spot predictions AnnData at ``diameter_um`` (default: the table's own spot size)."""
    means = read_means(means_tsv)
    spots = ad.read_h5ad(spots_h5ad)
    geo = geometry(spots)
    diameter = float(diameter_um if diameter_um is not None else geo["spot_diameter_um"])
    pred = np.broadcast_to(means.to_numpy(np.float32), (spots.n_obs, len(means)))
    out = spots_prediction_anndata(
        pred, spots.obs_names, means.index, spots.obsm["spatial"], geo, diameter,
        model_info={"model": MODEL_NAME, "path": str(means_tsv)},
        scanpy_uns=spots.uns.get("spatial"))
    out_h5ad = Path(out_h5ad)
    out_h5ad.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(out_h5ad)
    return out
