"""Super-resolution metrics: predicted HR maps against the measured HR maps.

Arrow: HR maps -> **metrics** (rule ``evaluate_sr``). Per (patch, gene), over the patch's
tissue pixels: ``rmse`` and signed ``pcc`` in the model's units and in counts (the PCC rule of
:func:`histomap.evaluation.metrics.pearson_per_gene`), and the sums that the run-level ratios
pool (:func:`ratio_summaries`):

- ``edge_error_ratio``: RMSE over the outer :data:`EDGE_PX` HR pixels of every patch divided by
  the RMSE inside them (model units; 1 = no patch-border artefact; the target is <= 1.1);
- ``mass_ratio``: predicted over measured counts summed over the tissue pixels (the predicted /
  truth mean count; the target is within 5% of 1);
- ``spearman_std_error`` (diffusion methods, K > 1 samples): per patch, the Spearman correlation
  of the per-pixel std of the samples with the absolute error of their mean, over the tissue
  pixels of every gene; and a calibration table, the error by std decile
  (:func:`calibration_table`).

Maps predicted with the mass projection (:class:`histomap.tasks.superres.prediction.MassProjection`)
are scored twice, ``mass_projection`` True (the maps as delivered) and False (as sampled).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histomap.data.srmaps import read_sr_maps
from histomap.data.srpairs import pairs_denormaliser, read_sr_pairs, retarget_log1p
from histomap.errors import InputError
from histomap.evaluation.metrics import pearson_per_gene
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

SR_METRIC_COLUMNS = {"rmse": "RMSE", "pcc": "PCC", "rmse_counts": "RMSE_counts",
                     "pcc_counts": "PCC_counts", "spearman_std_error": "Spearman_std_error"}
# per (patch, gene) sums pooled over every patch of a run into ratios (ratio_summaries)
SR_SUM_COLUMNS = ("sse_edge", "n_edge", "sse_inner", "n_inner", "pred_sum_counts",
                  "truth_sum_counts")
EDGE_PX = 2  # outer HR pixels of a patch scored apart (the patch-border artefact)
N_STD_BINS = 10  # deciles of the calibration table


def patch_gene_metrics(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """(RMSE (G,), signed PCC (G,), n pixels) of one patch over its tissue pixels.

    PCC follows :func:`pearson_per_gene`: NaN (left out for every method, counted in
    ``n_nan_pcc``) for a gene constant over the tissue in the truth or with fewer than two
    pixels; 0 for a gene whose prediction is constant there (never abs()-ed)."""
    mask = np.asarray(mask, bool)
    t = np.asarray(truth, np.float64)[:, mask].T
    p = np.asarray(pred, np.float64)[:, mask].T
    if len(t) == 0:
        return np.full(truth.shape[0], np.nan), np.full(truth.shape[0], np.nan), 0
    rmse = np.sqrt(((p - t) ** 2).mean(axis=0))
    return rmse, pearson_per_gene(t, p), len(t)


def edge_band(hw: Sequence[int], width: int = EDGE_PX) -> np.ndarray:
    """(H, W) bool: the outer ``width`` pixels of a patch on each side."""
    band = np.ones(tuple(int(v) for v in hw), bool)
    band[width:-width, width:-width] = False
    return band


def border_errors(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                  width: int = EDGE_PX) -> dict[str, np.ndarray]:
    """Per gene: squared-error sums and pixel counts over the tissue pixels of the outer
    ``width`` pixels of the patch (``sse_edge``, ``n_edge``) and of the rest (``sse_inner``,
    ``n_inner``)."""
    mask = np.asarray(mask, bool)
    band = edge_band(mask.shape, width)
    sq = (np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2
    g = sq.shape[0]
    return {"sse_edge": sq[:, mask & band].sum(axis=1),
            "n_edge": np.full(g, int((mask & band).sum())),
            "sse_inner": sq[:, mask & ~band].sum(axis=1),
            "n_inner": np.full(g, int((mask & ~band).sum()))}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant
    or has fewer than two values."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra = pd.Series(a).rank(method="average").to_numpy()
    rb = pd.Series(b).rank(method="average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def calibration_table(std: np.ndarray, abs_error: np.ndarray,
                      n_bins: int = N_STD_BINS) -> pd.DataFrame:
    """Error by std decile: the (pixel, gene) pairs ranked by the samples' std (ties in input
    order) and cut into ``n_bins`` equal-count bins; per bin its std range and mean, the mean
    absolute error and the RMSE of the mean map, and the number of pairs. A calibrated std has
    the error rising with the decile."""
    std, err = np.asarray(std, np.float64).ravel(), np.asarray(abs_error, np.float64).ravel()
    if std.shape != err.shape:
        raise ValueError("std and abs_error must have the same number of values")
    if std.size == 0:
        return pd.DataFrame(columns=["std_decile", "std_min", "std_max", "mean_std",
                                     "mean_abs_error", "rmse", "n"])
    order = np.argsort(std, kind="stable")
    bins = np.empty(std.size, np.int64)
    bins[order] = np.arange(std.size) * n_bins // std.size
    frame = pd.DataFrame({"std_decile": bins + 1, "std": std, "err": err})
    out = frame.groupby("std_decile").agg(std_min=("std", "min"), std_max=("std", "max"),
                                          mean_std=("std", "mean"),
                                          mean_abs_error=("err", "mean"),
                                          rmse=("err", lambda e: float(np.sqrt((e ** 2).mean()))),
                                          n=("err", "size"))
    return out.reset_index()


def _patch_rows(truth, truth_counts, pred, pred_counts, mask, std=None) -> dict:
    """The per-gene columns of one patch (module docstring); ``std``: the samples' std map."""
    rmse, pcc, n_px = patch_gene_metrics(truth, pred, mask)
    rmse_c, pcc_c, _ = patch_gene_metrics(truth_counts, pred_counts, mask)
    g = truth.shape[0]
    rho = float("nan")
    if std is not None:
        rho = spearman(np.asarray(std)[:, mask], np.abs(pred - truth)[:, mask])
    return {"n_pixels": n_px, "rmse": rmse, "pcc": pcc, "rmse_counts": rmse_c,
            "pcc_counts": pcc_c, "spearman_std_error": np.full(g, rho),
            **border_errors(truth, pred, mask),
            "pred_sum_counts": np.asarray(pred_counts, np.float64)[:, mask].sum(axis=1),
            "truth_sum_counts": np.asarray(truth_counts, np.float64)[:, mask].sum(axis=1)}


def _map_variants(maps, m_attrs) -> list[tuple[bool, str, str]]:
    """(mass_projection, normalised array, counts array) of the maps to score."""
    projected = bool(m_attrs.get("mass_projection", False))
    variants = [(projected, "pred", "pred_counts")]
    if projected and "pred_raw" in maps:
        variants.append((False, "pred_raw", "pred_counts_raw"))
    return variants


def evaluate_maps(pairs_zarr: str | Path, maps_zarr: str | Path,
                  pixels: list | None = None) -> pd.DataFrame:
    """Per (mass_projection, patch, gene) rows: n_pixels, rmse, pcc (in the model's units: the
    pairs' normalisation, log1p re-expressed with the model's training target sum, attr
    ``target_sum`` of the maps), rmse_counts, pcc_counts (the measured HR counts against the
    prediction's counts, which the predictor derived from the LR patch only),
    spearman_std_error and the sums of :data:`SR_SUM_COLUMNS`. ``pixels``: a list that gets
    (std, |error|) of every tissue pixel and gene of the maps as delivered (diffusion maps)."""
    pairs, p_attrs = read_sr_pairs(pairs_zarr, lazy=True)
    maps, m_attrs = read_sr_maps(maps_zarr)
    genes = list(p_attrs["genes"])
    if list(m_attrs["genes"]) != genes or maps["pred"].shape != pairs["hr"].shape:
        raise InputError(maps_zarr, f"maps do not match the pairs {pairs_zarr} (genes or shape)")
    if m_attrs.get("normalisation", p_attrs["normalisation"]) != p_attrs["normalisation"]:
        raise InputError(maps_zarr, f"maps are in {m_attrs.get('normalisation')!r} units, the "
                                    f"pairs {pairs_zarr} in {p_attrs['normalisation']!r}")
    to_counts = pairs_denormaliser(pairs, p_attrs)
    target_sum = m_attrs.get("target_sum")
    retarget = p_attrs["normalisation"] == "log1p"
    if retarget and target_sum is None:
        raise InputError(maps_zarr, "log1p maps without the model's training target_sum: the "
                                    "truth cannot be put in the model's units")
    rows = []
    for i in range(pairs["hr"].shape[0]):
        stored = np.asarray(pairs["hr"][i], np.float64)
        truth = retarget_log1p(stored, float(p_attrs["hr_target_sum"]), float(target_sum)) \
            if retarget else stored
        truth_counts = to_counts(stored, i)
        mask = np.asarray(pairs["mask"][i], bool)
        std = np.asarray(maps["pred_std"][i], np.float64) if "pred_std" in maps else None
        for k, (projected, name, counts_name) in enumerate(_map_variants(maps, m_attrs)):
            pred = np.asarray(maps[name][i], np.float64)
            cols = _patch_rows(truth, truth_counts, pred, maps[counts_name][i], mask, std)
            rows.append(pd.DataFrame({"mass_projection": projected, "patch": i, "gene": genes,
                                      **cols}))
            if k == 0 and pixels is not None and std is not None:
                pixels.append((std[:, mask].ravel(), np.abs(pred - truth)[:, mask].ravel()))
    return pd.concat(rows, ignore_index=True)


def _group_keys(per_gene: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """``keys`` plus the columns no summary may pool over: ``mass_projection``, ``fold_kind``."""
    return [*keys, *[c for c in ("mass_projection", "fold_kind")
                     if c in per_gene.columns and c not in keys]]


def patch_means(per_gene: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per patch (``keys`` + mass_projection, fold_kind, fold, sample, patch where present):
    mean over genes of each metric (NaN PCCs, genes constant in the truth, skipped and counted
    in ``n_nan_pcc``, the others in ``n_pcc_scored``; a patch with no defined PCC has PCC
    NaN)."""
    keys = _group_keys(per_gene, keys)
    by = [*keys, *[c for c in ("fold", "sample") if c in per_gene.columns and c not in keys],
          "patch"]
    grouped = per_gene.groupby(by, sort=False, observed=True)
    columns = [c for c in SR_METRIC_COLUMNS if c in per_gene.columns]
    out = grouped[columns].mean()  # pandas mean skips NaN
    out["n_genes"] = grouped["gene"].size()
    out["n_nan_pcc"] = grouped["pcc"].apply(lambda s: int(s.isna().sum()))
    out["n_pcc_scored"] = out["n_genes"] - out["n_nan_pcc"]
    return out.reset_index()


def summarise_sr(per_gene: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Diff-ST Table-1 summary per ``keys`` (+ mass_projection and fold_kind where present):
    each metric averaged per patch over genes, then over patches; ``n_patches``,
    ``n_pcc_scored`` (patch-gene pairs with a PCC), ``n_nan_pcc`` (patch-gene pairs left out
    because the truth is constant over the patch's tissue) and ``n_nan_patches`` (patches
    without any defined PCC) alongside; then the pooled ratios (:func:`ratio_summaries`)."""
    keys = _group_keys(per_gene, keys)
    patches = patch_means(per_gene, keys)
    rows = []
    for key, part in patches.groupby(list(keys), sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        for column, metric in SR_METRIC_COLUMNS.items():
            if column not in part.columns:
                continue
            if column == "spearman_std_error" and part[column].isna().all():
                continue  # a method without K samples has no std to score
            rows.append({**dict(zip(keys, key)), "metric": metric,
                         "value": float(part[column].mean()),
                         "n_patches": int(part[column].notna().sum()),
                         "n_pcc_scored": int(part["n_pcc_scored"].sum()),
                         "n_nan_pcc": int(part["n_nan_pcc"].sum()),
                         "n_nan_patches": int(part["pcc"].isna().sum())})
    return pd.concat([pd.DataFrame(rows), ratio_summaries(per_gene, keys)], ignore_index=True)


def ratio_summaries(per_gene: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per ``keys``: ``edge_error_ratio`` (RMSE of the outer :data:`EDGE_PX` pixels of every
    patch / RMSE inside, pooled over patches and genes) and ``mass_ratio`` (predicted / measured
    counts over the tissue pixels); empty without the sums (metrics written before them)."""
    if not set(SR_SUM_COLUMNS) <= set(per_gene.columns):
        return pd.DataFrame()
    rows = []
    for key, part in per_gene.groupby(list(keys), sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        sums = part[list(SR_SUM_COLUMNS)].sum()
        edge = np.sqrt(sums["sse_edge"] / sums["n_edge"]) if sums["n_edge"] else np.nan
        inner = np.sqrt(sums["sse_inner"] / sums["n_inner"]) if sums["n_inner"] else np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            values = {"edge_error_ratio": float(np.divide(edge, inner)),
                      "mass_ratio": float(np.divide(sums["pred_sum_counts"],
                                                    sums["truth_sum_counts"]))}
        n_patches = int(part.drop_duplicates([c for c in ("fold", "sample", "patch")
                                              if c in part.columns]).shape[0])
        for metric, value in values.items():
            rows.append({**dict(zip(keys, key)), "metric": metric, "value": value,
                         "n_patches": n_patches, "n_pcc_scored": 0, "n_nan_pcc": 0,
                         "n_nan_patches": 0})
    return pd.DataFrame(rows)


def evaluate_sr(pairs_zarrs: Sequence[str | Path], maps_zarrs: Sequence[str | Path],
                out_parquet: str | Path, out_summary: str | Path, *, method: str, scale: int,
                dataset: str, samples: Sequence[str], folds: Sequence[str],
                fold_kinds: Sequence[str] | None = None,
                out_calibration: str | Path | None = None) -> pd.DataFrame:
    """Score the predicted maps of the test samples of every fold (``samples[i]`` held out by
    ``folds[i]``, of kind ``fold_kinds[i]``: cross_patient, within_patient or mixed, scored
    from ``pairs_zarrs[i]`` and ``maps_zarrs[i]``): per-(mass_projection, patch, gene) parquet
    (columns dataset, method, scale, normalisation, fold, [fold_kind,] sample, patch, gene and
    those of :func:`evaluate_maps`, plus per sample ``dropped_patches``: patches of the section
    left out of the pairs for too little tissue, and ``uses_lr_map``: whether the method reads
    the LR map) and the Table-1 summary CSV (:func:`summarise_sr`) per fold and over all folds
    of one kind (``fold == "all"``; kinds are never pooled). ``out_calibration``: the error by
    std decile of the maps as delivered (:func:`calibration_table`, per fold kind; empty for a
    method without samples' std). Returns the summary."""
    n = len(samples)
    if not n or not (len(pairs_zarrs) == len(maps_zarrs) == len(folds) == n):
        raise ValueError("need one pairs zarr, one maps zarr and one fold per test sample")
    kinds = list(fold_kinds) if fold_kinds is not None else None
    if kinds is not None and len(kinds) != n:
        raise ValueError("need one fold kind per test sample")
    parts, calibration = [], []
    for k, (fold, sample, pairs, maps) in enumerate(zip(folds, samples, pairs_zarrs,
                                                        maps_zarrs)):
        pixels: list = []
        table = evaluate_maps(pairs, maps, pixels)
        table.insert(0, "sample", sample)
        if kinds is not None:
            table.insert(0, "fold_kind", str(kinds[k]))
        table.insert(0, "fold", str(fold))
        p_attrs = read_sr_pairs(pairs, lazy=True)[1]
        m_attrs = read_sr_maps(maps)[1]
        table["normalisation"] = str(p_attrs["normalisation"])
        table["dropped_patches"] = int(p_attrs.get("n_patches_dropped", 0))
        table["uses_lr_map"] = bool(m_attrs.get("uses_lr_map", True))
        parts.append(table)
        calibration += [(kinds[k] if kinds is not None else "all", *p) for p in pixels]
    per_gene = pd.concat(parts, ignore_index=True)
    for col, value in (("scale", int(scale)), ("method", method), ("dataset", dataset)):
        per_gene.insert(0, col, value)
    n_nan = int(per_gene["pcc"].isna().sum())
    if n_nan:
        log.warning("%s %dx: %d of %d patch-gene PCCs are undefined (gene constant over the "
                    "patch's tissue in the truth); they are excluded from the "
                    "per-patch means and counted in n_nan_pcc", method, int(scale), n_nan,
                    len(per_gene))
    keys = ["dataset", "method", "scale"]
    summary = pd.concat([summarise_sr(per_gene, [*keys, "fold"]),
                         summarise_sr(per_gene.assign(fold="all"), [*keys, "fold"])],
                        ignore_index=True)
    with atomic_output(out_parquet) as tmp:
        per_gene.to_parquet(tmp, index=False)
    with atomic_output(out_summary) as tmp:
        summary.to_csv(tmp, index=False)
    if out_calibration is not None:
        write_calibration(calibration, out_calibration, method=method, scale=int(scale),
                          dataset=dataset)
    for row in summary[summary["metric"].isin(["RMSE", "PCC"])].itertuples(index=False):
        log.info("%s %dx fold %s: %s %.4f over %d patches", method, int(scale), row.fold,
                 row.metric, row.value, row.n_patches)
    return summary


def write_calibration(pixels: Sequence[tuple], out_csv: str | Path, *, method: str,
                      scale: int, dataset: str) -> pd.DataFrame:
    """The calibration table (:func:`calibration_table`) of (fold_kind, std, |error|) pixel
    arrays, one per fold kind, with the Spearman correlation of std and |error| over all of
    them; written as CSV (header only without pixels)."""
    frames = []
    for kind in dict.fromkeys(p[0] for p in pixels):
        std = np.concatenate([p[1] for p in pixels if p[0] == kind])
        err = np.concatenate([p[2] for p in pixels if p[0] == kind])
        table = calibration_table(std, err)
        table.insert(0, "spearman_all_pixels", spearman(std, err))
        table.insert(0, "fold_kind", kind)
        frames.append(table)
    out = (pd.concat(frames, ignore_index=True) if frames else
           calibration_table(np.zeros(0), np.zeros(0)).assign(fold_kind=[], spearman_all_pixels=[]))
    for col, value in (("scale", int(scale)), ("method", method), ("dataset", dataset)):
        out.insert(0, col, value)
    with atomic_output(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    return out
