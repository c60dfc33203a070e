"""The trivial `mean` baseline: the per-gene mean of the training spots, constant over space."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histomap.data.sample import annotate_spots
from histomap.errors import InputError
from histomap.evaluation.metrics import evaluate_predictions
from histomap.tasks.mean import predict_mean, read_means, train_mean


def _spots(path, x, genes, name, diameter=55.0):
    adata = ad.AnnData(X=np.asarray(x, np.float32),
                       obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(len(x))]),
                       var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = np.column_stack([np.arange(len(x)) * 10.0, np.zeros(len(x))])
    annotate_spots(adata, sample=name, platform="synthetic", mpp=0.5, spot_diameter_um=diameter,
                   image="x.tif")
    adata.write_h5ad(path)
    return adata


def test_mean_is_pooled_over_training_spots_and_constant(tmp_path):
    genes = ["g1", "g2", "g3"]
    # two training samples of different sizes: the pooled mean differs from the mean of the
    # per-sample means (g1: pooled (1+2+3+10)/4 = 4, mean of means (2+10)/2 = 6)
    _spots(tmp_path / "a.h5ad", [[1, 0, 5], [2, 1, 5], [3, 2, 5]], genes, "A")
    _spots(tmp_path / "b.h5ad", [[10, 3, 5]], genes, "B")
    test = _spots(tmp_path / "t.h5ad", [[100, 100, 100], [0, 0, 0]], genes, "T")
    panel = ["g3", "g1"]  # the panel's order, a subset of the genes
    means = train_mean([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], panel, tmp_path / "m.tsv")
    np.testing.assert_allclose(means.loc[["g1", "g3"]], [4.0, 5.0])
    assert list(read_means(tmp_path / "m.tsv").index) == panel
    np.testing.assert_allclose(read_means(tmp_path / "m.tsv").to_numpy(), [5.0, 4.0])

    pred = predict_mean(tmp_path / "m.tsv", tmp_path / "t.h5ad", tmp_path / "p.h5ad",
                        diameter_um=8.0)
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(back.obs_names) == list(test.obs_names) and list(back.var_names) == panel
    np.testing.assert_allclose(back.X, [[5.0, 4.0], [5.0, 4.0]])
    np.testing.assert_allclose(back.obsm["spatial"], test.obsm["spatial"])
    assert back.uns["histomap"]["spot_diameter_um"] == 8.0
    assert pred.uns["histomap"]["model"]["model"] == "mean"
    # its MSE per gene is the truth's spread about the training mean, by hand
    table = evaluate_predictions({"T": test}, {"T": back}, panel)
    mse = table[(table["sample"] == "T") & (table["metric"] == "mse")].set_index("gene")["value"]
    assert mse["g1"] == pytest.approx(((100 - 4) ** 2 + 4 ** 2) / 2)
    assert mse["g3"] == pytest.approx(((100 - 5) ** 2 + 5 ** 2) / 2)


def test_mean_rejects_missing_panel_gene(tmp_path):
    _spots(tmp_path / "a.h5ad", [[1, 2]], ["g1", "g2"], "A")
    with pytest.raises(InputError, match="a.h5ad.*g9"):
        train_mean([tmp_path / "a.h5ad"], ["g1", "g9"], tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists()
