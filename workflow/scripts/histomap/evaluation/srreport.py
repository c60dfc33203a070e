"""Super-resolution tables: per-(patch, gene) SR metric parquets -> long CSV and markdown.

Arrow: metrics -> **tables** (rule ``sr_tables``): Table 1 of Diff-ST (rows methods, columns
dataset x factor x RMSE / PCC) and its ablations, per unit; the same in counts; then the border,
mass and uncertainty scores (:mod:`histomap.evaluation.srmetrics`: edge-error ratio,
predicted / truth mean count, Spearman of the samples' std with the error) and the error by std
decile. Every row is one (method, ``fold_kind``, ``mass_projection``): cross-patient and
within-patient folds are never averaged together, and a method's maps are reported as
delivered (mass-projected onto the LR map) and as sampled.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histomap.errors import InputError
from histomap.evaluation.report import FOLD_KIND_LABELS, TRIVIAL_SR_METHOD
from histomap.evaluation.srmetrics import summarise_sr
from histomap.outputs import write_text_atomic

log = logging.getLogger(__name__)

SR_TABLE_COLUMNS = ["dataset", "method", "fold_kind", "mass_projection", "scale", "metric",
                    "units", "value",
                    "std_over_folds", "n_folds", "n_patches", "n_pcc_scored", "n_nan_pcc",
                    "n_nan_patches",
                    "n_dropped_patches", "uses_lr_map"]
# how each normalisation of the pairs is named in the tables
SR_UNITS = {
    "log1p": "log-normalised counts",
    "minmax": "per-patch min-max (paper protocol)",
    "none": "counts",
}
SR_COUNTS_UNITS = "counts (prediction de-normalised with LR-patch statistics)"
SR_UNIT_NOTES = {
    "log1p": "log1p(counts / pixel library x T) per HR pixel, T = the median HR-pixel library of "
             "the training sections (statistics from training data only); the LR input is in the "
             "same units (an LR pixel's library fraction). This is the default unit.",
    "minmax": "The paper's protocol: the truth of every patch and gene is min-max scaled to [0, 1] "
              "by its own range (the LR map by its own), so RMSE in these units depends on the "
              "truth's range and is not comparable between patches or with other units.",
    "none": "raw counts per HR pixel; an LR pixel's counts / factor^2 as its HR-unit estimate.",
}


def sr_long_table(per_gene: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, fold_kind, mass_projection, scale, metric): the mean over every
    test patch of every fold of that kind (each patch scored once, by the fold holding it out),
    the std of the fold means, counts: patches scored, undefined PCCs (patch-gene pairs),
    patches without any defined PCC, patches of the test sections dropped when the pairs were
    built (too little tissue), whether the method reads the LR map. Metrics written before a
    column existed get ``normalisation`` minmax, ``fold_kind`` "all" and ``mass_projection``
    False."""
    per_gene = per_gene.copy()
    for col, default in (("normalisation", "minmax"), ("fold_kind", "all"),
                         ("mass_projection", False)):
        if col not in per_gene.columns:
            per_gene[col] = default
    keys = ["dataset", "method", "fold_kind", "mass_projection", "scale"]
    pooled = summarise_sr(per_gene, [*keys, "normalisation"])
    folds = summarise_sr(per_gene, [*keys, "normalisation", "fold"])
    spread = folds.groupby([*keys, "metric"], observed=True)["value"].agg(
        std_over_folds=lambda s: float(s.std(ddof=1)) if s.notna().sum() > 1 else math.nan,
        n_folds="count").reset_index()
    out = pooled.merge(spread, on=[*keys, "metric"], how="left")
    extra = per_gene.drop_duplicates([*keys, "fold", "sample"])
    dropped = (extra["dropped_patches"] if "dropped_patches" in extra.columns
               else pd.Series(0, index=extra.index))
    uses_lr = (extra["uses_lr_map"] if "uses_lr_map" in extra.columns
               else pd.Series(True, index=extra.index))
    per_method = pd.DataFrame({**{k: extra[k] for k in keys},
                               "n_dropped_patches": dropped.astype(int),
                               "uses_lr_map": uses_lr.astype(bool)}).groupby(
        keys, observed=True).agg(n_dropped_patches=("n_dropped_patches", "sum"),
                                 uses_lr_map=("uses_lr_map", "all")).reset_index()
    out = out.merge(per_method, on=keys, how="left")
    counts = out["metric"].str.endswith("_counts")
    out["units"] = np.where(counts, SR_COUNTS_UNITS,
                            out["normalisation"].map(SR_UNITS).fillna(out["normalisation"]))
    out["metric"] = out["metric"].str.replace("_counts", "", regex=False)
    return out[SR_TABLE_COLUMNS]


def _row_keys(part: pd.DataFrame, methods: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(method, fold_kind, mass_projection) rows in method order: projected first."""
    present = part[["method", "fold_kind", "mass_projection"]].drop_duplicates()
    rows = []
    for method in methods:
        mine = present[present["method"] == method]
        for kind in sorted(set(mine["fold_kind"])):
            for projected in (True, False):
                if ((mine["fold_kind"] == kind) & (mine["mass_projection"] == projected)).any():
                    rows.append((method, kind, projected))
    return rows


def _row_name(method: str, kind: str, projected: bool, kinds: int, no_lr: set,
              labelled: bool) -> str:
    """The row's label; ``labelled``: the method also has a mass-projected row."""
    name = f"{method} (no LR map)" if method in no_lr else method
    name += " (no mass projection)" if labelled and not projected else ""
    return name + (f" [{FOLD_KIND_LABELS.get(kind, kind)}]" if kinds > 1 else "")


def _sr_cell(row: pd.Series | None) -> str:
    if row is None or not np.isfinite(row["value"]):
        return "n/a"
    text = f"{row['value']:.4f}"
    if np.isfinite(row["std_over_folds"]):
        text += f" ± {row['std_over_folds']:.4f}"
    return text


def _sr_markdown_table(table: pd.DataFrame, rows: Sequence[str], units: str,
                       metrics: Sequence[str] = ("RMSE", "PCC")) -> str:
    part = table[(table["units"] == units) & table["metric"].isin(metrics)]
    columns = [(d, s, m) for d, s in part[["dataset", "scale"]].drop_duplicates()
               .sort_values(["dataset", "scale"]).itertuples(index=False) for m in metrics]
    header = ["method", *[f"{d} {s}x {m}" for d, s, m in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    index = {(r.dataset, r.method, r.fold_kind, bool(r.mass_projection), r.scale, r.metric): r
             for r in part.itertuples(index=False)}
    no_lr = set(part.loc[~part["uses_lr_map"].astype(bool), "method"])
    kinds = part["fold_kind"].nunique()
    keys = _row_keys(part, rows)
    for method, kind, projected in keys:
        cells = []
        for d, s, m in columns:
            r = index.get((d, method, kind, projected, s, m))
            cells.append(_sr_cell(pd.Series(r._asdict()) if r is not None else None))
        name = _row_name(method, kind, projected, kinds, no_lr, (method, kind, True) in keys)
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def sr_markdown(table: pd.DataFrame, *, methods: Sequence[str], ablations: Sequence[str] = (),
                reference: str = "diffst") -> str:
    """Table 1 (rows methods, columns dataset x scale x metric) and the ablation table, one pair
    per unit (the default log-normalised counts; the paper's per-patch min-max as a named
    protocol), then the scores in counts."""
    lines = ["# Super-resolution benchmark (Diff-ST Table 1 shape)", "",
             "RMSE and signed PCC per gene per patch over the patch's tissue pixels; averaged "
             "over genes per patch, then over every test patch of every fold (± std of the fold "
             "means). Every method gets the LR map in the HR map's units (an LR pixel's "
             "HR-unit estimate) and is scored in the truth's units; no prediction is rescaled "
             "with statistics of the truth it is scored against.", "",
             f"`{TRIVIAL_SR_METHOD}` is the trivial baseline: the LR map upsampled by bicubic "
             "interpolation, nothing learned from the H&E. A method that does not beat it has "
             "not used the histology."]
    units = [u for u in (*SR_UNITS.values(), *sorted(set(table["units"])))
             if u in set(table["units"]) and u != SR_COUNTS_UNITS]
    ablation_rows = [reference] + [a for a in ablations if a != reference] if ablations else []
    for unit in dict.fromkeys(units):
        kind = next((k for k, v in SR_UNITS.items() if v == unit), None)
        lines += ["", f"## Methods: {unit}", ""]
        if kind in SR_UNIT_NOTES:
            lines += [SR_UNIT_NOTES[kind], ""]
        lines += [_sr_markdown_table(table, list(methods), unit)]
        if ablations:
            lines += ["", f"## Ablations: {unit}", "", _sr_markdown_table(table, ablation_rows,
                                                                           unit)]
    if (table["units"] == SR_COUNTS_UNITS).any():
        lines += ["", f"## {SR_COUNTS_UNITS[0].upper()}{SR_COUNTS_UNITS[1:]}", "",
                  "Measured HR counts against predicted counts; a prediction is turned into "
                  "counts with the LR patch only (min-max: the LR range / factor^2; log1p: each "
                  "HR pixel's library estimated as its LR pixel's / factor^2, and the training "
                  "target sum).", "",
                  _sr_markdown_table(table, [*methods, *ablations], SR_COUNTS_UNITS)]
    main = table[(table["metric"] == "PCC") & (table["units"] != SR_COUNTS_UNITS)]
    main = main.drop_duplicates(["dataset", "method", "fold_kind", "scale"])
    if len(main):
        lines += ["", "PCC counts (patch-gene pairs scored / left out because the gene is "
                  "constant over the patch's tissue in the truth, for every method alike; a "
                  "constant prediction scores 0): " + "; ".join(
                      f"{r.method} {r.dataset} {r.scale}x: {r.n_pcc_scored} / {r.n_nan_pcc}"
                      for r in main.itertuples(index=False)) + "."]
    dropped = main.drop_duplicates(["dataset", "scale"])
    dropped = dropped[dropped["n_dropped_patches"] > 0]
    if len(dropped):
        lines += ["", "Patches of the test sections left out of the pairs (tissue or measured "
                  "fraction below min_tissue): " + "; ".join(
                      f"{r.dataset} {r.scale}x: {r.n_dropped_patches}"
                      for r in dropped.itertuples(index=False)) + "."]
    if (~main["uses_lr_map"].astype(bool)).any():
        lines += ["", "Rows marked (no LR map) predict from the H&E alone."]
    return "\n".join(lines) + "\n"


QUALITY_METRICS = {"edge_error_ratio": "edge-error ratio",
                   "mass_ratio": "predicted / truth mean count",
                   "Spearman_std_error": "Spearman(std, abs error)"}


def quality_markdown(table: pd.DataFrame, rows: Sequence[str]) -> str:
    """Border, mass and uncertainty per method (:mod:`.srmetrics`), beside the accuracy
    tables; empty for metrics written before these scores existed."""
    part = table[table["metric"].isin(list(QUALITY_METRICS))
                 & (table["units"] != SR_COUNTS_UNITS)]
    if part.empty:
        return ""
    text = _sr_markdown_table(part, list(dict.fromkeys(rows)), part["units"].iloc[0],
                              list(QUALITY_METRICS))
    for metric, label in QUALITY_METRICS.items():
        text = text.replace(f"x {metric} |", f"x {label} |")
    return "\n".join(["", "## Patch borders, counts and uncertainty", "",
                      "Edge-error ratio: RMSE over the outer two HR pixels of every patch / RMSE "
                      "inside them (model units; target <= 1.1). Predicted / truth mean count: "
                      "predicted over measured counts on the tissue pixels (target within 5% "
                      "of 1). Spearman(std, abs error): per patch, the rank correlation of the "
                      "K samples' per-pixel std with the error of their mean (diffusion "
                      "methods; n/a for one prediction). Rows without mass projection score "
                      "the maps as sampled.", "", text, ""])


def calibration_markdown(calibration_files: Sequence[str | Path]) -> str:
    """The error-by-std-decile tables of the methods with samples' std."""
    frames = [pd.read_csv(p) for p in calibration_files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return ""
    lines = ["", "## Uncertainty calibration: error by std decile", "",
             "The (pixel, gene) pairs of every test patch (maps as delivered), ranked by the "
             "std of the K samples and cut into ten equal-count bins: a std that means "
             "something has the error rising with it. rho: Spearman over all pairs.", ""]
    for table in frames:
        for (method, scale, kind), part in table.groupby(["method", "scale", "fold_kind"],
                                                         sort=False):
            lines += [f"{method} {scale}x ({FOLD_KIND_LABELS.get(kind, kind)}), rho = "
                      f"{part['spearman_all_pixels'].iloc[0]:.3f}", "",
                      "| std decile | std range | mean abs error | RMSE | n |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r.std_decile} | {r.std_min:.4g}-{r.std_max:.4g} | "
                      f"{r.mean_abs_error:.4f} | {r.rmse:.4f} | {r.n} |"
                      for r in part.itertuples(index=False)]
            lines.append("")
    return "\n".join(lines)


def sr_tables(metric_files: Sequence[str | Path], out_csv: str | Path, out_md: str | Path, *,
              methods: Sequence[str], ablations: Sequence[str] = (),
              reference: str = "diffst",
              calibration_files: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Read the per-(patch, gene) metric parquets, write the long CSV and the markdown tables
    (with the error-by-std-decile tables of ``calibration_files``, :mod:`.srmetrics`)."""
    frames = []
    for path in metric_files:
        try:
            frames.append(pd.read_parquet(path))
        except Exception as exc:  # noqa: BLE001 - unreadable metrics file
            raise InputError(path, f"cannot read SR metrics parquet ({exc})") from exc
    if not frames:
        raise ValueError("no SR metric files given")
    table = sr_long_table(pd.concat(frames, ignore_index=True))
    for path, text in ((out_csv, table.to_csv(index=False)),
                       (out_md, sr_markdown(table, methods=methods, ablations=ablations,
                                            reference=reference)
                        + quality_markdown(table, [*methods, *ablations])
                        + calibration_markdown(calibration_files))):
        write_text_atomic(path, text)
    log.info("wrote %s (%d rows) and %s", out_csv, len(table), out_md)
    return table
