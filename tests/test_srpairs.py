"""Super-resolution pairs: exact LR/HR consistency, normalisation round trips, H&E alignment,
spot-grid lattices and the real Xenium crop."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomap.data.slide import write_pyramid
from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.grid import block_sum, pair_geometry
from histomap.data.srpairs.normalisation import denormalise, log1p_normalise, minmax
from histomap.data.srpairs.points import build_sr_pairs
from histomap.data.srpairs.spot_grid import build_spot_grid_pairs
from histomap.data.srpairs.store import read_sr_pairs
from histomap.data.aggregate import aggregate_bins
from histomap.data.synthetic import simulate_sample
from histomap.errors import InputError

SIZE_UM = 600.0
G = 40  # synthetic genes


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 600 x 600 um synthetic sample: (cells AnnData, slide path, mpp)."""
    folder = tmp_path_factory.mktemp("syn") / "sample"
    simulate_sample(folder, seed=7, size_um=(SIZE_UM, SIZE_UM), n_genes=G)
    cells = ad.read_h5ad(folder / "cells.h5ad")
    return cells, folder / "he.tif", float(cells.uns["synthetic"]["mpp"])


@pytest.fixture(scope="module")
def raw_pairs(synthetic, tmp_path_factory):
    cells, slide, _ = synthetic
    out = tmp_path_factory.mktemp("pairs") / "raw.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=500, lr_um=100, scale=5,
                   normalisation="none", min_tissue=0.0)
    return read_sr_pairs(out)


def _keys_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at distances 1 + t, t, 1 - t, 2 - t."""
    d = np.abs(np.stack([1 + t, t, 1 - t, 2 - t], axis=-1))
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_reference(maps: np.ndarray, scale: int) -> np.ndarray:
    """(G, h, w) -> (G, h * scale, w * scale): output pixel o samples the input at
    (o + 0.5) / scale - 0.5 (pixel centres), taps clamped to the edge."""
    out = maps.astype(np.float64)
    for axis in (1, 2):
        n = out.shape[axis]
        src = (np.arange(n * scale) + 0.5) / scale - 0.5
        i0 = np.floor(src).astype(int)
        w = _keys_weights(src - i0)
        taps = np.clip(i0[:, None] + np.arange(-1, 3)[None], 0, n - 1)
        gathered = np.take(out, taps, axis=axis)          # (..., n_out, 4, ...)
        shape = [1] * gathered.ndim
        shape[axis], shape[axis + 1] = w.shape
        out = (gathered * w.reshape(shape)).sum(axis=axis + 1)
    return out


def test_normalisations_by_hand():
    """minmax, log1p_normalise and denormalise on a 2-gene, 1 x 3 pixel patch."""
    counts = np.array([[[2.0, 0.0, 1.0]], [[8.0, 0.0, 3.0]]])
    library = np.array([[10.0, 0.0, 4.0]])
    values = log1p_normalise(counts, library, target_sum=100.0)
    # log1p(2 / 10 * 100) = ln 21, 0 where the library is 0, log1p(1 / 4 * 100) = ln 26
    np.testing.assert_allclose(values, [[[np.log(21), 0, np.log(26)]],
                                        [[np.log(81), 0, np.log(76)]]], rtol=1e-6)
    back = denormalise(values, "log1p", library=library, target_sum=100.0)
    np.testing.assert_allclose(back, counts, rtol=1e-5, atol=1e-6)
    maps = np.array([[[1.0, 3.0, 5.0]], [[2.0, 2.0, 2.0]]])
    scaled, lo, hi = minmax(maps)
    np.testing.assert_allclose(scaled, [[[0.0, 0.5, 1.0]], [[0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(lo, [1.0, 2.0]) and np.testing.assert_allclose(hi, [5.0, 2.0])
    # counts = value * (max - min) + min: 0.25 of gene 0 is 2 counts; gene 1 is its constant
    np.testing.assert_allclose(denormalise(np.array([[[0.25, 0.0, 1.0]], [[0.7, 0.0, 1.0]]]),
                                           "minmax", lo=lo, hi=hi),
                               [[[2.0, 1.0, 5.0]], [[2.0, 2.0, 2.0]]])


def test_block_sum():
    maps = np.arange(2 * 4 * 6, dtype=float).reshape(2, 4, 6)
    out = block_sum(maps, 2)
    assert out.shape == (2, 2, 3)
    assert out[1, 1, 2] == maps[1, 2:4, 4:6].sum() and out[0, 0, 1] == maps[0, :2, 2:4].sum()


def test_lr_is_exact_sum_of_hr_and_hr_is_binned_counts(synthetic, raw_pairs):
    cells, _, mpp = synthetic
    arrays, attrs = raw_pairs
    n = len(arrays["hr"])
    assert n == 4  # 600 um slide, 500 um patches: 2 x 2 (the last ones run past the edge)
    assert arrays["hr"].shape == (n, G, 25, 25) and arrays["lr"].shape == (n, G, 5, 5)
    assert arrays["he"].shape == (n, 3, 250, 250) and arrays["he"].dtype == np.uint8
    assert arrays["mask"].shape == (n, 25, 25) and arrays["mask"].dtype == bool
    assert attrs["hr_um"] == 20 and attrs["lr_um"] == 100 and attrs["scale"] == 5
    # LR pixels measure the sum of their 5 x 5 HR pixels, stored in HR units (sum / 25)
    assert attrs["lr_units"] == "hr"
    np.testing.assert_allclose(block_sum(arrays["hr"], 5) / 25, arrays["lr"], rtol=1e-6)
    # independent: the cells summed into 20 um bins at each patch's origin
    for i in range(n):
        bins = aggregate_bins(cells, 20.0, mpp, origin=tuple(arrays["origin_px"][i]),
                              shape=(25, 25), keep_empty=True)
        expected = bins.X.toarray().T.reshape(G, 25, 25)
        np.testing.assert_array_equal(arrays["hr"][i], expected)
    assert arrays["hr"].sum() == cells.X.sum()  # the four patches tile the whole slide
    np.testing.assert_allclose(arrays["origin_px"] * mpp, arrays["origin_um"])
    np.testing.assert_allclose(arrays["origin_um"], [[0, 0], [500, 0], [0, 500], [500, 500]])
    # past the 600 um slide edge nothing is measured
    assert not arrays["mask"][3][5:, :].any() and not arrays["mask"][3][:, 5:].any()


def test_minmax_normalisation_round_trip(synthetic, raw_pairs, tmp_path):
    cells, slide, _ = synthetic
    out = tmp_path / "minmax.zarr"
    build_sr_pairs(cells, slide, ["ERBB2", "PTPRC", "COL1A1"], out, patch_um=500, lr_um=100,
                   scale=5, normalisation="minmax", min_tissue=0.0)
    arrays, attrs = read_sr_pairs(out)
    raw, raw_attrs = raw_pairs
    assert attrs["genes"] == ["ERBB2", "PTPRC", "COL1A1"] and attrs["normalisation"] == "minmax"
    idx = [raw_attrs["genes"].index(g) for g in attrs["genes"]]
    for grid in ("hr", "lr"):
        values, lo, hi = arrays[grid], arrays[f"{grid}_min"], arrays[f"{grid}_max"]
        assert values.min() >= 0 and values.max() <= 1
        varying = hi > lo
        assert varying.any()
        np.testing.assert_allclose(values.max(axis=(2, 3))[varying], 1.0)
        np.testing.assert_allclose(values.min(axis=(2, 3))[varying], 0.0)
        assert (values[~varying] == 0).all()
        for i in range(len(values)):
            back = denormalise(values[i], "minmax", lo=lo[i], hi=hi[i])
            # lr_min/lr_max are the LR measurement's (sums of 25 HR pixels)
            want = raw[grid][i][idx] * (25 if grid == "lr" else 1)
            np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-3)


def test_log1p_normalisation_round_trip(synthetic, raw_pairs, tmp_path):
    cells, slide, _ = synthetic
    out = tmp_path / "log1p.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=500, lr_um=100, scale=5,
                   normalisation="log1p", min_tissue=0.0)
    arrays, attrs = read_sr_pairs(out)
    raw, _ = raw_pairs
    # one target sum for both grids: the LR map is in the HR map's units
    assert attrs["hr_target_sum"] > 0 and attrs["lr_target_sum"] == attrs["hr_target_sum"]
    # the library is every gene's counts in the pixel; LR libraries are sums of HR libraries
    np.testing.assert_allclose(arrays["hr_library"], raw["hr"].sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(block_sum(arrays["hr_library"], 5), arrays["lr_library"],
                               rtol=1e-5)
    for grid in ("hr", "lr"):
        for i in range(len(arrays[grid])):
            back = denormalise(arrays[grid][i], "log1p", library=arrays[f"{grid}_library"][i],
                               target_sum=attrs[f"{grid}_target_sum"])
            want = raw[grid][i] * (25 if grid == "lr" else 1)  # the LR sums
            np.testing.assert_allclose(back, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("normalisation", ["none", "log1p"])
def test_lr_map_is_in_the_hr_maps_units(synthetic, raw_pairs, tmp_path, normalisation):
    """Issue 13: interpolating the LR map must predict the HR map in the truth's units. An LR
    pixel's HR-unit estimate is the mean of its HR pixels in counts (its sum / 25) and, log-
    normalised, the block's library fraction scaled by the HR target sum."""
    cells, slide, _ = synthetic
    out = tmp_path / f"{normalisation}.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=500, lr_um=100, scale=5,
                   normalisation=normalisation, min_tissue=0.0)
    arrays, attrs = read_sr_pairs(out)
    raw_hr = raw_pairs[0]["hr"].astype(np.float64)
    block_mean = block_sum(raw_hr, 5) / 25
    if normalisation == "none":
        np.testing.assert_allclose(arrays["lr"], block_mean, rtol=1e-6)
    else:
        library = block_sum(raw_hr.sum(axis=1), 5)
        fraction = np.divide(block_sum(raw_hr, 5), library[:, None], where=library[:, None] > 0,
                             out=np.zeros_like(block_mean))
        np.testing.assert_allclose(arrays["lr"], np.log1p(fraction * attrs["hr_target_sum"]),
                                   rtol=1e-5, atol=1e-6)


def test_min_tissue_drops_glass_patches(synthetic, tmp_path):
    cells, slide, _ = synthetic
    out = tmp_path / "tissue.zarr"
    attrs = build_sr_pairs(cells, slide, None, out, patch_um=200, lr_um=100, scale=5,
                           normalisation="none", min_tissue=0.5)
    arrays, _ = read_sr_pairs(out)
    assert 0 < attrs["n_patches"] < 9
    assert (arrays["tissue_fraction"] >= 0.5).all()
    np.testing.assert_allclose(arrays["mask"].mean(axis=(1, 2)), arrays["tissue_fraction"])


def test_patch_sizes_floor_or_follow_the_paper(caplog):
    with caplog.at_level(logging.WARNING, logger="histomap.data.srpairs"):
        geo = pair_geometry(2560, 100, 5)
    assert (geo.n_lr, geo.n_hr, geo.patch_um) == (25, 125, 2500)
    assert "floored to 2500 um" in caplog.text
    assert (pair_geometry(2560, 100, 10).n_hr) == 250
    geo = pair_geometry(2560, 100, 5, edge="ceil")
    assert (geo.n_lr, geo.n_hr, geo.n_cover) == (26, 128, 130)
    assert pair_geometry(2560, 100, 10, edge="ceil").n_hr == 256
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histomap.data.srpairs"):
        assert pair_geometry(500, 100, 5, stride_um=250).stride_lr == 2
    assert "stride_um 250 floored to 200" in caplog.text


def test_edge_ceil_lr_covers_whole_lr_pixels(synthetic, tmp_path):
    cells, slide, mpp = synthetic
    out = tmp_path / "ceil.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=260, lr_um=100, scale=5, edge="ceil",
                   normalisation="none", min_tissue=0.0)
    arrays, attrs = read_sr_pairs(out)
    assert arrays["hr"].shape[2:] == (13, 13) and arrays["lr"].shape[2:] == (3, 3)
    # the first 2 x 2 LR pixels lie inside the HR patch and are sums of its HR pixels (stored
    # in HR units: / 25)
    np.testing.assert_allclose(block_sum(arrays["hr"][:, :, :10, :10], 5) / 25,
                               arrays["lr"][:, :, :2, :2], rtol=1e-6)
    # every LR pixel (also the partial last ones) is the full 100 um bin of the sample's grid
    lr_bins = aggregate_bins(cells, 100.0, mpp, shape=(6, 6), keep_empty=True)
    grid = lr_bins.X.toarray().T.reshape(G, 6, 6)
    for i, (r0, c0) in enumerate(arrays["grid_index"] // 5):
        want = np.zeros((G, 3, 3))
        part = grid[:, r0:r0 + 3, c0:c0 + 3]
        want[:, :part.shape[1], :part.shape[2]] = part
        np.testing.assert_allclose(arrays["lr"][i], want / 25, rtol=1e-6)
    # the dataset upsamples LR onto the 15 x 15 cover grid and crops it to the HR patch
    item = SRPairDataset(out, upsample="nearest")[0]
    lr = arrays["lr"][0]
    np.testing.assert_allclose(item["lr_up"].numpy(),
                               np.repeat(np.repeat(lr, 5, axis=1), 5, axis=2)[:, :13, :13])


def test_he_patch_is_aligned_with_the_hr_grid(tmp_path):
    """A red square on a white slide and points of gene RED inside it land on the same HR
    pixels; points of BLUE elsewhere do not."""
    mpp = 0.5
    rgb = np.full((800, 800, 3), 255, np.uint8)  # 400 x 400 um
    x0, y0, side = 260, 120, 40  # um, on the 10 um HR grid
    rgb[int(y0 / mpp):int((y0 + side) / mpp), int(x0 / mpp):int((x0 + side) / mpp)] = (220, 0, 0)
    slide = write_pyramid(rgb, tmp_path / "square.tif", mpp)
    rng = np.random.default_rng(0)
    red = rng.uniform(0, side, (300, 2)) + [x0, y0]
    blue = rng.uniform(0, 400, (600, 2))
    blue = blue[~((blue[:, 0] >= x0 - 10) & (blue[:, 0] < x0 + side + 10)
                  & (blue[:, 1] >= y0 - 10) & (blue[:, 1] < y0 + side + 10))]
    xy = np.concatenate([red, blue]) / mpp
    X = sp.csr_matrix(np.concatenate([np.tile([1, 0], (len(red), 1)),
                                      np.tile([0, 1], (len(blue), 1))]))
    points = ad.AnnData(X=X, var=pd.DataFrame(index=["RED", "BLUE"]))
    points.obsm["spatial"] = xy
    out = tmp_path / "square.zarr"
    build_sr_pairs(points, slide, ["RED", "BLUE"], out, patch_um=200, lr_um=40, scale=4,
                   normalisation="none", image_mpp=1.0, tissue=False, min_tissue=0.0)
    arrays, attrs = read_sr_pairs(out)
    assert attrs["hr_um"] == 10 and arrays["he"].shape[1:] == (3, 200, 200)
    assert arrays["mask"].all()  # no tissue mask: the whole slide is measured
    assert arrays["hr"][:, 0].sum() == len(red)
    hits = 0
    for he, hr in zip(arrays["he"], arrays["hr"]):
        is_red = (he[0] > 150) & (he[1] < 80)  # (200, 200) px at 1 um
        red_hr = block_sum(is_red.astype(float), 10) > 50  # (20, 20) HR pixels of 10 um
        np.testing.assert_array_equal(red_hr, hr[0] > 0)
        assert not (red_hr & (hr[1] > 0)).any()
        hits += int(red_hr.sum())
    assert hits == (side // 10) ** 2


def test_dataset_items_and_loader(raw_pairs, synthetic, tmp_path):
    import torch

    cells, slide, _ = synthetic
    out = tmp_path / "ds.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=500, lr_um=100, scale=5,
                   normalisation="minmax", min_tissue=0.0)
    ds = SRPairDataset(out)
    assert len(ds) == 4 and ds.genes == list(cells.var_names)
    item = ds[1]
    assert item["hr"].shape == (G, 25, 25) and item["lr"].shape == (G, 5, 5)
    assert item["lr_up"].shape == (G, 25, 25) and item["mask"].dtype == torch.bool
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 250, 250)
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    # lr_up is the LR map upsampled by Keys' cubic convolution (a = -0.75, pixel centres,
    # edge pixels repeated), computed here independently of torch
    np.testing.assert_allclose(item["lr_up"].numpy(), bicubic_reference(item["lr"].numpy(), 5),
                               atol=1e-5)
    nearest = SRPairDataset(out, upsample="nearest")[1]
    np.testing.assert_array_equal(nearest["lr_up"].numpy(),
                                  np.repeat(np.repeat(item["lr"].numpy(), 5, 1), 5, 2))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["hr"].shape == (2, G, 25, 25) and batch["image"].shape == (2, 3, 250, 250)


def test_flip_augmentation_moves_every_map_and_the_he_together(synthetic, tmp_path):
    """``augment``: an item is its plain self flipped along the same axes in every map, the LR
    map, the mask and the H&E patch; all four flips occur; the draws follow torch's global RNG
    (a resumed training repeats them). Pairs whose LR grid overhangs the HR patch are refused."""
    import torch

    cells, slide, _ = synthetic
    out = tmp_path / "aug.zarr"
    build_sr_pairs(cells, slide, None, out, patch_um=500, lr_um=100, scale=5,
                   normalisation="minmax", min_tissue=0.0)
    plain, aug = SRPairDataset(out)[2], SRPairDataset(out, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(24):
        item = aug[2]
        flips = [dims for dims in ([], [-1], [-2], [-1, -2])
                 if torch.equal(item["hr"], plain["hr"].flip(dims) if dims else plain["hr"])]
        assert len(flips) == 1, "hr is not a flip of the plain item"
        dims = flips[0]
        seen.add(tuple(dims))
        for key in ("lr", "lr_up", "image", "mask"):
            want = plain[key].flip(dims) if dims else plain[key]
            assert torch.equal(item[key], want), key
        assert item["index"] == plain["index"]
    assert len(seen) == 4
    torch.manual_seed(5)
    first = [aug[0]["hr"] for _ in range(3)]
    torch.manual_seed(5)
    assert all(torch.equal(a, aug[0]["hr"]) for a in first)
    ceil = tmp_path / "ceil_aug.zarr"
    build_sr_pairs(cells, slide, None, ceil, patch_um=260, lr_um=100, scale=5, edge="ceil",
                   normalisation="none", min_tissue=0.0)
    with pytest.raises(ValueError, match="covers the HR patch exactly"):
        SRPairDataset(ceil, augment=True)


def test_bad_inputs(synthetic, tmp_path):
    cells, slide, mpp = synthetic
    with pytest.raises(InputError, match="not measured"):
        build_sr_pairs(cells, slide, ["ERBB2", "NOPE"], tmp_path / "x.zarr", patch_um=500)
    with pytest.raises(InputError, match="differs from the given mpp") as err:
        build_sr_pairs(cells, slide, None, tmp_path / "x.zarr", mpp=mpp * 2, patch_um=500)
    assert "he.tif" in str(err.value)
    with pytest.raises(InputError, match="no patch"):
        build_sr_pairs(cells, slide, None, tmp_path / "x.zarr", patch_um=500, min_tissue=1.0)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(InputError, match="not an SR pairs zarr|does not exist"):
        read_sr_pairs(tmp_path / "x.zarr")


# --- spot grids ----------------------------------------------------------------------------------

PITCH_PX = 20  # lattice step on the slide (mpp 1: 20 um)


def _lattice_sample(tmp_path, style: str, flip_y: bool = False, transpose: bool = False):
    """6 x 6 lattice (two spots missing) with random counts; a green spot image at (row 1, col 4).
    """
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    keep = ~(((rows == 2) & (cols == 3)) | ((rows == 5) & (cols == 0)))
    rows, cols = rows[keep], cols[keep]
    rng = np.random.default_rng(5)
    X = rng.poisson(4.0, (len(rows), 3))
    y_px = (5 - rows if flip_y else rows) * PITCH_PX + PITCH_PX / 2 + 10
    x_px = cols * PITCH_PX + PITCH_PX / 2 + 10
    if style == "legacy":   # names {x}x{y} with x = col + 1, y = row + 1
        obs = pd.DataFrame(index=[f"{c + 1}x{r + 1}" for r, c in zip(rows, cols)])
    elif style == "visium":  # doubled hex columns: array_row + array_col even
        obs = pd.DataFrame({"array_row": rows, "array_col": 2 * cols + rows % 2},
                           index=[f"bc{i}" for i in range(len(rows))])
        x_px = x_px + (rows % 2) * PITCH_PX / 2  # odd rows staggered by half a pitch
    else:
        obs = pd.DataFrame({"array_row": rows, "array_col": cols},
                           index=[f"s{i}" for i in range(len(rows))])
    spots = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=["A", "B", "C"]))
    spots.obsm["spatial"] = np.column_stack([y_px, x_px] if transpose else [x_px, y_px])
    rgb = np.full((140, 140, 3), 255, np.uint8)
    gy = int((5 - 1 if flip_y else 1) * PITCH_PX + 10)
    gx = 4 * PITCH_PX + 10 + (PITCH_PX // 2 if style == "visium" else 0)  # row 1: staggered
    if transpose:  # lattice rows run along x
        gx, gy = gy, gx
    rgb[gy:gy + PITCH_PX, gx:gx + PITCH_PX] = (0, 200, 0)
    slide = write_pyramid(rgb, tmp_path / f"lattice_{style}.tif", 1.0)
    dense = np.zeros((3, 6, 6))
    dense[:, rows, cols] = X.T
    measured = np.zeros((6, 6), bool)
    measured[rows, cols] = True
    return spots, slide, dense, measured


@pytest.mark.parametrize("style, flip_y, transpose", [("legacy", False, False),
                                                      ("visium", False, False),
                                                      ("array", True, False),
                                                      ("array", True, True)])
def test_spot_grid_pairs(tmp_path, caplog, style, flip_y, transpose):
    spots, slide, dense, measured = _lattice_sample(tmp_path, style, flip_y, transpose)
    out = tmp_path / "grid.zarr"
    with caplog.at_level(logging.INFO, logger="histomap.data.srpairs"):
        attrs = build_spot_grid_pairs(spots, slide, None, out, factor=2, patch_spots=4,
                                      stride_spots=2, min_measured=0.0, normalisation="none",
                                      image_mpp=1.0)
    assert "rotated" not in caplog.text
    assert ("staggered by (10.0, " in caplog.text) == (style == "visium")
    np.testing.assert_allclose(attrs["stagger_px"], [10.0, 0.0] if style == "visium" else 0.0,
                               atol=1e-9)
    arrays, _ = read_sr_pairs(out)
    assert attrs["source"] == "spot_grid" and attrs["hr_um"] == pytest.approx(PITCH_PX)
    assert attrs["lr_um"] == pytest.approx(2 * PITCH_PX) and attrs["scale"] == 2
    assert arrays["hr"].shape == (4, 3, 4, 4) and arrays["lr"].shape == (4, 3, 2, 2)
    assert arrays["he"].shape == (4, 3, 80, 80)
    np.testing.assert_allclose(arrays["lr"], block_sum(arrays["hr"], 2) / 4, rtol=1e-6)
    for i, (r0, c0) in enumerate(arrays["grid_index"]):
        np.testing.assert_array_equal(arrays["hr"][i], dense[:, r0:r0 + 4, c0:c0 + 4])
        np.testing.assert_array_equal(arrays["mask"][i], measured[r0:r0 + 4, c0:c0 + 4])
        # the green spot (lattice row 1, col 4) shows in the H&E at its lattice cell
        green = (arrays["he"][i][1] > 150) & (arrays["he"][i][0] < 80)
        cell = block_sum(green.astype(float), PITCH_PX) > 0.5 * PITCH_PX ** 2
        want = np.zeros((4, 4), bool)
        if r0 <= 1 < r0 + 4 and c0 <= 4 < c0 + 4:
            want[1 - r0, 4 - c0] = True
        np.testing.assert_array_equal(cell, want)


def test_spot_grid_pairs_floor_patch_and_need_a_lattice(tmp_path, caplog):
    spots, slide, _, _ = _lattice_sample(tmp_path, "array")
    with caplog.at_level(logging.WARNING, logger="histomap.data.srpairs"):
        build_spot_grid_pairs(spots, slide, ["A"], tmp_path / "g.zarr", patch_spots=5,
                              min_measured=0.0, normalisation="minmax")
    assert "patch_spots 5 floored to 4" in caplog.text
    arrays, _ = read_sr_pairs(tmp_path / "g.zarr")
    assert arrays["hr"].shape[1:] == (1, 4, 4) and arrays["lr_max"].shape[1:] == (1,)
    bare = ad.AnnData(X=spots.X, var=spots.var, obs=pd.DataFrame(index=[f"s{i}" for i in
                                                                         range(spots.n_obs)]))
    bare.obsm["spatial"] = spots.obsm["spatial"]
    with pytest.raises(InputError, match="no spot lattice"):
        build_spot_grid_pairs(bare, slide, None, tmp_path / "h.zarr")


# --- the real Xenium crop ------------------------------------------------------------------------

def test_xenium_crop_pairs(xenium_crop_dir, tmp_path):
    from histomap.data.io import read_sample
    from histomap.data.slide import prepare_slide

    sample = read_sample("xenium", "crop", xenium_crop_dir, mpp=0.2125)
    slide = tmp_path / "slide.tif"
    prepare_slide(sample.image_path, slide, sample.mpp)
    out = tmp_path / "crop.zarr"
    attrs = build_sr_pairs(sample.highres, slide, ["ERBB2", "KRT7", "PTPRC", "ACTA2"], out,
                           patch_um=300, lr_um=50, scale=5, normalisation="none", min_tissue=0.0)
    arrays, _ = read_sr_pairs(out)
    n = attrs["n_patches"]
    assert n == 4  # 510 x 382.5 um crop, 300 um patches
    assert arrays["lr"].shape == (n, 4, 6, 6) and arrays["hr"].shape == (n, 4, 30, 30)
    assert arrays["he"].shape == (n, 3, 150, 150) and arrays["mask"].shape == (n, 30, 30)
    np.testing.assert_allclose(block_sum(arrays["hr"], 5) / 25, arrays["lr"], rtol=1e-6)
    # every kept transcript of these genes is in exactly one patch
    table = pd.read_csv(xenium_crop_dir / "transcripts_small.csv", index_col=0,
                        usecols=[0, 4, 5, 6, 8])
    counts = table["feature_name"].value_counts()
    np.testing.assert_array_equal(arrays["hr"].sum(axis=(0, 2, 3)),
                                  counts[["ERBB2", "KRT7", "PTPRC", "ACTA2"]].to_numpy())
    # the crop is tissue almost everywhere it was imaged; past its edge nothing is measured
    assert arrays["mask"][0].mean() > 0.8
    assert arrays["mask"][3].mean() < 0.25


# --- the real HER2ST square lattice --------------------------------------------------------------

@pytest.mark.slow  # decodes the 4k JPEG into a pyramid (~20 s)
def test_her2st_square_grid_pairs_are_unchanged(her2st_dir, tmp_path):
    """Handling Visium's hexagonal stagger leaves HER2ST's square grid as it was: the fitted
    odd-row offset is position jitter (no stagger, so the H&E is read as one region per patch as
    before), and the pairs' counts, mask and placement equal those of the code before the
    change (digests recorded from it; LR now in HR units: the old LR sums / 4)."""
    import hashlib

    from histomap.data.io import read_sample
    from histomap.data.slide import prepare_slide

    sample = read_sample("legacy_st", "B4", her2st_dir / "B4")
    slide = tmp_path / "slide.tif"
    prepare_slide(sample.image_path, slide, sample.mpp)
    genes = list(sample.spots.var_names[:20])
    attrs = build_spot_grid_pairs(sample.spots, slide, genes, tmp_path / "p.zarr", factor=2,
                                  patch_spots=8, min_measured=0.25, normalisation="none",
                                  image_mpp=4.0)
    arrays, _ = read_sr_pairs(tmp_path / "p.zarr")
    assert attrs["stagger_px"] == [0.0, 0.0]

    def digest(name):
        return hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()[:16]

    assert digest("hr") == "ab233823a3954448"
    assert digest("mask") == "2a27293c740416f4"
    assert digest("grid_index") == "95679f6399eafb2b"
    np.testing.assert_allclose(arrays["lr"], block_sum(arrays["hr"], 2) / 4, rtol=1e-6)
    np.testing.assert_allclose(arrays["origin_px"][[0, 1, 5]],
                               [[1273.9960861485013, 3381.4795822246288],
                                [3609.20978980354, 3382.451096684631],
                                [1269.770896202255, 8019.655000563352]], rtol=1e-9)
    assert arrays["he"].shape == (6, 3, 399, 402)
