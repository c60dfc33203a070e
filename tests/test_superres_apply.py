"""Super-resolution applied to a sample with LR ST and H&E but no HR truth: its measured spot map
is the LR input (build_lr_pairs, sharing the spot-grid lattice code of the benchmark's pairs),
the output grid is `factor` times finer, units and statistics come from the model's training
pairs only, and prediction writes the benchmark's maps format without truth, plus a figure."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from histomap.data.ingest import ingest_sample
from histomap.data.srmaps import MAPS_FORMAT, read_sr_maps
from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.lr_only import build_lr_pairs
from histomap.data.srpairs.points import build_sr_pairs
from histomap.data.srpairs.spot_grid import spot_lattice
from histomap.data.srpairs.store import has_truth, read_sr_pairs
from histomap.data.synthetic import simulate_sample
from histomap.errors import InputError
from histomap.evaluation.figures import plot_sr_panels, sr_panels
from histomap.tasks.superres.apply import lr_inputs_for_model
from histomap.tasks.superres.bin_centres import hr_pixel_centres
from histomap.tasks.superres.model_file import sr_model_meta
from histomap.tasks.superres.prediction import predict_sr
from histomap.tasks.superres.training import train_sr

SIZE_UM = (400.0, 400.0)
PITCH_UM = 50.0  # spot spacing of the applied sections = the model's LR pixel
FACTOR = 2
N_GENES = 4
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "patience": None, "amp": False,
         "device": "cpu"}


def _section(root, name, seed):
    folder = root / "synthetic" / name
    simulate_sample(folder, seed=seed, size_um=SIZE_UM, n_genes=40, spot_diameter_um=40.0,
                    spot_spacing_um=PITCH_UM)
    out = root / "ingest" / name
    ingest_sample(platform="synthetic", sample=name, path=folder, out_dir=out,
                  spot_diameter_um=40.0, spatialdata_mpp=None)
    return folder, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained on the HR truth of two sections (50 um LR -> 25 um HR, log1p), and a
    third section applied as LR-only: its spots, no truth."""
    root = tmp_path_factory.mktemp("srapply")
    pairs = []
    for i, name in enumerate(["trA", "trB"]):
        _, out = _section(root, name, 30 + i)
        cells = ad.read_h5ad(out / "highres.h5ad")
        if i == 0:
            totals = np.asarray(cells.X.sum(axis=0)).ravel()
            genes = [str(g) for g in cells.var_names[np.argsort(-totals)[:N_GENES]]]
        build_sr_pairs(cells, out / "slide.tif", genes, root / f"{name}.zarr", patch_um=200,
                       lr_um=PITCH_UM, scale=FACTOR, min_tissue=0.2, normalisation="log1p",
                       image_mpp=5.0, edge="floor")
        pairs.append(root / f"{name}.zarr")
    model = root / "model.pt"
    train_sr("unet", pairs, model_cfg={"base_channels": 4, "depth": 1},
                     train_cfg=TRAIN, validation={"fraction": 0.25, "block_um": 100}, seed=0,
                     out_model=model, out_log=root / "train_log.csv",
                     checkpoint_dir=root / "checkpoints")
    _, applied = _section(root, "appC", 40)
    return {"root": root, "model": model, "genes": genes, "spots": applied / "spots.h5ad",
            "slide": applied / "slide.tif", "train_pairs": pairs}


def test_lr_inputs_are_the_measured_spots_on_a_finer_grid(trained, tmp_path):
    meta = sr_model_meta(trained["model"])
    out = tmp_path / "lr.zarr"
    attrs = lr_inputs_for_model(trained["model"], trained["spots"], trained["slide"],
                                        out, sample="appC")
    arrays, back = read_sr_pairs(out)
    assert not has_truth(back) and "hr" not in arrays and back["truth"] is False
    assert attrs["scale"] == FACTOR and back["hr_shape"] == meta["pairs"]["hr_shape"]
    assert back["lr_shape"] == meta["pairs"]["lr_shape"]
    assert list(arrays["he"].shape[-2:]) == list(meta["pairs"]["image_hw"])
    assert back["genes"] == trained["genes"]
    # log1p units of the model: its training target sum, not a statistic of this section
    spots = ad.read_h5ad(trained["spots"])
    assert back["hr_target_sum"] == pytest.approx(meta["pairs"]["target_sum"])
    library = np.asarray(spots.X.sum(axis=1)).ravel()
    assert back["hr_target_sum"] != pytest.approx(float(np.median(library[library > 0])))
    # every measured spot is one LR pixel, f x f HR pixels of the mask, its counts normalised
    assert back["lr_um"] == pytest.approx(PITCH_UM, rel=0.02)
    assert back["hr_um"] == pytest.approx(back["lr_um"] / FACTOR)
    row, col, _ = spot_lattice(spots)
    r_min, c_min = back["lattice_origin"]
    n_lr = back["lr_shape"][0]
    target = back["hr_target_sum"]
    centres = hr_pixel_centres(arrays["origin_px"], arrays["grid_index"], back)
    gene_idx = spots.var_names.get_indexer(trained["genes"])
    seen = 0
    xy = np.asarray(spots.obsm["spatial"])
    for k in range(len(row)):
        r, c = row[k] - r_min, col[k] - c_min
        hits = [i for i, (gr, gc) in enumerate(arrays["grid_index"])
                if gr // FACTOR <= r < gr // FACTOR + n_lr and gc // FACTOR <= c < gc // FACTOR + n_lr]
        assert len(hits) == 1  # patches tile the lattice
        i = hits[0]
        lr_r, lr_c = r - arrays["grid_index"][i][0] // FACTOR, c - arrays["grid_index"][i][1] // FACTOR
        counts = np.asarray(spots.X[k].todense()).ravel() if hasattr(spots.X, "todense") \
            else np.asarray(spots.X[k]).ravel()
        expect = np.log1p(counts[gene_idx] / library[k] * target)
        np.testing.assert_allclose(arrays["lr"][i][:, lr_r, lr_c], expect, rtol=1e-5)
        block = (slice(lr_r * FACTOR, (lr_r + 1) * FACTOR), slice(lr_c * FACTOR, (lr_c + 1) * FACTOR))
        assert arrays["mask"][i][block].all()
        # the f x f HR pixels subdivide the spot: their centres average to the spot centre
        np.testing.assert_allclose(centres(i)[block].reshape(-1, 2).mean(axis=0), xy[k],
                                   atol=0.05 * PITCH_UM / back["slide_mpp"])
        seen += 1
    assert seen == len(row) and arrays["mask"].sum() == len(row) * FACTOR ** 2
    item = SRPairDataset(out, image_hw=meta["pairs"]["image_hw"])[0]
    assert "hr" not in item and tuple(item["lr_up"].shape[-2:]) == tuple(back["hr_shape"])


def test_apply_sr_end_to_end_without_truth(trained, tmp_path):
    lr = tmp_path / "lr.zarr"
    lr_inputs_for_model(trained["model"], trained["spots"], trained["slide"], lr,
                                sample="appC")
    maps_zarr, bins = tmp_path / "maps.zarr", tmp_path / "bins.h5ad"
    info = predict_sr(trained["model"], lr, maps_zarr, bins, device="cpu",
                              sample="appC")
    maps, attrs = read_sr_maps(maps_zarr)
    arrays, pairs_attrs = read_sr_pairs(lr)
    assert attrs["format"] == MAPS_FORMAT and attrs["source"] == "lr_only"
    n = arrays["lr"].shape[0]
    assert maps["pred"].shape == (n, N_GENES, *pairs_attrs["hr_shape"])
    assert np.isfinite(maps["pred_counts"][...]).all()
    table = ad.read_h5ad(bins)
    assert table.n_obs == int(arrays["mask"].sum()) == info["n_bins"]
    assert "truth" not in table.layers and "truth_counts" not in table.layers
    assert table.uns["superres"]["truth"] is False
    assert np.isfinite(table.X).all() and np.ptp(table.layers["pred"]) > 0
    # the bins lie on the slide, on the 25 um grid
    assert table.uns["histomap"]["bin_um"] == pytest.approx(pairs_attrs["hr_um"])
    panels = sr_panels(lr, maps_zarr, n_patches=2, n_genes=2)
    assert len(panels) == 4 and all(p["hr"] is None for p in panels)
    plot_sr_panels(panels, tmp_path / "map.png", title="unet x2 on appC")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_lr_inputs_need_spots_and_the_models_genes(trained, tmp_path):
    spots = ad.read_h5ad(trained["spots"])
    with pytest.raises(InputError, match="no spots"):
        build_lr_pairs(spots[:0].copy(), trained["slide"], trained["genes"], tmp_path / "a.zarr",
                       factor=2, n_lr=4, he_hw=(40, 40))
    path = tmp_path / "fewer.h5ad"
    spots[:, [g for g in spots.var_names if g != trained["genes"][0]]].copy().write_h5ad(path)
    with pytest.raises(InputError, match="not measured"):
        lr_inputs_for_model(trained["model"], path, trained["slide"], tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_ceil_layout_crops_the_he_to_the_hr_patch(trained, tmp_path):
    """A model trained with edge="ceil" (fewer HR pixels than LR pixels x factor): the H&E
    covers the HR patch only, at the model's H&E size, as in training."""
    spots = ad.read_h5ad(trained["spots"])
    out = tmp_path / "ceil.zarr"
    attrs = build_lr_pairs(spots, trained["slide"], trained["genes"], out, factor=2, n_lr=4,
                           n_hr=7, he_hw=(35, 35), target_sum=1000.0)
    arrays, back = read_sr_pairs(out)
    assert attrs["edge"] == "ceil" and back["hr_shape"] == [7, 7]
    assert arrays["he"].shape[1:] == (3, 35, 35) and arrays["mask"].shape[1:] == (7, 7)
    assert back["image_mpp"] == pytest.approx(3.5 * back["lr_um"] / 35)
    full = tmp_path / "full.zarr"
    build_lr_pairs(spots, trained["slide"], trained["genes"], full, factor=2, n_lr=4,
                   he_hw=(40, 40), target_sum=1000.0)
    whole, _ = read_sr_pairs(full)
    np.testing.assert_array_equal(whole["lr"], arrays["lr"])
    # the H&E of the 7 x 7 HR pixels: the first 35 of the 4 spots' 40 px, read at one scale
    np.testing.assert_array_equal(arrays["he"], whole["he"][:, :, :35, :35])
    item = SRPairDataset(out)[0]
    assert tuple(item["lr_up"].shape[-2:]) == (7, 7)
