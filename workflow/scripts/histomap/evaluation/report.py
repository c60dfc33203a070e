"""Benchmark tables: per-gene metric files -> long summary table and markdown (spot and SR).

Input (the ``evaluate`` contract): ``results/metrics/{task}/{model}/{fold}.parquet``, one row per
gene x sample x scale x metric with columns ``task, dataset, model, fold, sample, scale_um,
gene_set, gene, metric, value`` (optional ``seed`` and ``fold_kind``: ``cross_patient``,
``within_patient`` or ``mixed``, :func:`histomap.evaluation.folds.fold_kinds`). ``sample`` is a
slide name or ``pooled``
(all test spots of the fold concatenated); ``metric`` is a per-gene ``pcc`` (signed Pearson
over spots), ``mse`` or ``mae``.

Output (the ``benchmark_tables`` contract): a long table ``task, dataset, model, fold, sample,
scale_um, gene_set, metric, value`` (``fold_kind`` after ``fold`` when given) whose metrics are
the per-gene summaries PCC@F / PCC@S / PCC@M (first quartile, median, mean of per-gene PCC over
the scored genes; a constant prediction scores 0), n_genes_scored, n_constant_truth (genes left
out because the truth is constant), MSE, MAE (means over genes), n_spots_scored and n_genes, for
every slide, for ``pooled``, and for ``mean_over_slides`` (the mean of the per-slide summaries
of one fold; for the counts their total). Every model of one table column (task, dataset,
fold, seed, sample, scale) is scored on the same spots or bins, the truth's: a different
``n_spots_scored`` between models is an error (:func:`check_same_spots`), never a silent
comparison of different sets. Cross-patient and within-patient folds are never averaged
together: they are separate rows of every table. The summaries themselves are
:mod:`histomap.evaluation.metrics`'s, so evaluation and report cannot disagree. Super-resolution
tables are :mod:`histomap.evaluation.srreport`.
Figures: :mod:`histomap.evaluation.figures`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histomap.errors import InputError
from histomap.evaluation.metrics import (
    COUNT_METRICS,
    POOLED,
    aggregate_over_slides,
    summarise,
)
from histomap.outputs import write_text_atomic

log = logging.getLogger(__name__)

MEAN_OVER_SLIDES = "mean_over_slides"
INPUT_COLUMNS = ["task", "dataset", "model", "fold", "sample", "scale_um", "gene_set", "gene",
                 "metric", "value"]
LONG_COLUMNS = ["task", "dataset", "model", "fold", "sample", "scale_um", "gene_set", "metric",
                "value"]
SUMMARY_METRICS = ["MSE", "MAE", "PCC@F", "PCC@S", "PCC@M", "n_genes_scored", "n_constant_truth",
                   "n_spots_scored", "n_genes"]
SPOT_COUNT = "n_spots_scored"
OPTIONAL_COLUMNS = ["fold_kind", "seed"]
FOLD_KIND_LABELS = {"cross_patient": "cross-patient", "within_patient": "within-patient",
                    "mixed": "mixed"}
TRIVIAL_SPOT_MODEL = "mean"  # the training spots' per-gene mean, constant over space
TRIVIAL_SR_METHOD = "bicubic"  # the LR map upsampled, nothing learned from the H&E
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
    return metrics[INPUT_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in metrics.columns]]


def _key_columns(df: pd.DataFrame, with_sample: bool = True) -> list[str]:
    keys = ["task", "dataset", "model", "fold"]
    if "fold_kind" in df.columns:
        keys.append("fold_kind")
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
    come from :func:`histomap.evaluation.metrics.summarise` plus ``n_genes``. Adds ``sample =
    mean_over_slides`` rows per fold (:func:`histomap.evaluation.metrics.aggregate_over_slides`): the
    unweighted mean over the fold's slides of every summary (a NaN slide gives NaN), except the
    gene counts (n_genes_scored, n_constant_truth), which are totals over the fold's slides.
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
    check_same_spots(per_sample)
    over_slides = aggregate_over_slides(per_sample)
    if over_slides.empty:
        log.warning("no per-slide summaries (only pooled); no mean_over_slides rows")
    over_slides = over_slides.assign(sample=MEAN_OVER_SLIDES)
    long_df = pd.concat([per_sample, over_slides], ignore_index=True)
    order = (LONG_COLUMNS[:4] + [c for c in ("fold_kind", "seed") if c in long_df.columns]
             + LONG_COLUMNS[4:])
    long_df = long_df[order].sort_values(keys + ["metric"], kind="stable")
    return long_df.reset_index(drop=True)


def check_same_spots(summaries: pd.DataFrame) -> None:
    """Every model of one table cell group (task, dataset, fold, seed, sample, scale, gene set)
    must have been scored on as many spots or bins (``n_spots_scored``, the truth's): InputError
    naming the models and counts otherwise. Tables of files without the count pass."""
    counts = summaries[summaries["metric"] == SPOT_COUNT]
    if counts.empty:
        return
    keys = [c for c in _key_columns(counts) if c != "model"]
    for key, rows in counts.groupby(keys, sort=True, dropna=False):
        if rows["value"].nunique(dropna=False) > 1:
            by_model = ", ".join(f"{m} {v:.0f}" for m, v in zip(rows["model"], rows["value"]))
            raise InputError("<metric files>", (
                f"models of one column were scored on different spots or bins "
                f"({dict(zip(keys, key))}): {by_model}; every model must be scored on the "
                "truth's spots (rerun the evaluation of the odd model)"))


def spots_sentence(long_df: pd.DataFrame, task: str) -> str:
    """How many spots or bins every model of a task's columns was scored on, per scale and
    fold (summed over the fold's slides)."""
    part = long_df[(long_df["task"] == task) & (long_df["metric"] == SPOT_COUNT)
                   & (long_df["sample"] == MEAN_OVER_SLIDES)]
    if part.empty:
        return ""
    cells = []
    for scale, rows in sorted(part.groupby("scale_um"), key=lambda kv: -kv[0]):
        per_fold = rows.groupby("fold", sort=True)["value"].max()
        cells.append(f"{scale:g} µm: " + ", ".join(f"{f} {v:.0f}" for f, v in per_fold.items()))
    return ("Every model of a column is scored on the same spots or bins, the truth's "
            "(per fold, summed over its slides): " + "; ".join(cells) + ".")


def across_folds(long_df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of each metric over folds, and over training seeds when there are
    several.

    Returns ``task, dataset, model, [fold_kind,] sample, scale_um, gene_set, metric, mean,
    std, n_folds, n_seeds, folds``: folds of different kinds (cross-patient, within-patient) are
    aggregated apart, never together; ``folds`` names the folds of each row. With one seed,
    ``mean``/``std`` (ddof=1) are over folds. With several seeds,
    each seed's metric is first averaged over folds, and ``mean``/``std`` are over seeds: the
    spread says how much a benchmark number moves with the training seed alone. Per-slide rows
    usually occur in one fold only; the rows to compare models by are ``mean_over_slides`` and
    ``pooled``.
    """
    keys = ["task", "dataset", "model", *(["fold_kind"] if "fold_kind" in long_df.columns else []),
            "sample", "scale_um", "gene_set", "metric"]
    df = long_df if "seed" in long_df.columns else long_df.assign(seed=0)
    per_seed = df.groupby(keys + ["seed"], sort=True, dropna=False).agg(
        value=("value", lambda v: v.mean(skipna=False)), n_folds=("fold", "nunique"),
        fold_std=("value", lambda v: v.std(ddof=1, skipna=False))).reset_index()
    grouped = per_seed.groupby(keys, sort=True, dropna=False)
    out = grouped["value"].agg(mean=lambda v: v.mean(skipna=False),
                               std=lambda v: v.std(ddof=1, skipna=False)).reset_index()
    out["n_folds"] = grouped["n_folds"].max().to_numpy()
    out["n_seeds"] = grouped["seed"].nunique().to_numpy()
    names = df.groupby(keys, sort=True, dropna=False)["fold"].agg(
        lambda f: ", ".join(sorted(pd.unique(f.astype(str)))))
    out["folds"] = names.to_numpy()
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
    for labels, by_model in _row_groups(part):
        cells = by_model.set_index("scale_um")
        rows.append(labels + [
            _fmt_mean_std(cells.loc[sc, "mean"], cells.loc[sc, "std"], _n_spread(cells.loc[sc]),
                          metric) if sc in cells.index else "–" for sc in scales])
    return _markdown_table(_row_header(part) + [f"{sc:g} µm" for sc in scales], rows,
                           n_labels=len(_row_header(part)))


def _row_header(agg: pd.DataFrame) -> list[str]:
    return ["model", "folds"] if "fold_kind" in agg.columns else ["model"]


def _row_groups(agg: pd.DataFrame):
    """(label cells, rows) per table row: one per model, and per fold kind when the folds say
    what they are (cross-patient and within-patient folds are never one row)."""
    if "fold_kind" not in agg.columns:
        for model, rows in _by_model(agg):
            yield [str(model)], rows
        return
    rank = {k: i for i, k in enumerate(FOLD_KIND_LABELS)}
    groups = sorted(agg.groupby(["model", "fold_kind"], sort=False),
                    key=lambda kv: (kv[0][0] != TRIVIAL_SPOT_MODEL, str(kv[0][0]),
                                    rank.get(kv[0][1], len(rank)), kv[0][1]))
    for (model, kind), rows in groups:
        folds = ", ".join(sorted({f for names in rows["folds"] for f in str(names).split(", ")}))
        yield [str(model), f"{FOLD_KIND_LABELS.get(kind, kind)} ({folds})"], rows


# --------------------------------------------------------------------------- markdown
def format_metric(value: float, metric: str = "", digits: int = 4) -> str:
    """A metric value for a table: ``digits`` decimals, counts as integers, NaN as "nan"."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "nan"
    if metric in (*COUNT_METRICS, "n_genes"):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.{digits}f}"


def _n_spread(cell: pd.Series) -> int:
    """How many values the std of an :func:`across_folds` row is over (seeds, else folds)."""
    return int(cell["n_seeds"]) if int(cell["n_seeds"]) > 1 else int(cell["n_folds"])


def _fmt_mean_std(mean: float, std: float, n: int, metric: str) -> str:
    if n <= 1:
        return format_metric(mean, metric)
    return f"{format_metric(mean, metric)} ± {format_metric(std, metric)}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                    n_labels: int = 1) -> str:
    """Pipe table; the first ``n_labels`` columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < n_labels else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _by_model(part: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Rows per model: the trivial baseline first, then the models by name."""
    return sorted(part.groupby("model", sort=True),
                  key=lambda kv: (kv[0] != TRIVIAL_SPOT_MODEL, str(kv[0])))


def _model_table(agg: pd.DataFrame, sample: str) -> str:
    """Rows = models (per fold kind), columns = MSE ... PCC@M and the gene counts, for one
    sample kind."""
    part = agg[agg["sample"] == sample]
    metrics = [m for m in TABLE_METRICS if m in set(part["metric"])] + list(COUNT_METRICS)
    rows = []
    for labels, by_model in _row_groups(part):
        cells = by_model.set_index("metric")
        row = list(labels)
        for m in metrics:
            if m not in cells.index:
                row.append("–")
                continue
            c = cells.loc[m]
            row.append(_fmt_mean_std(c["mean"], c["std"], _n_spread(c), m))
        rows.append(row)
    header = _row_header(part)
    return _markdown_table(header + metrics, rows, n_labels=len(header))


def _detail_table(part: pd.DataFrame) -> str:
    """Every fold x sample (slides, their mean, pooled) of every model, unaggregated."""
    metrics = [m for m in SUMMARY_METRICS if m in set(part["metric"])]
    index = [c for c in ("model", "fold", "fold_kind", "seed", "sample") if c in part.columns]
    wide = part.pivot(index=index, columns="metric", values="value").reset_index()
    rank = {MEAN_OVER_SLIDES: 1, POOLED: 2}
    wide["_rank"] = wide["sample"].map(rank).fillna(0)
    wide = wide.sort_values(index[:-1] + ["_rank", "sample"])
    rows = [[str(r[c]) for c in index] + [format_metric(r.get(m, np.nan), m) for m in metrics]
            for _, r in wide.iterrows()]
    return _markdown_table(index + metrics, rows, n_labels=len(index))


def _nan_sentence(part: pd.DataFrame) -> str:
    """How many genes were left out as constant in the truth, per model, over slides and over
    pooled folds."""
    nan = part[part["metric"] == "n_constant_truth"]
    per_model = []
    for model, rows in nan.groupby("model", sort=True):
        on_slides = rows.loc[~rows["sample"].isin([POOLED, MEAN_OVER_SLIDES]), "value"].sum()
        pooled = rows.loc[rows["sample"] == POOLED, "value"].sum()
        per_model.append(f"{model} {on_slides:.0f} (slides) / {pooled:.0f} (pooled)")
    return ("Genes left out of the PCC summaries as constant in the truth, summed over folds: "
            + "; ".join(per_model) + "."
            if per_model else "")


def benchmark_markdown(long_df: pd.DataFrame) -> str:
    """Benchmark tables in the papers' shape, one block per task x dataset x scale x gene set.

    Each block: models x (MSE, MAE, PCC@F/S/M, gene counts) as mean ± std over folds of the
    per-slide averaged values, the same for ``pooled``, then the per-fold, per-slide details.
    With a ``fold_kind`` column, each model has one row per fold kind (cross-patient,
    within-patient), never their mean.
    """
    out = [
        "# histomap benchmark",
        "",
        "PCC is the ordinary **signed** Pearson correlation of measured and predicted expression "
        "of one gene over the spots of a slide (or of all test spots of a fold, `pooled`). "
        "PCC@F, PCC@S and PCC@M are the first quartile, median and mean of the per-gene PCCs "
        "over the scored genes (`n_genes_scored`); a gene whose prediction is constant scores "
        "PCC 0, and genes constant in the measurement are left out for every model alike "
        "(`n_constant_truth`). MSE and MAE are per-gene errors averaged over all genes.",
        "",
        f"`{TRIVIAL_SPOT_MODEL}` is the trivial baseline: each gene's mean over the fold's "
        "training spots, the same value at every spot (its PCC is that of a constant "
        "prediction). A model whose MSE is not below it has learned nothing spatial from the "
        "H&E.",
        "",
        "Main tables: mean ± std over test folds (std with ddof=1; a bare number means one fold) "
        "of each fold's per-slide averaged summary (`mean_over_slides`), then of the pooled "
        "summary. The gene counts there are summed over a fold's slides (resp. counted in the "
        "fold's pooled spots), then averaged over folds. `nan` marks an undefined value. "
        "Cross-patient folds (the test patient is in no training sample) and within-patient "
        "folds (serial sections of a test patient are in training) are separate rows.",
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
                    "truth re-measured at each diameter from the high-resolution data (spot "
                    "models at their training size only).", "",
                    scale_table(agg, "cross_scale"), "", spots_sentence(long_df, "cross_scale"),
                    ""]
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
def write_report(long_df: pd.DataFrame, out_csv: str | Path, out_md: str | Path,
                 extra_md: str = "") -> None:
    """Write the long table (CSV) and the markdown tables (then ``extra_md``), each atomically."""
    write_text_atomic(out_csv, long_df.to_csv(index=False))
    md = benchmark_markdown(long_df)
    write_text_atomic(out_md, md + ("\n" + extra_md if extra_md else ""))
    log.info("wrote %s (%d rows) and %s", out_csv, len(long_df), out_md)


def ingest_markdown(spots_h5ads: Iterable[str | Path]) -> str:
    """Markdown section: per ingested sample (``results/ingest/{sample}/spots.h5ad``) the spots
    kept, those dropped for lack of counts or a position (``uns["histomap"]["dropped"]``,
    bounded by ``ingest.max_dropped_fraction``) and the share of spots on tissue."""
    import anndata as ad

    rows = []
    for path in spots_h5ads:
        spots = ad.read_h5ad(path, backed="r")
        meta = dict(spots.uns.get("histomap", {}))
        dropped = meta.get("dropped", {}) or {}
        lost = "; ".join(f"{int(e['n'])} of {int(e['of'])} {what}" for what, e in dropped.items()
                         if int(e["n"])) or "none"
        on_tissue = meta.get("on_tissue_fraction")
        rows.append([str(meta.get("sample", Path(path).parent.name)), str(spots.n_obs), lost,
                     "-" if on_tissue is None else f"{100 * float(on_tissue):.0f}%"])
        spots.file.close()
    if not rows:
        return ""
    return "\n".join(["## Ingest", "", "Spots kept per sample, spots dropped by the reader "
                      "(no counts or no position), and the share of spots on the tissue mask.",
                      "", _markdown_table(["sample", "spots", "dropped", "on tissue"], rows),
                      ""])
