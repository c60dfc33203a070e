"""Benchmark tables and figures: per-gene metric files -> long summary table, markdown, PNGs.

Input (the ``evaluate`` contract): ``results/metrics/{task}/{model}/{fold}.parquet``, one row per
gene x sample x scale x metric with columns ``task, dataset, model, fold, sample, scale_um,
gene_set, gene, metric, value`` (optional ``seed``). ``sample`` is a slide name or ``pooled``
(all test spots of the fold concatenated); ``metric`` is a per-gene ``pcc`` (signed Pearson
over spots), ``mse`` or ``mae``.

Output (the ``benchmark_tables`` contract): a long table ``task, dataset, model, fold, sample,
scale_um, gene_set, metric, value`` whose metrics are the per-gene summaries PCC@F / PCC@S /
PCC@M (first quartile, median, mean of per-gene PCC over genes with a defined PCC), n_nan_pcc
(genes whose PCC is undefined, e.g. constant prediction), MSE, MAE (means over genes) and
n_genes, for every slide, for ``pooled``, and for ``mean_over_slides`` (the mean of the per-slide
summaries of one fold; for n_nan_pcc their total). The summaries themselves are
:mod:`histomap.metrics`'s, so evaluation and report cannot disagree.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import InputError
from .metrics import POOLED, aggregate_over_slides, pearson_per_gene, summarise

log = logging.getLogger(__name__)

MEAN_OVER_SLIDES = "mean_over_slides"
INPUT_COLUMNS = ["task", "dataset", "model", "fold", "sample", "scale_um", "gene_set", "gene",
                 "metric", "value"]
LONG_COLUMNS = ["task", "dataset", "model", "fold", "sample", "scale_um", "gene_set", "metric",
                "value"]
SUMMARY_METRICS = ["MSE", "MAE", "PCC@F", "PCC@S", "PCC@M", "n_nan_pcc", "n_genes"]
TABLE_METRICS = ["MSE", "MAE", "PCC@F", "PCC@S", "PCC@M"]


# --------------------------------------------------------------------------- reading inputs
def read_metrics(metric_files: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate per-fold per-gene metric parquet files, checking the contract's columns."""
    frames = []
    for path in metric_files:
        path = Path(path)
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # unreadable or not parquet
            raise InputError(path, f"cannot read metrics parquet ({exc})") from exc
        missing = [c for c in INPUT_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(path, f"metrics table lacks columns {missing} "
                                   f"(has {list(df.columns)})")
        if "pcc" not in set(df["metric"]):
            raise InputError(path, "metrics table has no 'pcc' rows")
        frames.append(df)
    if not frames:
        raise InputError("<metric files>", "no metric files given")
    metrics = pd.concat(frames, ignore_index=True)
    if "seed" not in metrics.columns:
        return metrics[INPUT_COLUMNS]
    return metrics[INPUT_COLUMNS + ["seed"]]


def _key_columns(df: pd.DataFrame, with_sample: bool = True) -> list[str]:
    keys = ["task", "dataset", "model", "fold"]
    if "seed" in df.columns:
        keys.append("seed")
    if with_sample:
        keys.append("sample")
    return keys + ["scale_um", "gene_set"]


# --------------------------------------------------------------------------- summaries
def _n_genes(metrics: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Number of genes with a PCC row per key group, as long rows (metric ``n_genes``)."""
    pcc = metrics[metrics["metric"] == "pcc"]
    counts = pcc.groupby(keys, sort=False, dropna=False)["gene"].nunique().reset_index()
    counts = counts.rename(columns={"gene": "value"})
    counts["value"] = counts["value"].astype(float)
    counts["metric"] = "n_genes"
    return counts[keys + ["metric", "value"]]


def benchmark_long(metric_files: Iterable[str | Path] | pd.DataFrame) -> pd.DataFrame:
    """Summary metrics per (task, dataset, model, fold, sample, scale_um, gene_set), long form.

    ``metric_files`` are the per-fold parquet files (or their concatenated table). Summaries
    come from :func:`histomap.metrics.summarise` plus ``n_genes``. Adds ``sample =
    mean_over_slides`` rows per fold (:func:`histomap.metrics.aggregate_over_slides`): the
    unweighted mean over the fold's slides of every summary (a NaN slide gives NaN), except
    ``n_nan_pcc``, which is the total of NaN-PCC genes over the fold's slides.
    """
    if isinstance(metric_files, pd.DataFrame):
        metrics = metric_files
        missing = [c for c in INPUT_COLUMNS if c not in metrics.columns]
        if missing:
            raise InputError("<metrics table>", f"lacks columns {missing}")
    else:
        metrics = read_metrics(metric_files)
    keys = _key_columns(metrics)
    dup = metrics.duplicated(keys + ["gene", "metric"])
    if dup.any():
        first = metrics.loc[dup].iloc[0]
        raise InputError("<metric files>", f"{int(dup.sum())} duplicated gene x metric rows, e.g. "
                                           f"{first[keys + ['gene', 'metric']].to_dict()}")
    per_sample = pd.concat([summarise(metrics[keys + ["gene", "metric", "value"]]),
                            _n_genes(metrics, keys)], ignore_index=True)
    over_slides = aggregate_over_slides(per_sample)
    if over_slides.empty:
        log.warning("no per-slide summaries (only pooled); no mean_over_slides rows")
    over_slides = over_slides.assign(sample=MEAN_OVER_SLIDES)
    long_df = pd.concat([per_sample, over_slides], ignore_index=True)
    order = LONG_COLUMNS[:4] + (["seed"] if "seed" in long_df.columns else []) + LONG_COLUMNS[4:]
    long_df = long_df[order].sort_values(keys + ["metric"], kind="stable")
    return long_df.reset_index(drop=True)


def across_folds(long_df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of each metric over folds, and over training seeds when there are
    several.

    Returns ``task, dataset, model, sample, scale_um, gene_set, metric, mean, std, n_folds,
    n_seeds``. With one seed, ``mean``/``std`` (ddof=1) are over folds. With several seeds,
    each seed's metric is first averaged over folds, and ``mean``/``std`` are over seeds: the
    spread says how much a benchmark number moves with the training seed alone. Per-slide rows
    usually occur in one fold only; the rows to compare models by are ``mean_over_slides`` and
    ``pooled``.
    """
    keys = ["task", "dataset", "model", "sample", "scale_um", "gene_set", "metric"]
    df = long_df if "seed" in long_df.columns else long_df.assign(seed=0)
    per_seed = df.groupby(keys + ["seed"], sort=True, dropna=False).agg(
        value=("value", lambda v: v.mean(skipna=False)), n_folds=("fold", "nunique"),
        fold_std=("value", lambda v: v.std(ddof=1, skipna=False))).reset_index()
    grouped = per_seed.groupby(keys, sort=True, dropna=False)
    out = grouped["value"].agg(mean=lambda v: v.mean(skipna=False),
                               std=lambda v: v.std(ddof=1, skipna=False)).reset_index()
    out["n_folds"] = grouped["n_folds"].max().to_numpy()
    out["n_seeds"] = grouped["seed"].nunique().to_numpy()
    single = out["n_seeds"] == 1
    out.loc[single, "std"] = grouped["fold_std"].first().to_numpy()[single.to_numpy()]
    return out


def scale_table(agg: pd.DataFrame, task: str, metric: str = "PCC@M",
                sample: str = MEAN_OVER_SLIDES) -> str:
    """Markdown: models x spot scales of one metric (mean ± spread), e.g. the cross-scale
    benchmark."""
    part = agg[(agg["task"] == task) & (agg["metric"] == metric) & (agg["sample"] == sample)]
    if part.empty:
        return f"_no {metric} rows for task {task}_"
    scales = sorted(pd.unique(part["scale_um"]), reverse=True)
    rows = []
    for model, by_model in part.groupby("model", sort=True):
        cells = by_model.set_index("scale_um")
        rows.append([str(model)] + [
            _fmt_mean_std(cells.loc[sc, "mean"], cells.loc[sc, "std"], _n_spread(cells.loc[sc]),
                          metric) if sc in cells.index else "–" for sc in scales])
    return _markdown_table(["model"] + [f"{sc:g} µm" for sc in scales], rows)


# --------------------------------------------------------------------------- markdown
def _fmt(value: float, metric: str = "", digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "nan"
    if metric in ("n_nan_pcc", "n_genes"):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.{digits}f}"


def _n_spread(cell: pd.Series) -> int:
    """How many values the std of an :func:`across_folds` row is over (seeds, else folds)."""
    return int(cell["n_seeds"]) if int(cell["n_seeds"]) > 1 else int(cell["n_folds"])


def _fmt_mean_std(mean: float, std: float, n: int, metric: str) -> str:
    if n <= 1:
        return _fmt(mean, metric)
    return f"{_fmt(mean, metric)} ± {_fmt(std, metric)}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                    n_labels: int = 1) -> str:
    """Pipe table; the first ``n_labels`` columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < n_labels else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _model_table(agg: pd.DataFrame, sample: str) -> str:
    """Rows = models, columns = MSE ... PCC@M and mean n_nan_pcc, for one sample kind."""
    part = agg[agg["sample"] == sample]
    metrics = [m for m in TABLE_METRICS if m in set(part["metric"])] + ["n_nan_pcc"]
    rows = []
    for model, by_model in part.groupby("model", sort=True):
        cells = by_model.set_index("metric")
        row = [str(model)]
        for m in metrics:
            if m not in cells.index:
                row.append("–")
                continue
            c = cells.loc[m]
            row.append(_fmt_mean_std(c["mean"], c["std"], _n_spread(c), m))
        rows.append(row)
    return _markdown_table(["model"] + metrics, rows)


def _detail_table(part: pd.DataFrame) -> str:
    """Every fold x sample (slides, their mean, pooled) of every model, unaggregated."""
    metrics = [m for m in SUMMARY_METRICS if m in set(part["metric"])]
    index = [c for c in ("model", "fold", "seed", "sample") if c in part.columns]
    wide = part.pivot(index=index, columns="metric", values="value").reset_index()
    rank = {MEAN_OVER_SLIDES: 1, POOLED: 2}
    wide["_rank"] = wide["sample"].map(rank).fillna(0)
    wide = wide.sort_values(index[:-1] + ["_rank", "sample"])
    rows = [[str(r[c]) for c in index] + [_fmt(r.get(m, np.nan), m) for m in metrics]
            for _, r in wide.iterrows()]
    return _markdown_table(index + metrics, rows, n_labels=len(index))


def _nan_sentence(part: pd.DataFrame) -> str:
    """How many genes had an undefined PCC, per model, over slides and over pooled folds."""
    nan = part[part["metric"] == "n_nan_pcc"]
    per_model = []
    for model, rows in nan.groupby("model", sort=True):
        on_slides = rows.loc[~rows["sample"].isin([POOLED, MEAN_OVER_SLIDES]), "value"].sum()
        pooled = rows.loc[rows["sample"] == POOLED, "value"].sum()
        per_model.append(f"{model} {on_slides:.0f} (slides) / {pooled:.0f} (pooled)")
    return ("Genes with NaN PCC, summed over folds: " + "; ".join(per_model) + "."
            if per_model else "")


def benchmark_markdown(long_df: pd.DataFrame) -> str:
    """Benchmark tables in the papers' shape, one block per task x dataset x scale x gene set.

    Each block: models x (MSE, MAE, PCC@F/S/M) as mean ± std over folds of the per-slide
    averaged values, the same for ``pooled``, then the per-fold, per-slide details.
    """
    out = [
        "# histomap benchmark",
        "",
        "PCC is the ordinary **signed** Pearson correlation of measured and predicted expression "
        "of one gene over the spots of a slide (or of all test spots of a fold, `pooled`). "
        "PCC@F, PCC@S and PCC@M are the first quartile, median and mean of the per-gene PCCs; "
        "genes whose PCC is undefined (constant prediction or measurement) are left out of them "
        "and counted in `n_nan_pcc`. MSE and MAE are per-gene errors averaged over genes.",
        "",
        "Main tables: mean ± std over test folds (std with ddof=1; a bare number means one fold) "
        "of each fold's per-slide averaged summary (`mean_over_slides`), then of the pooled "
        "summary. `n_nan_pcc` there is the number of NaN-PCC genes summed over a fold's slides "
        "(resp. in the fold's pooled spots), averaged over folds. `nan` marks an undefined "
        "value.",
        "",
    ]
    if long_df.empty:
        return "\n".join(out + ["_no summaries_", ""])
    agg = across_folds(long_df)
    if "seed" in long_df.columns and long_df["seed"].nunique() > 1:
        out += [f"Training seeds: {sorted(pd.unique(long_df['seed']).tolist())}. With several "
                "seeds, every main-table cell is the mean over seeds of the mean over folds, "
                "± the std over seeds (ddof=1).", ""]
    blocks = ["task", "dataset", "scale_um", "gene_set"]
    # the spot task first, then the others; larger spots first within a task
    order = {"spot": 0}
    groups = sorted(long_df.groupby(blocks, sort=True),
                    key=lambda kv: (order.get(kv[0][0], 1), kv[0][0], kv[0][1], -kv[0][2]))
    for i, ((task, dataset, scale, gene_set), part) in enumerate(groups):
        if task == "cross_scale" and (i == 0 or groups[i - 1][0][0] != "cross_scale"):
            out += ["## Cross-scale: PCC@M by spot diameter (mean over slides)", "",
                    "Models trained at the samples' own spot size, scored against ground "
                    "truth re-measured at each diameter from the high-resolution data.", "",
                    scale_table(agg, "cross_scale"), ""]
        sub = agg[(agg["task"] == task) & (agg["dataset"] == dataset)
                  & (agg["scale_um"] == scale) & (agg["gene_set"] == gene_set)]
        folds = sorted(pd.unique(part["fold"]).astype(str).tolist())
        genes = part.loc[part["metric"] == "n_genes", "value"]
        n_gene_txt = (f"{int(genes.iloc[0])} genes" if genes.nunique() == 1
                      else f"{int(genes.min())}-{int(genes.max())} genes")
        n_slides = part.loc[~part["sample"].isin([POOLED, MEAN_OVER_SLIDES]), "sample"].nunique()
        out += [
            f"## {task} — {dataset} — {scale:g} µm spots — gene set `{gene_set}`",
            "",
            f"Top-N genes: {n_gene_txt} (gene set `{gene_set}`); {len(folds)} folds "
            f"({', '.join(folds)}); {n_slides} test slides. {_nan_sentence(part)}",
            "",
            "### Per-slide averaged (mean over slides within a fold)",
            "",
            _model_table(sub, MEAN_OVER_SLIDES) if (sub["sample"] == MEAN_OVER_SLIDES).any()
            else "_no per-slide summaries_",
            "",
            "### Pooled (all test spots of a fold)",
            "",
            _model_table(sub, POOLED) if (sub["sample"] == POOLED).any()
            else "_no pooled summaries_",
            "",
            "### Per fold and slide",
            "",
            _detail_table(part),
            "",
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------- writing
def _atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(long_df: pd.DataFrame, out_csv: str | Path, out_md: str | Path) -> None:
    """Write the long table (CSV) and the markdown tables, each atomically."""
    _atomic_write_text(out_csv, long_df.to_csv(index=False))
    _atomic_write_text(out_md, benchmark_markdown(long_df))
    log.info("wrote %s (%d rows) and %s", out_csv, len(long_df), out_md)


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
    """Measured | predicted expression per gene as discs over a slide thumbnail.

    Spot centres are ``spots_truth.obsm["spatial"]`` (level-0 px) / ``thumb_downsample``; disc
    radius = ``obs["diameter_um"] / 2 / mpp / thumb_downsample`` thumbnail px, with ``mpp`` from
    ``uns["histomap"]``. Spots are matched by name; each panel has its own colour scale and the
    row title gives the gene's PCC over the shared spots.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

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
            discs = PatchCollection([Circle((x, y), rad) for (x, y), rad in zip(xy, radius)],
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
