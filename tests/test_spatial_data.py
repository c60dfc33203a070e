"""One SpatialData per sample: spatialdata.read_zarr reads the ingest ``sample.zarr`` and the
per-sample container with the predictions without a warning; H&E, spot circles, tables and
dense maps share the ``global`` coordinate system in micrometres (and ``pixels``)."""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

from histomap.data.ingest import ingest_sample
from histomap.data.spatial_data import add_predictions, read_spatialdata, write_spatialdata
from histomap.data.synthetic import simulate_sample

SIZE_UM = 400.0


class Redness(nn.Module):
    out_stride = 4

    def __init__(self, n_genes):
        super().__init__()
        self.n_genes = n_genes

    def forward(self, images):
        red = F.avg_pool2d(images[:, :1], 4)
        return red * torch_arange(self.n_genes, images)


def torch_arange(n, like):
    import torch
    return torch.arange(1, n + 1, dtype=like.dtype).view(1, n, 1, 1)


def read_quietly(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = read_spatialdata(path)
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught]
    return sdata


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from histomap.tasks.dense_map import predict_dense_map

    root = tmp_path_factory.mktemp("sdata")
    simulate_sample(root / "syn", seed=5, size_um=(SIZE_UM, SIZE_UM), n_genes=40)
    ingest_sample(platform="synthetic", sample="synS", path=root / "syn", out_dir=root / "ingest",
                  spot_diameter_um=55.0, spatialdata_mpp=4.0)
    spots = ad.read_h5ad(root / "ingest" / "spots.h5ad")
    mpp = spots.uns["histomap"]["mpp"]
    genes = list(spots.var_names[:3])
    region = (100.0, 60.0, 500.0, 600.0)  # level-0 x0, y0, w, h: the map starts off the corner
    predict_dense_map(Redness(3), root / "ingest" / "slide.tif", region, input_mpp=1.0,
                      tile_px=64, overlap_px=16, out_zarr=root / "dense.zarr", device="cpu",
                      genes=genes)
    return root, spots, mpp, genes, region


def test_ingest_sample_zarr_is_in_micrometres(sample):
    from spatialdata import get_extent
    from spatialdata.transformations import get_transformation

    root, spots, mpp, _, _ = sample
    sdata = read_quietly(root / "ingest" / "sample.zarr")
    assert set(sdata.coordinate_systems) == {"global", "pixels"}
    circles = sdata.shapes["spots"]
    assert list(circles.index.astype(str)) == list(spots.obs_names)
    np.testing.assert_allclose(circles.geometry.x.to_numpy(), spots.obsm["spatial"][:, 0] * mpp)
    np.testing.assert_allclose(circles.geometry.y.to_numpy(), spots.obsm["spatial"][:, 1] * mpp)
    np.testing.assert_allclose(circles["radius"].to_numpy(), 27.5)
    to_px = get_transformation(circles, to_coordinate_system="pixels")
    np.testing.assert_allclose(to_px.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0], 1 / mpp)
    table = sdata.tables["table"]
    assert table.n_obs == spots.n_obs and table.uns["spatialdata_attrs"]["region"] == "spots"
    he = sdata.images["he"]
    assert len(he) > 1  # multiscale
    assert list(he["scale0"]["image"].coords["c"].values) == ["r", "g", "b"]
    extent = get_extent(he, coordinate_system="global")
    assert extent["x"] == pytest.approx((0.0, SIZE_UM), abs=4.0)
    assert extent["y"] == pytest.approx((0.0, SIZE_UM), abs=4.0)


def test_sample_with_predictions_shares_the_micrometre_system(sample, tmp_path):
    from spatialdata import get_extent
    from spatialdata.transformations import get_transformation

    root, spots, mpp, genes, region = sample
    sdata = read_spatialdata(root / "ingest" / "sample.zarr")
    pred = spots[:, genes].copy()
    pred.X = np.asarray(pred.X.todense() if hasattr(pred.X, "todense") else pred.X, np.float32)
    add_predictions(sdata, dense_maps={"pixnet_P1_seed0": root / "dense.zarr"},
                    tables={"pixnet_P1_seed0": pred[5:].copy()})
    out = write_spatialdata(sdata, tmp_path / "synS.zarr")
    back = read_quietly(out)
    image = back.images["dense_pixnet_P1_seed0"]
    level0 = image["scale0"]["image"]
    assert list(level0.coords["c"].values) == genes
    assert level0.data.chunksize[0] == 1  # one gene per chunk
    extent = get_extent(image, coordinate_system="global")
    x0, y0, w, h = region
    assert extent["x"][0] == pytest.approx(x0 * mpp) and extent["y"][0] == pytest.approx(y0 * mpp)
    assert extent["x"][1] == pytest.approx((x0 + w) * mpp, abs=4 * 1.0)
    # the map pixel holding a spot centre is where the map says: global um -> map index
    affine = get_transformation(level0, to_coordinate_system="global").to_affine_matrix(
        ("x", "y"), ("x", "y"))
    assert affine[0, 0] == pytest.approx(4.0) and affine[0, 2] == pytest.approx(x0 * mpp)
    dense = np.asarray(level0.data[0])
    from histomap.tasks.dense_map import read_dense
    np.testing.assert_array_equal(dense, read_dense(root / "dense.zarr").read()[0])
    table = back.tables["pred_pixnet_P1_seed0"]
    assert table.n_obs == spots.n_obs - 5 and list(table.var_names) == genes
    assert table.uns["spatialdata_attrs"]["region"] == "spots"
    assert "spatial" not in table.uns
    assert set(back.coordinate_systems) == {"global", "pixels"}
    with pytest.raises(ValueError, match="spots the sample does not have"):
        bad = pred.copy()
        bad.obs_names = [f"x{n}" for n in bad.obs_names]
        add_predictions(back, tables={"bad": bad})


def test_spatialdata_plot_draws_he_spots_and_a_dense_gene(sample, tmp_path):
    """spatialdata-plot renders the sample in `global` (um): the H&E, the spots coloured by a
    gene of the counts table, and one gene (channel) of the dense map."""
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    root, spots, _, genes, _ = sample
    sdata = read_spatialdata(root / "ingest" / "sample.zarr")
    add_predictions(sdata, dense_maps={"run": root / "dense.zarr"})
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    (sdata.pl.render_images("he").pl.render_shapes("spots", color=genes[0], table_name="table")
     .pl.show(coordinate_systems="global", ax=axes[0]))
    sdata.pl.render_images("dense_run", channel=genes[1]).pl.show(coordinate_systems="global",
                                                                    ax=axes[1])
    assert axes[0].images and axes[0].collections and axes[1].images
    x0, x1 = axes[0].get_xlim()
    assert max(x0, x1) == pytest.approx(SIZE_UM, rel=0.1)  # micrometres, not pixels
    fig.savefig(tmp_path / "sdata.png")
    plt.close(fig)
