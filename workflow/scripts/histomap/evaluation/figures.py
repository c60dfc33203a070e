"""Benchmark figures: predicted vs measured expression maps and per-gene PCC distributions.

Arrow: metrics / predictions -> **figures** (the ``figures`` and ``benchmark_tables`` rules).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.evaluation.metrics import POOLED, pearson_per_gene
from histomap.evaluation.report import _fmt

log = logging.getLogger(__name__)


def _atomic_savefig(fig, out_png: str | Path) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        row[0].annotate(f"{gene}: PCC = {_fmt(r, digits=3)}", xy=(0, 1.12),
                        xycoords="axes fraction", fontsize=11, fontweight="bold")
    _atomic_savefig(fig, out_png)
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
    _atomic_savefig(fig, out_png)
    plt.close(fig)
