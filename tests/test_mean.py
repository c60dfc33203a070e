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


def test_mean_predictions_open_in_scanpy(tmp_path):
    """The mean model's tables, built as the workflow does (ingest -> normalise_st ->
    train_mean -> predict_mean at the sample's spots and at a cross-scale truth's discs), carry
    the H&E in ``uns["spatial"]`` with their own spot diameter, so ``sc.pl.spatial`` draws them
    like every other model's predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from histomap.data.ingest import ingest_sample
    from histomap.data.preprocess import normalise_spots
    from histomap.data.synthetic import simulate_sample
    from histomap.evaluation.scales import truth_at_scale

    simulate_sample(tmp_path / "syn", seed=4, size_um=(300.0, 300.0), n_genes=40)
    ingest_sample(platform="synthetic", sample="synM", path=tmp_path / "syn",
                  out_dir=tmp_path / "ingest", spot_diameter_um=55.0, spatialdata_mpp=8.0)
    st = normalise_spots(ad.read_h5ad(tmp_path / "ingest" / "spots.h5ad"), min_counts=1,
                         min_genes=1, target_sum=1e4)
    st.write_h5ad(tmp_path / "st.h5ad")
    truth = truth_at_scale(ad.read_h5ad(tmp_path / "ingest" / "highres.h5ad"), st, 20.0,
                           min_spacing_um=20.0, preprocess={"min_counts": 1, "min_genes": 1})
    truth.write_h5ad(tmp_path / "truth_20um.h5ad")
    genes = list(st.var_names[:3])
    train_mean([tmp_path / "st.h5ad"], genes, tmp_path / "means.tsv")
    mpp = st.uns["histomap"]["mpp"]
    for source, diameter in (("st.h5ad", 55.0), ("truth_20um.h5ad", 20.0)):
        out = tmp_path / f"pred_{diameter:g}um.h5ad"
        predict_mean(tmp_path / "means.tsv", tmp_path / source, out, diameter_um=diameter)
        adata = ad.read_h5ad(out)
        assert "spatial" in adata.uns, f"{source}: mean predictions have no uns['spatial']"
        library = adata.uns["spatial"]["synM"]
        image = library["images"]["hires"]
        np.testing.assert_array_equal(image, st.uns["spatial"]["synM"]["images"]["hires"])
        assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(diameter / mpp)
        axes = sc.pl.spatial(adata, color=genes[0], show=False)
        ax = axes[0] if isinstance(axes, list) else axes
        assert ax.images and ax.images[0].get_array().shape[:2] == image.shape[:2]
        plt.close("all")
