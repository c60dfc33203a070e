"""Evaluation metrics of predicted gene expression against measured expression.

Arrow: spots or bins at any scale -> **metrics** (the ``evaluate`` and ``evaluate_cross_scale``
rules; the super-resolution maps' metrics, rule ``evaluate_sr``, are
:mod:`histomap.evaluation.srmetrics`).

Per gene (columns of (n_spots, n_genes) matrices): ``pcc`` (ordinary *signed* Pearson
correlation), ``mse``, ``mae`` and ``n_spots`` (how many spots or bins it was scored on).
The PCC rule is the same for every method: a gene whose measured expression is constant (or
that has fewer than two spots) has no PCC (NaN) and is left out of the PCC summaries of every
method alike; a gene whose *prediction* is constant (up to float32 rounding) or not finite
scores PCC 0, so a flat prediction never helps a method.
Summaries (:func:`summarise`), as in the spot-prediction papers: ``PCC@F``, ``PCC@S``, ``PCC@M``
= first quartile, median, mean of per-gene PCC over the scored genes; ``n_genes_scored`` = genes
with a PCC; ``n_constant_truth`` = genes left out because the truth is constant (both are
reported, never hidden); ``MSE``, ``MAE`` = mean over all genes of the per-gene values;
``n_spots_scored`` = the spots or bins scored (the truth's: every model of a table column is
scored on the same set, so the count must agree between models,
:func:`histomap.evaluation.report.check_same_spots`).

Tables are long: one row per (keys..., gene, metric) with a ``value`` column, so every scale,
sample and model stacks into the benchmark table. :func:`evaluate_predictions` scores each slide
and the pool of all test spots (``sample == "pooled"``); :func:`aggregate_over_slides` averages
per-slide summaries ("computed per slide and averaged").
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.sample import UNS_KEY
from histomap.errors import InputError

log = logging.getLogger(__name__)

GENE_METRICS = ("pcc", "mse", "mae", "n_spots")
SUMMARY_METRICS = ("PCC@F", "PCC@S", "PCC@M", "n_genes_scored", "n_constant_truth", "MSE", "MAE",
                   "n_spots_scored")
# totalled, not averaged, over slides
COUNT_METRICS = ("n_genes_scored", "n_constant_truth", "n_spots_scored")
# a prediction column whose range is within this fraction of its magnitude is constant (float32
# rounding): its PCC would be noise, so it scores 0
FLAT_TOLERANCE = 4 * float(np.finfo(np.float32).eps)
POOLED = "pooled"
_LONG = ("gene", "metric", "value")


# --------------------------------------------------------------------------- per gene
def _paired(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(f"expected two (n_spots, n_genes) arrays of the same shape, got "
                         f"{y_true.shape} and {y_pred.shape}")
    return y_true, y_pred


def pearson_per_gene(y_true, y_pred) -> np.ndarray:
    """Signed Pearson correlation of each column pair, shape (n_genes,).

    NaN where the truth column is constant or not finite, or with fewer than two spots (no PCC:
    the gene is left out for every method); 0 where the prediction column is constant (up to
    float32 rounding, :data:`FLAT_TOLERANCE`) or has a non-finite value (a flat or broken
    prediction scores 0, it is never dropped).
    """
    y_true, y_pred = _paired(y_true, y_pred)
    n_genes = y_true.shape[1]
    if y_true.shape[0] < 2:
        return np.full(n_genes, np.nan)
    no_truth = (y_true == y_true[:1]).all(axis=0) | ~np.isfinite(y_true).all(axis=0)
    finite_pred = np.isfinite(y_pred).all(axis=0)
    with np.errstate(invalid="ignore"):
        spread = np.ptp(y_pred, axis=0)
        scale = np.abs(y_pred).max(axis=0)
    flat = ~finite_pred | (spread <= FLAT_TOLERANCE * scale)
    a = y_true - y_true.mean(axis=0)
    b = y_pred - y_pred.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # scale by the largest deviation first so tiny or huge values neither under- nor overflow
        a /= np.abs(a).max(axis=0)
        b /= np.abs(b).max(axis=0)
        r = (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    r = np.clip(r, -1.0, 1.0)
    r[flat] = 0.0
    r[no_truth] = np.nan
    return r


def gene_metrics(y_true, y_pred, genes: Sequence[str]) -> pd.DataFrame:
    """Long table (gene, metric, value) of pcc, mse, mae and n_spots (the rows scored) for
    every gene (column)."""
    y_true, y_pred = _paired(y_true, y_pred)
    genes = [str(g) for g in genes]
    if len(genes) != y_true.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {y_true.shape[1]} columns")
    err = y_pred - y_true
    values = {"pcc": pearson_per_gene(y_true, y_pred),
              "mse": (err ** 2).mean(axis=0),
              "mae": np.abs(err).mean(axis=0),
              "n_spots": np.full(len(genes), float(y_true.shape[0]))}
    return pd.DataFrame({
        "gene": np.tile(genes, len(GENE_METRICS)),
        "metric": np.repeat(GENE_METRICS, len(genes)),
        "value": np.concatenate([values[m] for m in GENE_METRICS]),
    })


def mse_decomposition(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's MSE split as ``offset + spatial`` (both (n_genes,)): ``offset`` the squared
    difference of the means over the spots (a level the model gets wrong everywhere alike, e.g.
    a patient's expression level), ``spatial`` the mean squared error of the centred columns (the
    spot-to-spot pattern; population variance of the error, so the two add up to the MSE)."""
    y_true, y_pred = _paired(y_true, y_pred)
    err = y_pred - y_true
    mean = err.mean(axis=0)
    return mean ** 2, ((err - mean) ** 2).mean(axis=0)


# --------------------------------------------------------------------------- summaries
def _summary_values(rows: pd.DataFrame) -> dict[str, float]:
    by_metric = {m: rows.loc[rows["metric"] == m, "value"].to_numpy(dtype=np.float64)
                 for m in GENE_METRICS}
    out: dict[str, float] = {}
    pcc = by_metric["pcc"]
    if pcc.size:
        scored = pcc[~np.isnan(pcc)]
        some = scored.size > 0
        out["PCC@F"] = float(np.quantile(scored, 0.25)) if some else np.nan
        out["PCC@S"] = float(np.median(scored)) if some else np.nan
        out["PCC@M"] = float(np.mean(scored)) if some else np.nan
        out["n_genes_scored"] = float(scored.size)
        out["n_constant_truth"] = float(pcc.size - scored.size)
    if by_metric["mse"].size:
        out["MSE"] = float(np.mean(by_metric["mse"]))
    if by_metric["mae"].size:
        out["MAE"] = float(np.mean(by_metric["mae"]))
    if by_metric["n_spots"].size:
        out["n_spots_scored"] = float(np.max(by_metric["n_spots"]))
    return out


def summarise(per_gene: pd.DataFrame) -> pd.DataFrame:
    """Summaries (PCC@F/S/M, n_genes_scored, n_constant_truth, MSE, MAE) of a long per-gene
    table.

    Every column other than gene/metric/value (e.g. sample, model, scale_um) is a key: one set
    of summaries per key combination. Returns a long table (keys..., metric, value).
    """
    missing = [c for c in _LONG if c not in per_gene.columns]
    if missing:
        raise ValueError(f"per-gene table lacks columns {missing}")
    keys = [c for c in per_gene.columns if c not in _LONG]
    if per_gene.duplicated(keys + ["gene", "metric"]).any():
        raise ValueError("per-gene table has duplicated (keys, gene, metric) rows")
    groups = per_gene.groupby(keys, sort=False, dropna=False) if keys else [((), per_gene)]
    records = []
    for key, rows in groups:
        key = key if isinstance(key, tuple) else (key,)
        n_dropped = 0.0
        for metric, value in _summary_values(rows).items():
            records.append({**dict(zip(keys, key)), "metric": metric, "value": value})
            n_dropped = value if metric == "n_constant_truth" else n_dropped
        if n_dropped:
            log.info("%s: %d genes are constant in the truth and left out of the PCC summaries",
                     dict(zip(keys, key)) or "all", int(n_dropped))
    return pd.DataFrame.from_records(records, columns=keys + ["metric", "value"])


def aggregate_over_slides(summary_per_slide: pd.DataFrame) -> pd.DataFrame:
    """Average per-slide summaries over slides ("computed per slide and averaged").

    Rows with ``sample == "pooled"`` are ignored. The counts (``n_genes_scored``,
    ``n_constant_truth``: gene-slide pairs; ``n_spots_scored``) are summed; every other metric
    is the plain mean
    over slides, a NaN slide giving NaN.
    Returns a long table (keys without sample..., metric, value).
    """
    if "sample" not in summary_per_slide.columns:
        raise ValueError("summary table lacks a 'sample' column")
    slides = summary_per_slide[summary_per_slide["sample"] != POOLED]
    keys = [c for c in slides.columns if c not in ("sample", "value")]
    if slides.empty:
        return pd.DataFrame(columns=keys + ["value"])
    log.info("averaging summaries over %d slides", slides["sample"].nunique())
    stats = (slides.groupby(keys, sort=False, dropna=False)["value"]
             .agg(mean=lambda v: v.mean(skipna=False), total="sum").reset_index())
    stats["value"] = stats["mean"].where(~stats["metric"].isin(COUNT_METRICS), stats["total"])
    return stats[keys + ["value"]]


# --------------------------------------------------------------------------- slides
def evaluate_matrices(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      genes: Sequence[str]) -> pd.DataFrame:
    """Per-gene metrics per sample and pooled over all samples' spots.

    ``pairs``: sample -> (y_true, y_pred), each (n_spots, n_genes) with columns in ``genes``
    order. Returns a long table (sample, gene, metric, value); the pool of all spots is
    ``sample == "pooled"``.
    """
    if not pairs:
        raise ValueError("no samples to evaluate")
    if POOLED in pairs:
        raise ValueError(f"a sample may not be named {POOLED!r}: the name marks pooled metrics")
    tables = []
    for sample, (y_true, y_pred) in pairs.items():
        tables.append(gene_metrics(y_true, y_pred, genes).assign(sample=sample))
    pooled_true = np.concatenate([np.asarray(t, dtype=np.float64) for t, _ in pairs.values()])
    pooled_pred = np.concatenate([np.asarray(p, dtype=np.float64) for _, p in pairs.values()])
    tables.append(gene_metrics(pooled_true, pooled_pred, genes).assign(sample=POOLED))
    table = pd.concat(tables, ignore_index=True)
    return table[["sample", "gene", "metric", "value"]]


def _dense(adata: ad.AnnData) -> np.ndarray:
    x = adata.X
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def align_prediction(truth: ad.AnnData, pred: ad.AnnData, genes: Sequence[str], *,
                     sample: str, truth_path: str | Path = "truth",
                     pred_path: str | Path = "prediction") -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) float64 (n_truth_spots, n_genes) aligned by obs_names and var_names.

    Every truth spot and every gene must be in the prediction (InputError otherwise);
    prediction-only spots are logged and ignored.
    """
    genes = list(genes)
    for adata, path, what in ((truth, truth_path, "truth"), (pred, pred_path, "prediction")):
        if not adata.obs_names.is_unique:
            raise InputError(path, f"sample {sample!r}: {what} has duplicated spot names")
        if not adata.var_names.is_unique:
            raise InputError(path, f"sample {sample!r}: {what} has duplicated gene names")
        present = set(adata.var_names)
        absent = [g for g in genes if g not in present]
        if absent:
            raise InputError(path, f"sample {sample!r}: {what} lacks {len(absent)} evaluated "
                                   f"gene(s): {', '.join(absent[:20])}"
                                   + (" ..." if len(absent) > 20 else ""))
    in_pred = pred.obs_names.isin(truth.obs_names)
    missing = truth.obs_names[~truth.obs_names.isin(pred.obs_names)]
    if len(missing):
        raise InputError(pred_path, f"sample {sample!r}: prediction lacks {len(missing)} of "
                                    f"{truth.n_obs} truth spots: {', '.join(missing[:10])}"
                                    + (" ..." if len(missing) > 10 else ""))
    if (~in_pred).any():
        log.info("%s: sample %r: %d predicted spots have no truth and are not scored: %s",
                 pred_path, sample, int((~in_pred).sum()),
                 ", ".join(pred.obs_names[~in_pred][:20]))
    if UNS_KEY not in truth.uns or "normalisation" not in truth.uns[UNS_KEY]:
        log.warning("%s: sample %r: truth carries no normalisation record; metrics assume "
                    "log-normalised X", truth_path, sample)
    y_true = _dense(truth[:, genes])
    y_pred = _dense(pred[truth.obs_names, genes])
    n_bad = int((~np.isfinite(y_pred)).sum())
    if n_bad:
        log.warning("%s: sample %r: %d non-finite predicted values (metrics of their genes are "
                    "NaN)", pred_path, sample, n_bad)
    return y_true, y_pred


def evaluate_predictions(truth: Mapping[str, ad.AnnData], pred: Mapping[str, ad.AnnData],
                         genes: Sequence[str] | None = None, *,
                         truth_paths: Mapping[str, str | Path] | None = None,
                         pred_paths: Mapping[str, str | Path] | None = None) -> pd.DataFrame:
    """Score predicted spots against measured spots, per slide and pooled.

    ``truth``: sample -> AnnData with X = log-normalised expression (normalise_spots);
    ``pred``: sample -> AnnData with X = predicted expression on the same scale. Aligned by
    spot (obs_names) and gene (var_names); ``genes`` defaults to the first truth sample's genes.
    Returns a long table (sample, gene, metric, value) including ``sample == "pooled"``.
    """
    truth_paths = truth_paths or {}
    pred_paths = pred_paths or {}
    if not truth:
        raise ValueError("no truth samples to evaluate")
    extra = [s for s in pred if s not in truth]
    if extra:
        log.info("predictions for samples without truth are not scored: %s", ", ".join(extra))
    if genes is None:
        genes = list(next(iter(truth.values())).var_names)
    pairs = {}
    for sample, true_spots in truth.items():
        pred_path = pred_paths.get(sample, f"<prediction of {sample}>")
        if sample not in pred:
            raise InputError(pred_path, f"no prediction for test sample {sample!r}")
        pairs[sample] = align_prediction(
            true_spots, pred[sample], genes, sample=sample, pred_path=pred_path,
            truth_path=truth_paths.get(sample, f"<truth of {sample}>"))
    return evaluate_matrices(pairs, genes)
