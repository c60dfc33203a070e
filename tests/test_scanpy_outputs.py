"""Every spot/bin table the pipeline writes opens in scanpy: ``uns["spatial"]`` with the H&E and
scale factors in scanpy's convention, so ``sc.pl.spatial(adata, color=gene)`` draws the spots over
the slide with no other argument (headless, matplotlib Agg)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from histomap.data.ingest import ingest_sample  # noqa: E402
from histomap.data.preprocess import normalise_spots  # noqa: E402
from histomap.data.synthetic import simulate_sample  # noqa: E402
from histomap.evaluation.scales import truth_at_scale  # noqa: E402

SIZE_UM = 400.0


class MeanColour(nn.Module):
    """A context-free stand-in dense model: one map channel per gene from the mean colour."""
    out_stride = 4

    def __init__(self, n_genes):
        super().__init__()
        self.n_genes = n_genes

    def forward(self, images):
        pooled = F.avg_pool2d(images, 4).mean(dim=1, keepdim=True)
        return pooled.expand(-1, self.n_genes, -1, -1) * 3.0


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """One table of every kind the pipeline writes, each written to h5ad and read back."""
    from histomap.data.srpairs import build_sr_pairs
    from histomap.tasks import superres as sr_task
    from histomap.tasks.dense import dense_spot_table
    from histomap.tasks.dense_map import predict_dense_map

    root = tmp_path_factory.mktemp("scanpy")
    simulate_sample(root / "syn", seed=3, size_um=(SIZE_UM, SIZE_UM), n_genes=40)
    ingest_sample(platform="synthetic", sample="synX", path=root / "syn", out_dir=root / "ingest",
                  spot_diameter_um=55.0, spatialdata_mpp=8.0)
    spots = ad.read_h5ad(root / "ingest" / "spots.h5ad")
    highres = ad.read_h5ad(root / "ingest" / "highres.h5ad")
    st = normalise_spots(spots, min_counts=1, min_genes=1, target_sum=1e4)
    st.write_h5ad(root / "st.h5ad")
    truth = truth_at_scale(highres, st, 20.0, min_spacing_um=20.0,
                           preprocess={"min_counts": 1, "min_genes": 1})
    truth.write_h5ad(root / "truth_20um.h5ad")
    genes = list(st.var_names[:5])
    slide = root / "ingest" / "slide.tif"
    mpp = st.uns["histomap"]["mpp"]
    dense = predict_dense_map(MeanColour(len(genes)), slide, (0, 0, SIZE_UM / mpp, SIZE_UM / mpp),
                              input_mpp=2.0, tile_px=64, overlap_px=16,
                              out_zarr=root / "dense.zarr", device="cpu", genes=genes)
    dense_spot_table(dense, root / "st.h5ad", 8.0, root / "spots_8um.h5ad")
    pairs = root / "pairs.zarr"
    build_sr_pairs(highres, slide, genes, pairs, patch_um=160, lr_um=20, scale=4, stride_um=160,
                   min_tissue=0.2, image_mpp=5.0, edge="ceil")
    sr_task.train_sr("bicubic", [pairs], model_cfg={}, train_cfg={"epochs": 1, "device": "cpu"},
                     validation={"fraction": 0.2, "block_um": 80}, seed=0,
                     out_model=root / "sr.pt", out_log=root / "sr_log.csv",
                     checkpoint_dir=root / "ckpt")
    sr_task.predict_sr(root / "sr.pt", pairs, root / "maps.zarr", root / "bins.h5ad",
                       device="cpu", sample="synX")
    names = {"ingest spots": root / "ingest" / "spots.h5ad",
             "ingest highres": root / "ingest" / "highres.h5ad", "normalised st": root / "st.h5ad",
             "truth_at_scale": root / "truth_20um.h5ad",
             "dense prediction": root / "spots_8um.h5ad", "SR bins": root / "bins.h5ad"}
    return {k: ad.read_h5ad(v) for k, v in names.items()}


KINDS = ["ingest spots", "ingest highres", "normalised st", "truth_at_scale", "dense prediction",
         "SR bins"]


@pytest.mark.parametrize("kind", KINDS)
def test_sc_pl_spatial_draws_spots_over_the_he(tables, kind):
    import scanpy as sc

    adata = tables[kind]
    library = adata.uns["spatial"]["synX"]
    image = library["images"]["hires"]
    scalef = library["scalefactors"]["tissue_hires_scalef"]
    # spot centres (level-0 px) scaled to the hires image lie on it
    xy = np.asarray(adata.obsm["spatial"]) * scalef
    assert (xy >= 0).all() and (xy[:, 0] <= image.shape[1]).all()
    assert (xy[:, 1] <= image.shape[0]).all()
    # the spot diameter is the table's own (um / mpp), not the source's
    mpp = adata.uns["histomap"]["mpp"]
    expect_um = {"ingest spots": 55.0, "normalised st": 55.0, "truth_at_scale": 20.0,
                 "dense prediction": 8.0, "SR bins": 5.0, "ingest highres": 10.0}[kind]
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(expect_um / mpp)
    gene = str(adata.var_names[0])
    axes = sc.pl.spatial(adata, color=gene, show=False)
    ax = axes[0] if isinstance(axes, list) else axes
    assert ax.images, "no H&E drawn under the spots"
    assert ax.images[0].get_array().shape[:2] == image.shape[:2]
    plt.close("all")


def test_without_uns_spatial_scanpy_cannot_plot(tables):
    """The check above can fail: the same table without ``uns["spatial"]`` does not plot."""
    import scanpy as sc

    adata = tables["dense prediction"].copy()
    del adata.uns["spatial"]
    with pytest.raises(Exception):
        sc.pl.spatial(adata, color=str(adata.var_names[0]), show=False)
    plt.close("all")
