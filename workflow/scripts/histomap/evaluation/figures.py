"""Benchmark figures: predicted vs measured expression maps and per-gene PCC distributions.

Arrow: metrics / predictions -> **figures** (the ``figures`` and ``benchmark_tables`` rules).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.evaluation.metrics import POOLED, pearson_per_gene
from histomap.evaluation.report import format_metric
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)


def save_png(fig, out_png: str | Path) -> None:
    """Save a matplotlib figure as ``out_png`` (120 dpi, tight), atomically."""
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


# --------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _gene_values(spots: ad.AnnData, gene: str) -> np.ndarray:
    col = spots[:, gene].X
    col = col.toarray() if hasattr(col, "toarray") else np.asarray(col)
    return col.ravel().astype(float)


def plot_expression_maps(spots_truth: ad.AnnData, spots_pred: ad.AnnData, genes: Sequence[str],
                         thumbnail: np.ndarray, thumb_downsample: float,
                         out_png: str | Path) -> None:
    """Measured | predicted expression per gene as discs (or square bins) over a slide
    thumbnail.

    Spot centres are ``spots_truth.obsm["spatial"]`` (level-0 px) / ``thumb_downsample``; disc
    radius = ``obs["diameter_um"] / 2 / mpp / thumb_downsample`` thumbnail px, with ``mpp`` from
    ``uns["histomap"]``; rows with ``obs["shape"] == "square"`` are drawn as squares of side
    ``diameter_um``. Spots are matched by name; each panel has its own colour scale and the
    row title gives the gene's PCC over the shared spots.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, Rectangle

    from histomap.data.sample import square_mask

    plt = _pyplot()
    shared = spots_truth.obs_names.intersection(spots_pred.obs_names, sort=False)
    if len(shared) == 0:
        raise ValueError("measured and predicted spots share no spot names")
    for name, spots in (("measured", spots_truth), ("predicted", spots_pred)):
        if len(shared) < spots.n_obs:
            log.warning("%d %s spots have no counterpart and are not drawn",
                        spots.n_obs - len(shared), name)
    truth, pred = spots_truth[shared], spots_pred[shared]
    genes = list(genes)
    missing = [g for g in genes if g not in truth.var_names or g not in pred.var_names]
    if missing:
        log.warning("genes not in both measured and predicted spots, not drawn: %s", missing)
    genes = [g for g in genes if g not in missing]
    if not genes:
        raise ValueError("none of the requested genes is in both measured and predicted spots")

    mpp = float(truth.uns["histomap"]["mpp"])
    xy = np.asarray(truth.obsm["spatial"], float) / thumb_downsample
    radius = np.asarray(truth.obs["diameter_um"], float) / 2.0 / mpp / thumb_downsample
    square = square_mask(truth)
    pad = 2 * float(radius.max())
    h, w = thumbnail.shape[:2]
    x_lim = (max(xy[:, 0].min() - pad, 0), min(xy[:, 0].max() + pad, w))
    y_lim = (min(xy[:, 1].max() + pad, h), max(xy[:, 1].min() - pad, 0))

    fig, axes = plt.subplots(len(genes), 2, figsize=(9, 4.2 * len(genes)), squeeze=False)
    for row, gene in zip(axes, genes):
        values = {"measured": _gene_values(truth, gene), "predicted": _gene_values(pred, gene)}
        r = float(pearson_per_gene(values["measured"][:, None],
                                   values["predicted"][:, None])[0])
        for ax, (kind, v) in zip(row, values.items()):
            ax.imshow(thumbnail, origin="upper")
            discs = PatchCollection([Rectangle((x - rad, y - rad), 2 * rad, 2 * rad) if sq
                                     else Circle((x, y), rad)
                                     for (x, y), rad, sq in zip(xy, radius, square)],
                                    cmap="viridis", alpha=0.85, linewidths=0)
            discs.set_array(v)
            ax.add_collection(discs)
            fig.colorbar(discs, ax=ax, fraction=0.046, pad=0.02)
            ax.set_xlim(*x_lim)
            ax.set_ylim(*y_lim)
            ax.set_title(f"{gene} {kind}")
            ax.set_axis_off()
        row[0].annotate(f"{gene}: PCC = {format_metric(r, digits=3)}", xy=(0, 1.12),
                        xycoords="axes fraction", fontsize=11, fontweight="bold")
    save_png(fig, out_png)
    plt.close(fig)


def plot_pcc_distribution(per_gene_df: pd.DataFrame, out_png: str | Path,
                          sample: str = POOLED) -> None:
    """Box plots of per-gene PCC by model and fold, one panel per task x dataset x scale x set.

    ``per_gene_df`` is the concatenated per-gene metric table (:func:`read_metrics`). Uses the
    ``sample`` rows (default ``pooled``); where a fold has none, all its slides' per-gene PCCs.
    NaN PCCs are not drawn; their count is printed under each box.
    """
    plt = _pyplot()
    pcc = per_gene_df[per_gene_df["metric"] == "pcc"]
    if pcc.empty:
        raise ValueError("per-gene table has no 'pcc' rows")
    panels = list(pcc.groupby(["task", "dataset", "scale_um", "gene_set"], sort=True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.0 * pcc.groupby(
        ["model", "fold"]).ngroups + 2), 4 * len(panels)), squeeze=False)
    for ax, ((task, dataset, scale, gene_set), part) in zip(axes[:, 0], panels):
        data, labels = [], []
        for (model, fold), grp in part.groupby(["model", "fold"], sort=True):
            chosen = grp[grp["sample"] == sample]
            which = sample if not chosen.empty else "slides"
            if chosen.empty:
                chosen = grp[grp["sample"] != POOLED]
            v = chosen["value"].to_numpy(float)
            n_nan = int(np.isnan(v).sum())
            data.append(v[~np.isnan(v)] if n_nan < v.size else np.array([np.nan]))
            labels.append(f"{model}\n{fold} ({which})\nnan={n_nan}")
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("per-gene PCC")
        ax.set_title(f"{task} — {dataset} — {scale:g} µm — {gene_set}")
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


# --------------------------------------------------------------------------- report maps
def shared_colour_range(*arrays: np.ndarray, percentiles=(1.0, 99.0)) -> tuple[float, float]:
    """One colour scale for several arrays that covers each one's percentile range of finite
    values (so that a few spots are not swamped by the many pixels of a map)."""
    ranges = []
    for a in arrays:
        v = np.asarray(a, float).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            ranges.append(np.percentile(v, percentiles))
    if not ranges:
        return 0.0, 1.0
    lo, hi = float(min(r[0] for r in ranges)), float(max(r[1] for r in ranges))
    return lo, hi if hi > lo else lo + 1e-6


def plot_dense_maps(maps: dict[str, np.ndarray], map_box_px: Sequence[float],
                    mask: np.ndarray | None, spots_truth: ad.AnnData, thumbnail: np.ndarray,
                    thumb_downsample: float, out_png: str | Path, *,
                    gene_pcc: dict[str, float] | None = None, title: str = ""
                    ) -> dict[str, tuple[float, float]]:
    """Per gene: the predicted dense map over the H&E | the measured spots over the H&E, both on
    one colour scale (covering the 1st-99th percentiles of both the map pixels in tissue and
    the measured spots).
    Returns each drawn gene's (vmin, vmax) as used by both panels.

    ``maps``: gene -> (h, w) map (any pyramid level); ``map_box_px``: the map's level-0 box
    (x0, y0, width, height); ``mask``: (h, w) tissue mask of that level (pixels outside are
    transparent); spots are drawn as discs of their diameter (``obs["diameter_um"]``).
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    plt = _pyplot()
    genes = [g for g in maps if g in spots_truth.var_names]
    if not genes:
        raise ValueError("none of the map's genes is among the measured spots")
    mpp = float(spots_truth.uns["histomap"]["mpp"])
    xy = np.asarray(spots_truth.obsm["spatial"], float) / thumb_downsample
    radius = np.asarray(spots_truth.obs["diameter_um"], float) / 2.0 / mpp / thumb_downsample
    x0, y0, w0, h0 = (float(v) / thumb_downsample for v in map_box_px)
    extent = (x0, x0 + w0, y0 + h0, y0)
    pad = 2 * float(radius.max()) if len(radius) else 0.0
    x_lim = (min(x0, xy[:, 0].min() - pad), max(x0 + w0, xy[:, 0].max() + pad))
    y_lim = (max(y0 + h0, xy[:, 1].max() + pad), min(y0, xy[:, 1].min() - pad))
    fig, axes = plt.subplots(len(genes), 2, figsize=(9, 4.2 * len(genes)), squeeze=False)
    limits = {}
    for row, gene in zip(axes, genes):
        image = np.asarray(maps[gene], float)
        inside = image if mask is None else np.where(mask > 0, image, np.nan)
        measured = _gene_values(spots_truth, gene)
        vmin, vmax = shared_colour_range(inside, measured)
        row[0].imshow(thumbnail, origin="upper")
        shown = row[0].imshow(inside, extent=extent, origin="upper", cmap="viridis", vmin=vmin,
                              vmax=vmax, alpha=0.8, interpolation="nearest")
        row[1].imshow(thumbnail, origin="upper")
        discs = PatchCollection([Circle((x, y), r) for (x, y), r in zip(xy, radius)],
                                cmap="viridis", alpha=0.85, linewidths=0)
        discs.set_array(measured)
        discs.set_clim(vmin, vmax)
        row[1].add_collection(discs)
        limits[gene] = (shown.get_clim(), discs.get_clim())
        fig.colorbar(shown, ax=list(row), fraction=0.03, pad=0.02, label="log-normalised")
        pcc = "" if not gene_pcc or gene not in gene_pcc else \
            f" (spot PCC {format_metric(gene_pcc[gene], digits=3)})"
        row[0].set_title(f"{gene}: predicted dense map{pcc}")
        row[1].set_title(f"{gene}: measured spots")
        for ax in row:
            ax.set_xlim(*x_lim)
            ax.set_ylim(*y_lim)
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    save_png(fig, out_png)
    plt.close(fig)
    return limits


def plot_sr_panels(panels: Sequence[dict], out_png: str | Path, *, title: str = "") -> None:
    """Super-resolution panels, one row per (patch, gene): H&E | LR | HR truth | prediction |
    uncertainty (std over samples; empty for deterministic methods). LR, truth and prediction
    share one colour scale per row; tissue outside the mask is transparent.

    Each panel dict: ``he`` (H, W, 3) uint8, ``lr``, ``hr``, ``pred`` 2D arrays, ``std`` 2D or
    None, ``mask`` (h, w) bool, ``label`` (e.g. "patch 3, ERBB2"). ``hr`` None in every panel
    (LR-only inputs of an applied sample, no truth): no "HR truth" column.
    """
    plt = _pyplot()
    if not panels:
        raise ValueError("no SR panel to draw")
    truth = any(panel.get("hr") is not None for panel in panels)
    columns = ["H&E", "LR", *(["HR truth"] if truth else []), "prediction", "uncertainty (std)"]
    n_cols = len(columns)
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(3.2 * n_cols, 3.3 * len(panels)),
                             squeeze=False)
    for r, panel in enumerate(panels):
        row = axes[r]
        mask = np.asarray(panel["mask"], bool)
        hr = np.where(mask, panel["hr"], np.nan) if truth else None
        pred = np.where(mask, panel["pred"], np.nan)
        vmin, vmax = shared_colour_range(*[m for m in (panel["lr"], hr, pred) if m is not None])
        row[0].imshow(panel["he"])
        row[1].imshow(panel["lr"], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        if truth:
            row[2].imshow(hr, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        shown = row[n_cols - 2].imshow(pred, cmap="viridis", vmin=vmin, vmax=vmax,
                                       interpolation="nearest")
        fig.colorbar(shown, ax=list(row[1:n_cols - 1]), fraction=0.02, pad=0.01)
        if panel.get("std") is not None:
            std = row[-1].imshow(np.where(mask, panel["std"], np.nan), cmap="magma",
                                 interpolation="nearest")
            fig.colorbar(std, ax=row[-1], fraction=0.046, pad=0.02)
        else:
            row[-1].text(0.5, 0.5, "deterministic\nmethod", ha="center", va="center")
        row[0].set_ylabel(panel["label"])
        for ax, name in zip(row, columns):
            if r == 0:
                ax.set_title(name, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    save_png(fig, out_png)
    plt.close(fig)


def plot_training_curves(logs: dict[str, pd.DataFrame], out_png: str | Path) -> None:
    """Training and validation loss per epoch: one panel per model, one colour per run (e.g.
    fold). ``logs``: "model/run" -> train_log.csv table (epoch, train_loss, val_loss). Models
    without epochs (untrained baselines) are listed, not drawn."""
    plt = _pyplot()
    by_model: dict[str, dict[str, pd.DataFrame]] = {}
    for key, df in logs.items():
        model, _, run = key.partition("/")
        by_model.setdefault(model, {})[run or model] = df
    models = sorted(by_model)
    if not models:
        raise ValueError("no training log to draw")
    n_cols = min(3, len(models))
    n_rows = -(-len(models) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax in axes.ravel()[len(models):]:
        ax.set_axis_off()
    for ax, model in zip(axes.ravel(), models):
        drawn = False
        for i, (run, df) in enumerate(sorted(by_model[model].items())):
            if df.empty or "epoch" not in df:
                continue
            colour = f"C{i % 10}"
            ax.plot(df["epoch"], df["train_loss"], color=colour, marker="o", ms=3,
                    label=f"{run} train")
            if "val_loss" in df and df["val_loss"].notna().any():
                ax.plot(df["epoch"], df["val_loss"], color=colour, ls="--", marker="s", ms=3,
                        label=f"{run} val")
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no training epochs\n(fixed method)", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


def plot_cross_scale(long_df: pd.DataFrame, out_png: str | Path, *, metric: str = "PCC@M",
                     sample: str = "mean_over_slides") -> pd.DataFrame:
    """Cross-scale benchmark: ``metric`` vs spot diameter per model (mean over folds, error
    bars: the spread over folds, or over training seeds when there are several). Returns the
    plotted table (model, scale_um, mean, std)."""
    from histomap.evaluation.report import across_folds

    plt = _pyplot()
    part = long_df[(long_df["task"] == "cross_scale") & (long_df["metric"] == metric)]
    if part.empty:
        raise ValueError(f"no cross_scale {metric} rows in the benchmark table")
    agg = across_folds(part)
    agg = agg[agg["sample"] == sample]
    if agg.empty:
        raise ValueError(f"no cross_scale rows for sample {sample!r}")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for model, rows in agg.groupby("model", sort=True):
        rows = rows.sort_values("scale_um")
        ax.errorbar(rows["scale_um"], rows["mean"], yerr=rows["std"].fillna(0.0), marker="o",
                    capsize=3, label=str(model))
    ax.set_xscale("log")
    ticks = sorted(pd.unique(agg["scale_um"]))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spot diameter (µm)")
    ax.set_ylabel(f"{metric} ({sample.replace('_', ' ')})")
    ax.set_title("Cross-scale: trained at one spot size, scored at every size")
    ax.legend()
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)
    return agg[["model", "scale_um", "mean", "std"]].reset_index(drop=True)


def sr_panels(pairs_zarr: str | Path, maps_zarr: str | Path, *, n_patches: int = 2,
              n_genes: int = 2) -> list[dict]:
    """Panels for :func:`plot_sr_panels` from an SR-pairs zarr and its predicted maps (both in
    the pairs' normalised units): the ``n_patches`` patches with the most tissue, and in each
    the ``n_genes`` genes whose HR truth varies most over the patch's tissue (LR-only inputs,
    no truth: whose LR map varies most over its measured spots; ``hr`` None)."""
    from histomap.data.srmaps import read_sr_maps
    from histomap.data.srpairs import has_truth, read_sr_pairs

    arrays, attrs = read_sr_pairs(pairs_zarr, lazy=True)
    maps, _ = read_sr_maps(maps_zarr)
    genes = list(attrs["genes"])
    truth = has_truth(attrs)
    masks = np.asarray(arrays["mask"][...], bool)
    order = np.argsort(-masks.reshape(len(masks), -1).mean(axis=1), kind="stable")[:n_patches]
    panels = []
    for i in order.tolist():
        hr = np.asarray(arrays["hr"][i], np.float32) if truth else None
        mask = masks[i]
        if truth:
            spread = np.array([np.nanvar(g[mask]) if mask.any() else 0.0 for g in hr])
        else:  # the LR pixels under measured HR pixels
            lr = np.asarray(arrays["lr"][i], np.float32)
            f = int(attrs["scale"])
            lr_mask = mask[::f, ::f][:lr.shape[1], :lr.shape[2]]
            spread = np.array([np.nanvar(g[lr_mask]) if lr_mask.any() else 0.0 for g in lr])
        he = np.asarray(arrays["he"][i])
        he = np.moveaxis(he, 0, -1) if he.shape[0] == 3 else he
        if he.dtype != np.uint8:
            he = np.clip(he * (255.0 if he.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        for g in np.argsort(-spread, kind="stable")[:n_genes].tolist():
            panels.append({
                "he": he, "lr": np.asarray(arrays["lr"][i, g], np.float32),
                "hr": hr[g] if truth else None,
                "pred": np.asarray(maps["pred"][i, g], np.float32),
                "std": np.asarray(maps["pred_std"][i, g], np.float32) if "pred_std" in maps
                else None,
                "mask": mask, "label": f"patch {i}, {genes[g]}"})
    return panels
