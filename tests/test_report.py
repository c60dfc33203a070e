"""Benchmark report: summaries of hand-made per-gene metric files, markdown tables, figures."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histomap.errors import InputError
from histomap.evaluation import figures, report

GENES = ["g1", "g2", "g3"]
FOLDS = {"f1": ["A", "B"], "f2": ["C", "D"]}
# per-gene PCC of model m1 (m2 = m1 - 0.2); one undefined PCC on slide B
PCC_M1 = {
    "A": [0.1, 0.4, 0.7],
    "B": [0.2, 0.5, np.nan],
    "C": [0.3, 0.3, 0.6],
    "D": [0.0, 0.6, 0.9],
    ("f1", "pooled"): [0.2, 0.3, 0.4],
    ("f2", "pooled"): [0.5, 0.5, 0.8],
}
MSE_M1 = {"A": [1.0, 2.0, 3.0], "B": [2.0, 2.0, 2.0], "C": [0.5, 1.5, 1.0], "D": [4.0, 0.0, 2.0]}


def _metric_rows(model: str, fold: str, shift: float) -> pd.DataFrame:
    rows = []
    for sample in FOLDS[fold] + ["pooled"]:
        pcc = PCC_M1[sample] if sample != "pooled" else PCC_M1[(fold, sample)]
        mse = MSE_M1.get(sample, [1.0, 1.0, 1.0])
        for gene, p, e in zip(GENES, pcc, mse):
            for metric, value in (("pcc", p - shift), ("mse", e + shift), ("mae", e / 2)):
                rows.append(dict(task="spot", dataset="her2st", model=model, fold=fold,
                                 sample=sample, scale_um=100.0, gene_set="top3", gene=gene,
                                 metric=metric, value=value))
    return pd.DataFrame(rows)


@pytest.fixture()
def metric_files(tmp_path):
    files = []
    for model, shift in (("m1", 0.0), ("m2", 0.2)):
        for fold in FOLDS:
            path = tmp_path / "metrics" / "spot" / model / f"{fold}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            _metric_rows(model, fold, shift).to_parquet(path)
            files.append(path)
    return files


def _value(long_df, **where) -> float:
    sel = np.ones(len(long_df), bool)
    for col, val in where.items():
        sel &= (long_df[col] == val).to_numpy()
    assert sel.sum() == 1, where
    return float(long_df.loc[sel, "value"].iloc[0])


def test_long_table_columns_and_hand_computed_summaries(metric_files):
    long_df = report.benchmark_long(metric_files)
    assert list(long_df.columns) == ["task", "dataset", "model", "fold", "sample", "scale_um",
                                     "gene_set", "metric", "value"]
    assert set(long_df["sample"]) == {"A", "B", "C", "D", "pooled", "mean_over_slides"}
    m1 = dict(model="m1", metric="PCC@M")
    assert _value(long_df, sample="A", **m1) == pytest.approx(0.4)
    assert _value(long_df, sample="B", **m1) == pytest.approx(0.35)  # NaN gene left out
    assert _value(long_df, model="m1", sample="B", metric="n_constant_truth") == 1
    assert _value(long_df, model="m1", sample="A", metric="n_constant_truth") == 0
    assert _value(long_df, model="m1", sample="B", metric="PCC@F") == pytest.approx(0.275)
    assert _value(long_df, model="m1", sample="D", metric="PCC@S") == pytest.approx(0.6)
    assert _value(long_df, model="m2", sample="A", metric="PCC@M") == pytest.approx(0.2)
    assert _value(long_df, model="m1", sample="A", metric="MSE") == pytest.approx(2.0)
    assert _value(long_df, model="m1", sample="D", metric="MAE") == pytest.approx(1.0)
    assert _value(long_df, model="m1", sample="A", metric="n_genes") == 3


def test_mean_over_slides_is_mean_of_slides_and_pooled_passes_through(metric_files):
    long_df = report.benchmark_long(metric_files)
    for model in ("m1", "m2"):
        for fold, slides in FOLDS.items():
            for metric in ("PCC@F", "PCC@S", "PCC@M", "MSE", "MAE", "n_genes"):
                per_slide = [_value(long_df, model=model, fold=fold, sample=s, metric=metric)
                             for s in slides]
                mean = _value(long_df, model=model, fold=fold, sample="mean_over_slides",
                              metric=metric)
                assert mean == pytest.approx(np.mean(per_slide))
    assert _value(long_df, model="m1", fold="f1", sample="mean_over_slides",
                  metric="PCC@M") == pytest.approx(0.375)
    # NaN-PCC genes are totalled over the fold's slides, not averaged away
    assert _value(long_df, model="m1", fold="f1", sample="mean_over_slides",
                  metric="n_constant_truth") == 1
    # pooled summaries come from the pooled per-gene rows, not from the slides
    assert _value(long_df, model="m1", fold="f2", sample="pooled",
                  metric="PCC@M") == pytest.approx(0.6)
    assert _value(long_df, model="m2", fold="f1", sample="pooled",
                  metric="PCC@S") == pytest.approx(0.1)


def test_across_folds_mean_and_std(metric_files):
    agg = report.across_folds(report.benchmark_long(metric_files))
    row = agg[(agg["model"] == "m1") & (agg["sample"] == "mean_over_slides")
              & (agg["metric"] == "PCC@M")].iloc[0]
    assert row["mean"] == pytest.approx((0.375 + 0.45) / 2)
    assert row["std"] == pytest.approx(np.std([0.375, 0.45], ddof=1))
    assert row["n_folds"] == 2


def test_markdown_has_models_and_hand_computed_value(metric_files):
    md = report.benchmark_markdown(report.benchmark_long(metric_files))
    assert "| m1 |" in md and "| m2 |" in md
    # m1 per-slide averaged PCC@M over folds: mean(0.375, 0.45) ± std = 0.4125 ± 0.0530
    assert "0.4125 ± 0.0530" in md
    # m1 pooled PCC@M: mean(0.3, 0.6) ± std(0.3, 0.6)
    assert f"0.4500 ± {np.std([0.3, 0.6], ddof=1):.4f}" in md
    assert "signed" in md and "3 genes" in md and "2 folds" in md
    assert "| m1 | f1 | B |" in md  # detailed per-fold/per-slide table
    assert "m1 1 (slides) / 0 (pooled)" in md  # the NaN-PCC gene of slide B is stated


def test_all_nan_slide_shows_nan_and_propagates(metric_files):
    metrics = report.read_metrics(metric_files)
    metrics.loc[(metrics["sample"] == "C") & (metrics["metric"] == "pcc"), "value"] = np.nan
    long_df = report.benchmark_long(metrics)
    assert np.isnan(_value(long_df, model="m1", sample="C", metric="PCC@M"))
    assert _value(long_df, model="m1", sample="C", metric="n_constant_truth") == 3
    assert np.isnan(_value(long_df, model="m1", fold="f2", sample="mean_over_slides",
                           metric="PCC@M"))
    md = report.benchmark_markdown(long_df)
    assert "| m1 | f2 | C | 1.0000 | 0.5000 | nan | nan | nan | 0 | 3 | 3 |" in md
    assert "m1 4 (slides)" in md


def test_seed_column_is_kept_and_aggregated(metric_files):
    metrics = report.read_metrics(metric_files)
    seeds = pd.concat([metrics.assign(seed=0), metrics.assign(seed=1)], ignore_index=True)
    seeds.loc[(seeds["seed"] == 1) & (seeds["metric"] == "pcc"), "value"] += 0.1
    long_df = report.benchmark_long(seeds)
    assert list(long_df.columns[:5]) == ["task", "dataset", "model", "fold", "seed"]
    assert _value(long_df, model="m1", seed=1, sample="A", metric="PCC@M") == pytest.approx(0.5)
    agg = report.across_folds(long_df)
    row = agg[(agg["model"] == "m1") & (agg["sample"] == "mean_over_slides")
              & (agg["metric"] == "PCC@M")].iloc[0]
    assert row["mean"] == pytest.approx(np.mean([0.375, 0.45, 0.475, 0.55]))
    assert (row["n_folds"], row["n_seeds"]) == (2, 2)
    # spread over seeds of the per-seed fold means (0.4125 and 0.5125), not folds x seeds
    assert row["std"] == pytest.approx(np.std([0.4125, 0.5125], ddof=1))


def test_scale_table_has_one_column_per_scale(metric_files):
    metrics = report.read_metrics(metric_files)
    scales = pd.concat([metrics.assign(scale_um=100.0), metrics.assign(scale_um=8.0)],
                       ignore_index=True).assign(task="cross_scale")
    scales.loc[(scales["scale_um"] == 8.0) & (scales["metric"] == "pcc"), "value"] -= 0.2
    table = report.scale_table(report.across_folds(report.benchmark_long(scales)), "cross_scale")
    header, _, m1 = table.splitlines()[:3]
    assert header == "| model | 100 µm | 8 µm |"
    cells = [c.strip() for c in m1.strip("|").split("|")]
    assert cells[0] == "m1"
    assert float(cells[1].split(" ± ")[0]) - float(cells[2].split(" ± ")[0]) == pytest.approx(0.2)


def test_bad_input_names_file(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"gene": ["g1"], "value": [1.0]}).to_parquet(path)
    with pytest.raises(InputError, match="bad.parquet.*lacks columns"):
        report.benchmark_long([path])


def test_write_report(metric_files, tmp_path):
    long_df = report.benchmark_long(metric_files)
    out_csv, out_md = tmp_path / "report" / "benchmark.csv", tmp_path / "report" / "benchmark.md"
    report.write_report(long_df, out_csv, out_md)
    back = pd.read_csv(out_csv)
    assert len(back) == len(long_df)
    assert "0.4125" in out_md.read_text()
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["benchmark.csv", "benchmark.md"]


def _spots(values: np.ndarray, xy: np.ndarray) -> ad.AnnData:
    spots = ad.AnnData(X=values.astype(np.float32),
                       obs=pd.DataFrame({"diameter_um": 55.0},
                                        index=[f"s{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=GENES))
    spots.obsm["spatial"] = xy
    spots.uns["histomap"] = {"mpp": 0.5}
    return spots


def test_plot_expression_maps_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(200, 1800, size=(30, 2))
    truth = _spots(rng.poisson(3, size=(30, 3)).astype(float), xy)
    pred = _spots(truth.X + rng.normal(0, 1, size=(30, 3)), xy)
    thumb = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    out = tmp_path / "fig" / "maps.png"
    figures.plot_expression_maps(truth, pred, ["g1", "g3", "missing"], thumb, 32.0, out)
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_pcc_distribution_writes_png(metric_files, tmp_path):
    out = tmp_path / "pcc.png"
    figures.plot_pcc_distribution(report.read_metrics(metric_files), out)
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cross_and_within_patient_folds_are_separate_rows(metric_files):
    """Folds that say what they are: a cross-patient fold and a within-patient fold are two rows
    of every main table, never one mean (the old table averaged them)."""
    metrics = report.read_metrics(metric_files)
    metrics["fold_kind"] = metrics["fold"].map({"f1": "cross_patient", "f2": "within_patient"})
    long_df = report.benchmark_long(metrics)
    assert list(long_df.columns[:5]) == ["task", "dataset", "model", "fold", "fold_kind"]
    agg = report.across_folds(long_df)
    m1 = agg[(agg["model"] == "m1") & (agg["sample"] == "mean_over_slides")
             & (agg["metric"] == "PCC@M")].set_index("fold_kind")
    assert m1.loc["cross_patient", "mean"] == pytest.approx(0.375)
    assert m1.loc["within_patient", "mean"] == pytest.approx(0.45)
    assert m1.loc["cross_patient", "folds"] == "f1" and m1.loc["cross_patient", "n_folds"] == 1
    md = report.benchmark_markdown(long_df)
    assert "| m1 | cross-patient (f1) | " in md and "| m1 | within-patient (f2) | " in md
    assert "0.4125" not in md, "the mean over both kinds of fold is never shown"
    # the rows carry the kind in the per-fold details as well
    assert "| m1 | f1 | cross_patient | B |" in md
