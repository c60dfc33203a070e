"""Metrics: signed per-gene Pearson, summaries, per-slide vs pooled evaluation."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr

from histomap.errors import InputError
from histomap.evaluation.metrics import (
    aggregate_over_slides,
    evaluate_matrices,
    evaluate_predictions,
    gene_metrics,
    mse_decomposition,
    pearson_per_gene,
    summarise,
)
from histomap.evaluation.srmetrics import patch_means, summarise_sr


def _value(table: pd.DataFrame, **where) -> float:
    rows = table
    for col, val in where.items():
        rows = rows[rows[col] == val]
    assert len(rows) == 1, where
    return float(rows["value"].iloc[0])


def test_pearson_matches_scipy_including_negative():
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(50, 6))
    noise = rng.normal(size=(50, 6))
    signs = np.array([1, -1, 1, -1, 0.2, -3])
    y_pred = y_true * signs + noise
    r = pearson_per_gene(y_true, y_pred)
    expected = [pearsonr(y_true[:, j], y_pred[:, j])[0] for j in range(6)]
    np.testing.assert_allclose(r, expected, rtol=1e-10, atol=1e-12)
    assert (r[[1, 3, 5]] < -0.3).all(), "negative correlations must stay negative"


def test_pearson_scale_invariant_and_extreme_values():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(30, 3))
    p = y + rng.normal(size=(30, 3))
    base = pearson_per_gene(y, p)
    np.testing.assert_allclose(pearson_per_gene(y * 1e-160, p * 1e160), base, rtol=1e-10)
    np.testing.assert_allclose(pearson_per_gene(-y, p), -base, rtol=1e-12)


def test_constant_truth_is_left_out_and_constant_prediction_scores_zero():
    rng = np.random.default_rng(2)
    y_true = rng.normal(size=(20, 5))
    y_pred = rng.normal(size=(20, 5))
    y_true[:, 1] = 0.1          # constant truth (0.1 is not exact in binary: no rounding escape)
    y_pred[:, 2] = 3.0          # constant prediction
    y_pred[:, 3] = 0.7 + 1e-9 * rng.normal(size=20).astype(np.float32)  # flat up to rounding
    r = pearson_per_gene(y_true, y_pred)
    assert np.isnan(r[1]), "no PCC where the truth is constant"
    assert r[2] == 0.0 and r[3] == 0.0, "a flat prediction scores 0, it is not dropped"
    assert np.isfinite(r[[0, 4]]).all() and r[0] != 0
    both = pearson_per_gene(np.full((5, 1), 2.0), np.full((5, 1), 2.0))
    assert np.isnan(both).all(), "constant truth wins: left out for every method alike"
    broken = y_pred.copy()
    broken[3, 0] = np.nan
    assert pearson_per_gene(y_true, broken)[0] == 0.0, "a non-finite prediction scores 0"
    table = gene_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"])
    assert len(table) == 20, "every gene keeps its rows (pcc, mse, mae, n_spots)"
    summary = summarise(table)
    assert _value(summary, metric="n_genes_scored") == 4
    assert _value(summary, metric="n_constant_truth") == 1
    assert _value(summary, metric="PCC@M") == pytest.approx(np.mean(r[[0, 2, 3, 4]]))
    assert _value(summary, metric="PCC@M") == pytest.approx((r[0] + r[4]) / 4)


def test_flat_prediction_does_not_beat_a_weak_one():
    """Two methods on the same truth: one predicts a gene flat, the other weakly. The flat one
    must not win by having the gene dropped from its mean (the old NaN-and-drop rule)."""
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(40, 2))
    good = truth[:, :1] + 0.1 * rng.normal(size=(40, 1))
    weak = np.column_stack([good[:, 0], truth[:, 1] + 3.0 * rng.normal(size=40)])
    flat = np.column_stack([good[:, 0], np.full(40, 1.5)])
    mean = {name: _value(summarise(gene_metrics(truth, pred, ["g1", "g2"])), metric="PCC@M")
            for name, pred in (("weak", weak), ("flat", flat))}
    assert pearson_per_gene(truth, weak)[1] > 0
    assert mean["weak"] > mean["flat"]


def test_pearson_shape_checks():
    with pytest.raises(ValueError):
        pearson_per_gene(np.zeros((3, 2)), np.zeros((3, 3)))
    assert np.isnan(pearson_per_gene(np.ones((1, 2)), np.ones((1, 2)))).all()


def test_summaries_on_hand_made_vectors():
    pcc = np.array([0.9, -0.2, 0.5, np.nan, 0.1, 0.7, -0.6])
    mse = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    mae = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 9.0])
    genes = [f"g{i}" for i in range(7)]
    per_gene = pd.DataFrame({"gene": genes * 3, "metric": ["pcc"] * 7 + ["mse"] * 7 + ["mae"] * 7,
                             "value": np.concatenate([pcc, mse, mae])})
    summary = summarise(per_gene)
    defined = pcc[~np.isnan(pcc)]
    assert _value(summary, metric="PCC@F") == pytest.approx(np.quantile(defined, 0.25))
    assert _value(summary, metric="PCC@S") == pytest.approx(np.median(defined))
    assert _value(summary, metric="PCC@M") == pytest.approx(np.mean(defined))
    assert _value(summary, metric="n_constant_truth") == 1
    assert _value(summary, metric="n_genes_scored") == 6
    assert _value(summary, metric="MSE") == pytest.approx(4.0)
    assert _value(summary, metric="MAE") == pytest.approx(mae.mean())
    # hand values: sorted defined = [-0.6, -0.2, 0.1, 0.5, 0.7, 0.9]; Q1 at index 1.25
    assert _value(summary, metric="PCC@F") == pytest.approx(-0.2 + 0.25 * 0.3)
    assert _value(summary, metric="PCC@S") == pytest.approx(0.3)


def test_summarise_keys_and_all_nan_group():
    per_gene = pd.DataFrame({
        "sample": ["A"] * 2 + ["B"] * 2,
        "gene": ["x", "y"] * 2,
        "metric": ["pcc"] * 4,
        "value": [0.2, 0.4, np.nan, np.nan],
    })
    summary = summarise(per_gene)
    assert list(summary.columns) == ["sample", "metric", "value"]
    assert _value(summary, sample="A", metric="PCC@M") == pytest.approx(0.3)
    assert np.isnan(_value(summary, sample="B", metric="PCC@M"))
    assert _value(summary, sample="B", metric="n_constant_truth") == 2
    assert _value(summary, sample="B", metric="n_genes_scored") == 0


def test_mse_mae_formulas():
    y_true = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    y_pred = np.array([[1.0, 1.0], [2.0, 1.0], [1.0, 6.0]])
    table = gene_metrics(y_true, y_pred, ["a", "b"])
    assert set(table.columns) == {"gene", "metric", "value"}
    assert _value(table, gene="a", metric="mse") == pytest.approx((1 + 0 + 9) / 3)
    assert _value(table, gene="b", metric="mse") == pytest.approx((0 + 4 + 1) / 3)
    assert _value(table, gene="a", metric="mae") == pytest.approx((1 + 0 + 3) / 3)
    assert _value(table, gene="b", metric="mae") == pytest.approx((0 + 2 + 1) / 3)


def test_pooled_differs_from_mean_of_slides():
    # within each slide the prediction tracks the truth perfectly (PCC 1), but slide B is offset:
    # pooled over both slides the correlation is negative.
    t_a, p_a = np.array([[0.0], [1.0], [2.0]]), np.array([[10.0], [11.0], [12.0]])
    t_b, p_b = np.array([[10.0], [11.0], [12.0]]), np.array([[0.0], [1.0], [2.0]])
    table = evaluate_matrices({"A": (t_a, p_a), "B": (t_b, p_b)}, ["g"])
    assert set(table["sample"]) == {"A", "B", "pooled"}
    assert _value(table, sample="A", metric="pcc") == pytest.approx(1.0)
    assert _value(table, sample="B", metric="pcc") == pytest.approx(1.0)
    pooled = _value(table, sample="pooled", metric="pcc")
    expected = pearsonr(np.r_[t_a[:, 0], t_b[:, 0]], np.r_[p_a[:, 0], p_b[:, 0]])[0]
    assert pooled == pytest.approx(expected) and pooled < 0

    summary = summarise(table)
    mean = aggregate_over_slides(summary)
    assert "sample" not in mean.columns
    assert _value(mean, metric="PCC@M") == pytest.approx(1.0)
    assert _value(summary, sample="pooled", metric="PCC@M") < 0


def test_aggregate_over_slides_means_and_sums():
    summary = pd.DataFrame({
        "model": ["m"] * 6,
        "sample": ["A", "A", "B", "B", "pooled", "pooled"],
        "metric": ["MSE", "n_constant_truth"] * 3,
        "value": [1.0, 2.0, 3.0, 1.0, 100.0, 100.0],
    })
    mean = aggregate_over_slides(summary)
    assert list(mean.columns) == ["model", "metric", "value"]
    assert _value(mean, metric="MSE") == pytest.approx(2.0)
    assert _value(mean, metric="n_constant_truth") == 3


def _spots(names, genes, x, *, sparse=False):
    x = np.asarray(x, dtype=np.float32)
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x,
                      obs=pd.DataFrame(index=list(names)), var=pd.DataFrame(index=list(genes)))


def test_evaluate_predictions_aligns_spots_and_genes(caplog):
    rng = np.random.default_rng(3)
    truth_x = rng.normal(size=(5, 3))
    truth = _spots([f"s{i}" for i in range(5)], ["g1", "g2", "g3"], truth_x, sparse=True)
    # prediction: spots shuffled plus an extra spot, genes in another order plus an extra gene
    order = [3, 0, 4, 1, 2]
    pred_core = truth_x[order][:, [2, 0, 1]] + rng.normal(scale=0.1, size=(5, 3))
    pred_x = np.c_[np.vstack([pred_core, np.ones((1, 3))]), np.zeros(6)]
    pred = _spots([f"s{i}" for i in order] + ["extra"], ["g3", "g1", "g2", "g9"], pred_x)
    with caplog.at_level("INFO"):
        table = evaluate_predictions({"S": truth}, {"S": pred}, ["g1", "g2", "g3"])
    assert "extra" in caplog.text
    aligned = np.empty((5, 3))
    aligned[order] = pred_core[:, [1, 2, 0]]
    expected = evaluate_matrices({"S": (truth_x, aligned)}, ["g1", "g2", "g3"])
    pd.testing.assert_frame_equal(table, expected, rtol=1e-6)
    assert set(table["sample"]) == {"S", "pooled"}
    # independent of evaluate_matrices: numpy on the spots matched by name by hand
    for j, gene in enumerate(["g1", "g2", "g3"]):
        assert _value(table, sample="S", gene=gene, metric="pcc") == pytest.approx(
            np.corrcoef(truth_x[:, j], aligned[:, j])[0, 1], rel=1e-5)  # float32 X
        assert _value(table, sample="S", gene=gene, metric="mse") == pytest.approx(
            np.mean((truth_x[:, j] - aligned[:, j]) ** 2), rel=1e-5)


def test_evaluate_predictions_errors():
    truth = _spots(["a", "b", "c"], ["g1", "g2"], np.arange(6).reshape(3, 2))
    short = _spots(["a", "b"], ["g1", "g2"], np.ones((2, 2)))
    with pytest.raises(InputError, match=r"pred\.h5ad.*lacks 1 of 3 truth spots: c"):
        evaluate_predictions({"S": truth}, {"S": short}, pred_paths={"S": "pred.h5ad"})
    no_gene = _spots(["a", "b", "c"], ["g1"], np.ones((3, 1)))
    with pytest.raises(InputError, match="lacks 1 evaluated gene.*g2"):
        evaluate_predictions({"S": truth}, {"S": no_gene})
    with pytest.raises(InputError, match="no prediction for test sample 'S'"):
        evaluate_predictions({"S": truth}, {"T": truth})


# --------------------------------------------------------------------------- SR summaries
def _sr_table() -> pd.DataFrame:
    """Three patches x two genes of one fold; NaN PCCs where a map was constant.

    Patch means over genes (NaN skipped): patch 0 rmse 2, pcc 0.5 (1 NaN), rmse_counts 20,
    pcc_counts 0.4; patch 1 rmse 3, pcc 0.2, rmse_counts 30, pcc_counts 0.4; patch 2 rmse 5,
    pcc NaN (2 NaN), rmse_counts 50, pcc_counts NaN.
    """
    nan = np.nan
    rows = [  # patch, gene, rmse, pcc, rmse_counts, pcc_counts
        (0, "a", 1.0, 0.5, 10.0, 0.4), (0, "b", 3.0, nan, 30.0, nan),
        (1, "a", 2.0, -0.2, 20.0, -0.1), (1, "b", 4.0, 0.6, 40.0, 0.9),
        (2, "a", 5.0, nan, 50.0, nan), (2, "b", 5.0, nan, 50.0, nan),
    ]
    table = pd.DataFrame(rows, columns=["patch", "gene", "rmse", "pcc", "rmse_counts",
                                        "pcc_counts"])
    return table.assign(dataset="d", method="m", scale=2, fold="F", sample="S", n_pixels=9)


def test_sr_patch_means_by_hand():
    means = patch_means(_sr_table(), ["dataset", "method", "scale"]).set_index("patch")
    np.testing.assert_allclose(means["rmse"], [2.0, 3.0, 5.0])
    np.testing.assert_allclose(means["pcc"], [0.5, 0.2, np.nan])
    np.testing.assert_allclose(means["rmse_counts"], [20.0, 30.0, 50.0])
    np.testing.assert_allclose(means["pcc_counts"], [0.4, 0.4, np.nan])
    assert list(means["n_nan_pcc"]) == [1, 0, 2] and list(means["n_genes"]) == [2, 2, 2]


def test_summarise_sr_by_hand():
    """Per patch over genes, then over patches: PCC (0.5 + 0.2) / 2 = 0.35, not the mean of the
    three defined patch-gene PCCs (0.3); RMSE (2 + 3 + 5) / 3."""
    summary = summarise_sr(_sr_table(), ["dataset", "method", "scale"]).set_index("metric")
    assert summary.loc["PCC", "value"] == pytest.approx(0.35)
    assert summary.loc["RMSE", "value"] == pytest.approx(10 / 3)
    assert summary.loc["RMSE_counts", "value"] == pytest.approx(100 / 3)
    assert summary.loc["PCC_counts", "value"] == pytest.approx(0.4)
    assert summary.loc["PCC", "n_patches"] == 2 and summary.loc["RMSE", "n_patches"] == 3
    assert summary.loc["PCC", "n_nan_pcc"] == 3 and summary.loc["PCC", "n_nan_patches"] == 1
    # a second fold with one patch: keys keep the folds apart
    other = _sr_table().query("patch == 1").assign(fold="G")
    both = summarise_sr(pd.concat([_sr_table(), other]), ["method", "fold"])
    pcc = both[both["metric"] == "PCC"].set_index("fold")["value"]
    assert pcc["F"] == pytest.approx(0.35) and pcc["G"] == pytest.approx(0.2)


# --------------------------------------------------------------------------- one set per column
def test_models_with_different_spot_sets_are_scored_on_the_truths():
    """Two models of one cross-scale column predict on different bin sets (one on more bins than
    the truth has): both are scored on the truth's bins, and the count is recorded; a model that
    lacks truth bins is an error naming its file, never scored on its own subset."""
    from histomap.evaluation.report import benchmark_long

    rng = np.random.default_rng(7)
    genes = ["g1", "g2"]
    truth_x = rng.normal(size=(6, 2))
    truth = _spots([f"b{i}" for i in range(6)], genes, truth_x)
    wide = _spots([f"b{i}" for i in range(9)], genes, rng.normal(size=(9, 2)))  # + 3 extra
    exact = _spots([f"b{i}" for i in range(6)], genes, truth_x + rng.normal(size=(6, 2)))
    frames = []
    for model, pred in (("dense", wide), ("spot", exact)):
        table = evaluate_predictions({"S": truth}, {"S": pred}, genes)
        assert _value(summarise(table), sample="S", metric="n_spots_scored") == 6
        frames.append(table.assign(task="cross_scale", dataset="d", model=model, fold="F",
                                   scale_um=16.0, gene_set="all"))
    long_df = benchmark_long(pd.concat(frames, ignore_index=True))
    counts = long_df[long_df["metric"] == "n_spots_scored"]
    assert set(counts["value"]) == {6.0} and set(counts["model"]) == {"dense", "spot"}
    qc_only = _spots([f"b{i}" for i in range(4)], genes, truth_x[:4])  # QC dropped 2 bins
    with pytest.raises(InputError, match=r"spot\.h5ad.*lacks 2 of 6 truth spots"):
        evaluate_predictions({"S": truth}, {"S": qc_only}, genes,
                             pred_paths={"S": "spot.h5ad"})


def test_report_refuses_a_column_scored_on_different_sets():
    """Metric files of two models of one column scored on different truths (the old mix: spot
    models on the QC-filtered spots, dense models on every bin) are an error, not a table."""
    from histomap.evaluation.report import benchmark_long

    rng = np.random.default_rng(8)
    genes = ["g1", "g2"]
    frames = []
    for model, n in (("istar", 9), ("stnet", 6)):
        x = rng.normal(size=(n, 2))
        table = evaluate_matrices({"S": (x, x + rng.normal(size=(n, 2)))}, genes)
        frames.append(table.assign(task="cross_scale", dataset="d", model=model, fold="F",
                                   scale_um=16.0, gene_set="all"))
    with pytest.raises(InputError, match=r"different spots or bins.*istar 9, stnet 6"):
        benchmark_long(pd.concat(frames, ignore_index=True))


def test_mse_decomposition_adds_up_and_separates_a_level_shift():
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(40, 3))
    pattern = rng.normal(size=(40, 3))
    # a pure level shift per gene: all offset, no spot-to-spot error
    offset, spatial = mse_decomposition(y_true, y_true + np.array([0.5, -2.0, 0.0]))
    np.testing.assert_allclose(offset, [0.25, 4.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(spatial, 0.0, atol=1e-24)
    # shift plus a centred pattern: the parts are the shift squared and the pattern's variance
    y_pred = y_true + 1.5 + (pattern - pattern.mean(axis=0))
    offset, spatial = mse_decomposition(y_true, y_pred)
    np.testing.assert_allclose(offset, 2.25, rtol=1e-12)
    np.testing.assert_allclose(spatial, pattern.var(axis=0), rtol=1e-12)
    mse = ((y_pred - y_true) ** 2).mean(axis=0)
    # float64 sums of 40 terms of order 1: a few ulps of the MSE
    np.testing.assert_allclose(offset + spatial, mse, rtol=64 * np.finfo(np.float64).eps)
