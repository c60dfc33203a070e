"""Train once, apply anywhere: a bundle trained on synthetic sections (train_final), read back and
applied to an H&E-only slide (platform `he`) gives the benchmark's dense map of that slide;
pseudo-spot and bin tables read out of it; spot-model bundles on pseudo-spots."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histomap.data.ingest import ingest_sample
from histomap.data.preprocess import normalise_spots
from histomap.data.synthetic import simulate_sample
from histomap.data.tiling import tile_slide
from histomap.errors import InputError
from histomap.tasks.apply import (
    apply_dense,
    bins_from_dense,
    dense_tables,
    hex_lattice,
    on_tissue,
    plot_applied,
    spot_model_tables,
    square_lattice,
)
from histomap.tasks.bundle import BUNDLE_FORMAT, read_bundle, train_bundle
from histomap.tasks.dense import predict_dense
from histomap.tasks.dense_map import DenseMap, read_dense

SIZE_UM = (400.0, 400.0)
TINY_PIXNET = {"encoder": "test_resnet", "decoder_channels": [8, 8, 16, 16, 16], "out_stride": 4,
               "input_mpp": 2.0, "window_px": 64, "loss": "joint"}
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "patience": None, "amp": False,
         "device": "cpu"}
VALIDATION = {"fraction": 0.2, "block_um": 150}
TILING = dict(tile_px=64, tile_mpp=2.0, mask_mpp=8.0, min_tissue=0.01)


def _ingest(root, name, platform, path, **kw):
    out = root / "ingest" / name
    ingest_sample(platform=platform, sample=name, path=path, out_dir=out, spatialdata_mpp=None,
                  **kw)
    tile_slide(out / "slide.tif", root / "tiles" / f"{name}.zarr",
               root / "tiles" / f"{name}.parquet", **TILING)
    return out / "slide.tif", root / "tiles" / f"{name}.parquet", out / "spots.h5ad"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two synthetic training sections, a third one held out, a PixNet bundle trained on the two."""
    root = tmp_path_factory.mktemp("apply")
    st, slides = [], []
    for i, name in enumerate(["synA", "synB", "synC"]):
        simulate_sample(root / "synthetic" / name, seed=10 + i, size_um=SIZE_UM)
        slide, _, spots = _ingest(root, name, "synthetic", root / "synthetic" / name)
        norm = normalise_spots(ad.read_h5ad(spots), min_counts=10, min_genes=5,
                               target_sum=1e4)
        norm.write_h5ad(root / f"{name}.h5ad")
        st.append(root / f"{name}.h5ad")
        slides.append(slide)
    mean = np.asarray(ad.read_h5ad(st[0]).X.mean(axis=0)).ravel()
    genes = list(ad.read_h5ad(st[0]).var_names[np.argsort(-mean)[:5]])
    bundle = train_bundle("pixnet", st[:2], slides[:2], genes, name="pixnet",
                          model_cfg={**TINY_PIXNET, "checkpoint": None}, train_cfg=TRAIN,
                          validation=VALIDATION, seed=0, out_dir=root / "bundles" / "pixnet",
                          checkpoint_dir=root / "checkpoints" / "pixnet")
    return {"root": root, "st": st, "slides": slides, "genes": genes, "bundle": bundle}


def test_bundle_describes_itself(demo):
    meta = json.loads((demo["bundle"].path / "bundle.json").read_text())
    assert meta["format"] == BUNDLE_FORMAT and meta["architecture"] == "pixnet"
    assert meta["kind"] == "dense" and meta["genes"] == demo["genes"]
    assert meta["normalisation"] == {"target_sum": 1e4, "log1p": True}
    assert meta["input"]["mpp"] == 2.0 and meta["input"]["window_px"] == 64
    assert meta["input"]["out_stride"] == 4 and meta["input"]["spot_diameters_um"] == [55.0]
    assert meta["encoder"]["name"] == "test_resnet" and meta["encoder"]["checkpoint"] is None
    assert meta["training"]["samples"] == ["synA", "synB"] and meta["training"]["seed"] == 0
    assert set(meta["versions"]) >= {"histomap", "torch", "timm"}
    assert read_bundle(demo["bundle"].path).genes == demo["genes"]


def test_bundle_with_other_weights_is_refused(demo, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(demo["bundle"].path, copy)
    with open(copy / "model.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="SHA-256"):
        read_bundle(copy)
    with pytest.raises(InputError, match="bundle.json"):
        read_bundle(tmp_path)


def test_applied_map_is_the_benchmark_map(demo):
    """The held-out section: predicted as the benchmark does (its ST sample, the model file,
    spot discs covered) and applied as an H&E-only slide (platform `he`, mpp from the slide's
    metadata): the same weights give the same dense map, pixel for pixel. (Tiles keep any
    tissue, so every spot lies in a tissue tile and the benchmark adds no spot discs beyond
    them; a different prediction tiling, e.g. overlap_px=8 in apply_dense, fails here.)"""
    root = demo["root"]
    bench = predict_dense(demo["bundle"].model_path, demo["slides"][2],
                          root / "tiles" / "synC.parquet", demo["st"][2], root / "bench.zarr",
                          device="cpu", cover_um=55.0)
    slide, tiles, spots = _ingest(root, "synC_he", "he",
                                  root / "synthetic" / "synC" / "he.tif")
    assert ad.read_h5ad(spots).n_obs == 0
    applied = apply_dense(demo["bundle"].path, slide, tiles, root / "applied.zarr", device="cpu")
    assert applied.origin_px == bench.origin_px and applied.mpp == bench.mpp
    np.testing.assert_array_equal(np.asarray(applied.mask), np.asarray(bench.mask))
    np.testing.assert_array_equal(applied.read(), bench.read())
    assert applied.genes == demo["genes"]
    assert np.asarray(applied.mask).any() and np.ptp(applied.read()) > 0


def test_tables_and_figure(demo):
    root = demo["root"]
    slide, tiles, spots = _ingest(root, "synC_he2", "he",
                                  root / "synthetic" / "synC" / "he.tif")
    apply_dense(demo["bundle"], slide, tiles, root / "t" / "dense.zarr", device="cpu")
    out = [root / "t" / "spots_55um.h5ad", root / "t" / "bins_16um.h5ad"]
    written = dense_tables(demo["bundle"], root / "t" / "dense.zarr", tiles, spots, slide,
                           mask_mpp=8.0, spot_diameters_um=[55], bin_um=[16],
                           out_spots=out[:1], out_bins=out[1:])
    assert written == out
    spots55, bins16 = (ad.read_h5ad(p) for p in written)
    # lattice points in tissue tiles and on tissue (tiles also hold glass at the edge)
    for table in (spots55, bins16):
        assert on_tissue(slide, table.obsm["spatial"], 8.0).all()
    xy, _ = hex_lattice(pd.read_parquet(tiles), 0.5, 55.0)
    assert len(spots55) < len(xy)
    for table, shape, size in ((spots55, "disc", 55.0), (bins16, "square", 16.0)):
        back = ad.read_h5ad(out[0] if shape == "disc" else out[1])
        assert back.n_obs == table.n_obs > 10 and list(back.var_names) == demo["genes"]
        assert (back.obs["shape"] == shape).all() and (back.obs["diameter_um"] == size).all()
        assert back.uns["histomap"]["platform"] == "he"
        assert back.uns["histomap"]["model"]["bundle"] == "pixnet"
        assert np.isfinite(back.X).all()
        # scanpy-ready: the slide's H&E, and the table's own spot size in full-resolution px
        (library,) = back.uns["spatial"].values()
        assert library["images"]["hires"].ndim == 3
        assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(size / 0.5)
    # a 16 um bin is 2 x 2 map pixels of 8 um (map anchored at a tile corner, 0.5 um/px slide)
    dmap = read_dense(root / "t" / "dense.zarr")
    r, c = bins16.obs[["array_row", "array_col"]].to_numpy()[len(bins16) // 2]
    y0 = int(round(r * 16 / dmap.mpp - dmap.origin_px[1] * dmap.slide_mpp / dmap.mpp))
    x0 = int(round(c * 16 / dmap.mpp - dmap.origin_px[0] * dmap.slide_mpp / dmap.mpp))
    mask = np.asarray(dmap.mask[y0:y0 + 2, x0:x0 + 2], float)
    expect = (dmap.read(y0, y0 + 2, x0, x0 + 2) * mask).sum(axis=(1, 2)) / mask.sum()
    np.testing.assert_allclose(bins16.X[len(bins16) // 2], expect, rtol=1e-5)
    plot_applied(slide, demo["genes"][:2], root / "t" / "map.png",
                 dense_zarr=root / "t" / "dense.zarr", mask_mpp=8.0)
    assert (root / "t" / "map.png").stat().st_size > 1000


def _numpy_map(values: np.ndarray, mask: np.ndarray, origin_px, mpp, slide_mpp) -> DenseMap:
    return DenseMap(path=None, dense=values, mask=mask, genes=[f"g{i}" for i in range(len(values))],
                    mpp=mpp, origin_px=origin_px, slide_mpp=slide_mpp, attrs={})


def test_bins_are_exact_area_means():
    """Bins over a map offset by a fraction of a pixel: each bin's value is the area-weighted
    mean of the map pixels it overlaps (brute force on a 0.5 um grid), mask pixels only."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 12, 14)).astype(np.float32)
    mask = np.ones((12, 14), np.uint8)
    mask[:, :3] = 0  # left band uncovered
    dmap = _numpy_map(values * mask, mask, origin_px=(6.0, 2.0), mpp=4.0, slide_mpp=0.5)
    rowcol = np.array([[0, 0], [1, 2], [3, 4], [2, 1]])
    got = bins_from_dense(dmap, rowcol, bin_um=10.0)
    fine = np.kron(values * mask, np.ones((8, 8)))  # 0.5 um sub-pixels
    fmask = np.kron(mask, np.ones((8, 8)))
    ox, oy = 6.0 * 0.5, 2.0 * 0.5  # map origin in um
    for (r, c), row in zip(rowcol, got):
        ys = np.arange(fine.shape[1]) * 0.5 + oy + 0.25
        xs = np.arange(fine.shape[2]) * 0.5 + ox + 0.25
        iy = (ys >= r * 10) & (ys < (r + 1) * 10)
        ix = (xs >= c * 10) & (xs < (c + 1) * 10)
        m = fmask[np.ix_(iy, ix)]
        if m.sum() == 0:
            assert np.isnan(row).all()
            continue
        expect = fine[:, iy][:, :, ix].reshape(2, -1) @ m.ravel() / m.sum()
        np.testing.assert_allclose(row, expect, rtol=1e-5, atol=1e-6)


def test_lattices_cover_tissue_only():
    tiles = pd.DataFrame({"x0_px": [0.0, 200.0], "y0_px": [0.0, 0.0], "size_px0": [100.0, 100.0]})
    xy, rc = hex_lattice(tiles, mpp=1.0, spacing_um=20.0)
    inside = ((xy[:, 0] < 100) | ((xy[:, 0] >= 200) & (xy[:, 0] < 300))) & (xy[:, 1] < 100)
    assert inside.all() and len(xy) > 30
    rows = np.unique(rc[:, 0])
    np.testing.assert_allclose(np.diff(np.unique(xy[:, 1])), 20 * np.sqrt(3) / 2)
    assert len(rows) == len(np.unique(xy[:, 1]))
    xy, rc = square_lattice(tiles, mpp=0.5, bin_um=10.0)  # 20 px bins: 5 x 5 per tile
    assert len(xy) == 50
    np.testing.assert_allclose(xy, (rc[:, ::-1] + 0.5) * 20)


def test_spot_model_bundle_on_pseudo_spots(demo):
    root = demo["root"]
    bundle = train_bundle("stnet", demo["st"][:1], demo["slides"][:1], demo["genes"],
                          name="stnet", model_cfg={"backbone": "resnet10t", "input_mpp": 4.0,
                                                   "crop_um": 64, "dropout": 0.0},
                          train_cfg=TRAIN, validation=VALIDATION, seed=0,
                          out_dir=root / "bundles" / "stnet",
                          checkpoint_dir=root / "checkpoints" / "stnet")
    assert bundle.meta["kind"] == "spot" and bundle.meta["input"]["crop_um"] == 64.0
    slide, tiles, spots = _ingest(root, "synC_he3", "he",
                                  root / "synthetic" / "synC" / "he.tif")
    with pytest.raises(InputError, match="spot model"):
        apply_dense(bundle, slide, tiles, root / "x.zarr")
    (table,) = spot_model_tables(bundle, slide, tiles, spots, spot_diameters_um=[55],
                                 out_spots=[root / "s" / "spots.h5ad"], mask_mpp=8.0,
                                 device="cpu")
    assert table.n_obs > 5 and np.isfinite(table.X).all()
    assert table.uns["histomap"]["model"]["crop_um"] == 64.0


def test_histogene_bundle_on_pseudo_spots(demo):
    """HistoGene sees the pseudo-spots as one sequence, their lattice indices as positions."""
    root = demo["root"]
    bundle = train_bundle("histogene", demo["st"][:1], demo["slides"][:1], demo["genes"],
                          name="histogene",
                          model_cfg={"patch_px": 8, "dim": 16, "depth": 1, "heads": 2,
                                     "n_pos": 32, "input_mpp": 4.0, "crop_um": 64,
                                     "max_spots": 16},
                          train_cfg=TRAIN, validation=VALIDATION, seed=0,
                          out_dir=root / "bundles" / "histogene",
                          checkpoint_dir=root / "checkpoints" / "histogene")
    assert bundle.meta["kind"] == "spot" and bundle.meta["encoder"]["name"] == "histogene"
    slide, tiles, spots = _ingest(root, "synC_he4", "he",
                                  root / "synthetic" / "synC" / "he.tif")
    (table,) = spot_model_tables(bundle, slide, tiles, spots, spot_diameters_um=[55],
                                 spot_spacing_um=100, out_spots=[root / "h" / "spots.h5ad"],
                                 mask_mpp=8.0, device="cpu")
    assert table.n_obs >= 3 and np.isfinite(table.X).all()
    assert table.uns["histomap"]["model"]["model"] == "histogene"


def test_one_sample_config_trains_and_applies(demo):
    """One ST sample is enough for train_final (validation blocks of that sample), and its
    bundle applies to an H&E-only slide."""
    root = demo["root"]
    bundle = train_bundle("pixnet", demo["st"][:1], demo["slides"][:1], demo["genes"],
                          name="pixnet_one", model_cfg={**TINY_PIXNET, "checkpoint": None},
                          train_cfg=TRAIN, validation=VALIDATION, seed=1,
                          out_dir=root / "bundles" / "pixnet_one",
                          checkpoint_dir=root / "checkpoints" / "pixnet_one")
    assert bundle.meta["training"]["samples"] == ["synA"]
    assert np.isfinite(bundle.meta["training"]["best_val_loss"])  # validation blocks existed
    slide, tiles, _ = _ingest(root, "synC_he5", "he", root / "synthetic" / "synC" / "he.tif")
    dmap = apply_dense(read_bundle(bundle.path), slide, tiles, root / "one.zarr", device="cpu")
    covered = np.asarray(dmap.mask) > 0
    assert covered.any() and np.isfinite(dmap.read()[:, covered]).all()


def test_applied_slide_spatialdata_shares_the_micrometre_system(demo, tmp_path):
    """The SpatialData of an H&E-only slide a bundle was applied to (rule apply_spatialdata):
    spatialdata.read_zarr reads it without a warning; the H&E, the dense map (channels named by
    gene), the pseudo-spot circles and the bin squares lie in `global` (um) and `pixels`, and
    each table annotates its own shapes."""
    import warnings

    from spatialdata import get_extent
    from spatialdata.transformations import get_transformation

    from histomap.data.spatial_data import applied_spatialdata, write_spatialdata

    root = demo["root"]
    out = root / "ingest" / "synC_sd"
    ingest_sample(platform="he", sample="synC_sd", path=root / "synthetic" / "synC" / "he.tif",
                  out_dir=out, spatialdata_mpp=4.0)
    tiles = root / "tiles" / "synC_sd.parquet"
    tile_slide(out / "slide.tif", root / "tiles" / "synC_sd.zarr", tiles, **TILING)
    dense = tmp_path / "dense.zarr"
    apply_dense(demo["bundle"], out / "slide.tif", tiles, dense, device="cpu")
    paths = [tmp_path / "spots_55um.h5ad", tmp_path / "bins_16um.h5ad"]
    dense_tables(demo["bundle"], dense, tiles, out / "spots.h5ad", out / "slide.tif",
                 mask_mpp=8.0, spot_diameters_um=[55], bin_um=[16], out_spots=paths[:1],
                 out_bins=paths[1:])
    tables = {f"pixnet_{p.stem}": ad.read_h5ad(p) for p in paths}
    sdata = applied_spatialdata(out / "sample.zarr", dense_maps={"pixnet": dense},
                                tables=tables)
    path = write_spatialdata(sdata, tmp_path / "synC_sd.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import spatialdata

        back = spatialdata.read_zarr(path)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert set(back.coordinate_systems) == {"global", "pixels"}
    assert set(back.images) == {"he", "dense_pixnet"}
    assert set(back.shapes) == {"pixnet_spots_55um", "pixnet_bins_16um"}
    assert set(back.tables) == {"pixnet_spots_55um_table", "pixnet_bins_16um_table"}
    mpp = 0.5
    he = get_extent(back.images["he"], coordinate_system="global")
    assert he["x"] == pytest.approx((0.0, SIZE_UM[0]), abs=4.0)
    level0 = back.images["dense_pixnet"]["scale0"]["image"]
    assert list(level0.coords["c"].values) == demo["genes"]
    assert len(back.images["dense_pixnet"]) > 1 and level0.data.chunksize[0] == 1
    dmap = read_dense(dense)
    affine = get_transformation(level0, to_coordinate_system="global").to_affine_matrix(
        ("x", "y"), ("x", "y"))
    assert affine[0, 0] == pytest.approx(dmap.mpp)
    assert affine[0, 2] == pytest.approx(dmap.origin_px[0] * mpp)
    for name, shape, size in (("pixnet_spots_55um", "disc", 55.0),
                              ("pixnet_bins_16um", "square", 16.0)):
        shapes, table = back.shapes[name], back.tables[f"{name}_table"]
        source = tables[name]
        assert table.uns["spatialdata_attrs"]["region"] == name
        assert list(table.obs["spot_id"]) == list(shapes.index.astype(str))
        assert list(table.var_names) == demo["genes"] and table.n_obs == source.n_obs
        centres = np.column_stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y])
        np.testing.assert_allclose(centres, source.obsm["spatial"] * mpp, atol=1e-6)
        to_px = get_transformation(shapes, to_coordinate_system="pixels")
        assert to_px.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0] == pytest.approx(1 / mpp)
        box = get_extent(shapes, coordinate_system="global")
        assert he["x"][0] - size <= box["x"][0] and box["x"][1] <= he["x"][1] + size
        if shape == "disc":
            np.testing.assert_allclose(shapes["radius"].to_numpy(), size / 2)
        else:  # squares of the bin side
            bounds = shapes.geometry.bounds.to_numpy()
            np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], size)
