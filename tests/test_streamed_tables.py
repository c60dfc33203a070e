"""Spot and bin tables streamed to disk in row blocks (histomap.tasks.dense_readout,
histomap.data.streamed_table) equal the tables of the in-memory path (the whole lattice built
point by point, read out at once, written by anndata) on a small slide."""
from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

from histomap.data.streamed_table import StreamedTable
from histomap.tasks import apply, dense_readout
from histomap.tasks.dense_map import DenseMap, spots_from_dense

SLIDE_MPP, MAP_MPP = 0.5, 4.0
GEO = {"sample": "s", "platform": "he", "mpp": SLIDE_MPP, "image": "slide.tif", "spatial": {}}
INFO = {"model": "pixnet", "bundle": "b", "path": "p", "normalisation": "log1p"}


def _reference_lattice(tiles: pd.DataFrame, shape: str, size_um: float):
    """The lattice point by point over the tiles' bounding box (the in-memory path)."""
    step = size_um / SLIDE_MPP
    x0, y0 = tiles["x0_px"].min(), tiles["y0_px"].min()
    x1, y1 = (tiles["x0_px"] + tiles["size_px0"]).max(), (tiles["y0_px"] + tiles["size_px0"]).max()
    if shape == "disc":
        row_step = step * math.sqrt(3) / 2
        rr, cc = np.meshgrid(np.arange(math.floor(y0 / row_step), math.ceil(y1 / row_step) + 1),
                             np.arange(math.floor(x0 / step) - 1, math.ceil(x1 / step) + 1),
                             indexing="ij")
        xy = np.column_stack([(cc.ravel() + 0.5 * (rr.ravel() % 2)) * step,
                              rr.ravel() * row_step])
    else:
        rr, cc = np.meshgrid(np.arange(math.floor(y0 / step), math.ceil(y1 / step)),
                             np.arange(math.floor(x0 / step), math.ceil(x1 / step)),
                             indexing="ij")
        xy = (np.column_stack([cc.ravel(), rr.ravel()]) + 0.5) * step
    inside = np.zeros(len(xy), bool)
    for a, b, s in tiles[["x0_px", "y0_px", "size_px0"]].to_numpy(float):
        inside |= (xy[:, 0] >= a) & (xy[:, 0] < a + s) & (xy[:, 1] >= b) & (xy[:, 1] < b + s)
    return xy[inside], np.column_stack([rr.ravel(), cc.ravel()])[inside]


def _reference_bins(values: np.ndarray, mask: np.ndarray, origin_px, rowcol, bin_um):
    """Area means by brute force on 0.5 um sub-pixels (map pixels of 4 um = 8 x 8)."""
    k = int(MAP_MPP / 0.5)
    fine, fmask = np.kron(values * mask, np.ones((k, k))), np.kron(mask, np.ones((k, k)))
    ys = np.arange(fine.shape[1]) * 0.5 + origin_px[1] * SLIDE_MPP + 0.25
    xs = np.arange(fine.shape[2]) * 0.5 + origin_px[0] * SLIDE_MPP + 0.25
    out = np.full((len(rowcol), len(values)), np.nan)
    for i, (r, c) in enumerate(rowcol):
        iy = (ys >= r * bin_um) & (ys < (r + 1) * bin_um)
        ix = (xs >= c * bin_um) & (xs < (c + 1) * bin_um)
        m = fmask[np.ix_(iy, ix)]
        if m.sum():
            out[i] = fine[:, iy][:, :, ix].reshape(len(values), -1) @ m.ravel() / m.sum()
    return out


@pytest.fixture
def slide(tmp_path):
    """A 3 x 4 grid of 96 px tissue tiles with two missing, a map of 4 um pixels offset by a
    fraction of a bin, stored in 8 px chunks; tissue: a disc."""
    rng = np.random.default_rng(0)
    tiles = pd.DataFrame([(40.0 + 96 * c, 24.0 + 96 * r, 96.0) for r in range(3) for c in range(4)
                          if (r, c) not in ((0, 3), (2, 0))], columns=["x0_px", "y0_px",
                                                                       "size_px0"])
    origin = (40.0, 24.0)
    h, w = 36, 48   # 96 px tiles at 0.5 um = 48 um = 12 map px
    mask = np.zeros((h, w), np.uint8)
    for x0, y0, s in tiles.to_numpy():
        r0, c0 = int((y0 - origin[1]) / 8), int((x0 - origin[0]) / 8)
        mask[r0:r0 + 12, c0:c0 + 12] = 1
    values = (rng.gamma(2.0, 1.0, size=(3, h, w)) * mask).astype(np.float32)
    store = zarr.open_array(tmp_path / "map.zarr", mode="w", shape=values.shape,
                            chunks=(1, 8, 8), dtype="float32")
    store[:] = values
    dmap = DenseMap(path=tmp_path / "map.zarr", dense=store, mask=mask, genes=["a", "b", "c"],
                    mpp=MAP_MPP, origin_px=origin, slide_mpp=SLIDE_MPP, attrs={})

    def tissue(xy):
        return np.hypot(xy[:, 0] - 230, xy[:, 1] - 170) < 170

    return dmap, tiles, values, mask, tissue


@pytest.mark.parametrize("shape,size", [("square", 2.0), ("square", 10.0), ("square", 16.0),
                                        ("disc", 20.0)])
def test_streamed_table_equals_in_memory(slide, tmp_path, monkeypatch, shape, size):
    dmap, tiles, values, mask, tissue = slide
    monkeypatch.setattr(dense_readout, "BLOCK_VALUES", 60)  # many blocks of a few rows
    path = tmp_path / f"{shape}_{size:g}.h5ad"
    n = apply.stream_dense_table(dmap, tiles, shape, size, path, geo=GEO, tissue=tissue,
                                 info=INFO)
    # the in-memory path: whole lattice, whole read-out, one AnnData written by anndata
    xy, rc = _reference_lattice(tiles, shape, size)
    keep = tissue(xy)
    xy, rc = xy[keep], rc[keep]
    lattice = apply.lattice_spots(xy, rc, sample="s", platform="he", mpp=SLIDE_MPP,
                                  diameter_um=size, image="slide.tif",
                                  prefix="spot" if shape == "disc" else "bin")
    pred = spots_from_dense(dmap, xy, size, SLIDE_MPP) if shape == "disc" else \
        _reference_bins(values, mask, dmap.origin_px, rc, size).astype(np.float32)
    expect = apply._table(pred, lattice, dmap.genes, shape, size, INFO)
    expect.write_h5ad(tmp_path / "expect.h5ad")
    expect, got = ad.read_h5ad(tmp_path / "expect.h5ad"), ad.read_h5ad(path)
    assert n == got.n_obs == expect.n_obs > 10
    assert list(got.obs_names) == list(expect.obs_names)
    pd.testing.assert_frame_equal(got.obs, expect.obs)
    pd.testing.assert_frame_equal(got.var, expect.var)
    np.testing.assert_array_equal(got.obsm["spatial"], expect.obsm["spatial"])
    assert got.uns["histomap"] == expect.uns["histomap"]
    # float32 weighted sums in another order: |a - b| <= 2 k eps max|v| for sums of k terms
    # (k map pixels a bin or disc overlaps, two sums: values and covered area)
    k = (math.ceil(size / MAP_MPP) + 1) ** 2
    atol = 2 * 2 * k * np.finfo(np.float32).eps * float(np.abs(values).max())
    np.testing.assert_allclose(got.X, expect.X, rtol=0, atol=atol)
    assert got.X.dtype == np.float32 and np.isfinite(got.X).all()


def test_lattice_blocks_match_point_by_point(slide):
    _, tiles, *_ = slide
    for shape, size in (("disc", 20.0), ("disc", 7.0), ("square", 2.0), ("square", 10.0)):
        xy, rc = (apply.hex_lattice if shape == "disc" else apply.square_lattice)(
            tiles, SLIDE_MPP, size)
        exy, erc = _reference_lattice(tiles, shape, size)
        np.testing.assert_array_equal(rc, erc)
        np.testing.assert_array_equal(xy, exy)


def test_bins_from_dense_any_order(slide):
    """The in-memory read-out takes bins in any order and equals brute force."""
    dmap, tiles, values, mask, _ = slide
    _, rc = _reference_lattice(tiles, "square", 10.0)
    rc = rc[np.random.default_rng(1).permutation(len(rc))]
    got = apply.bins_from_dense(dmap, rc, 10.0)
    expect = _reference_bins(values, mask, dmap.origin_px, rc, 10.0)
    atol = 2 * 2 * 16 * np.finfo(np.float32).eps * float(np.abs(values).max())
    np.testing.assert_allclose(got, expect, rtol=0, atol=atol)


def test_streamed_table_bad_blocks_leave_nothing(tmp_path):
    path = tmp_path / "t.h5ad"
    cols = {"diameter_um": np.float64, "shape": ["square"]}
    with pytest.raises(ValueError, match="block X"):
        with StreamedTable(path, ["a", "b"], obs_columns=cols, obsm={"spatial": 2}) as table:
            table.append(["x"], np.zeros((1, 3)), {"diameter_um": [1.0], "shape": ["square"]},
                         {"spatial": np.zeros((1, 2))})
    with pytest.raises(ValueError, match="outside"):
        with StreamedTable(path, ["a", "b"], obs_columns=cols, obsm={"spatial": 2}) as table:
            table.append(["x"], np.zeros((1, 2)), {"diameter_um": [1.0], "shape": ["disc"]},
                         {"spatial": np.zeros((1, 2))})
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unique"):
        StreamedTable(path, ["a", "a"], obs_columns=cols, obsm={})


SCALES = [("disc", 20.0), ("square", 2.0), ("square", 10.0), ("square", 16.0)]


def test_tables_streamed_together_read_the_map_once_and_equal_each_alone(slide, tmp_path,
                                                                         monkeypatch):
    """The tables of dense_tables move down the map together through one cache of map rows:
    each chunk row is read once, and every table is the one streamed on its own."""
    dmap, tiles, values, mask, tissue = slide
    monkeypatch.setattr(dense_readout, "BLOCK_VALUES", 60)  # many blocks of a few rows
    alone = [tmp_path / f"alone_{i}.h5ad" for i in range(len(SCALES))]
    for (shape, size), path in zip(SCALES, alone):
        apply.stream_dense_table(dmap, tiles, shape, size, path, geo=GEO, tissue=tissue,
                                 info=INFO)
    loads = []
    load = dense_readout.MapRows._load
    monkeypatch.setattr(dense_readout.MapRows, "_load",
                        lambda self, k: (loads.append(k) if k not in self.cache else None,
                                         load(self, k))[1])
    together = [tmp_path / f"together_{i}.h5ad" for i in range(len(SCALES))]
    written = apply.stream_dense_tables(dmap, tiles, SCALES, together, geo=GEO, tissue=tissue,
                                        info=INFO)
    n_chunk_rows = math.ceil(mask.shape[0] / dmap.dense.chunks[1])
    assert sorted(loads) == list(range(n_chunk_rows))  # every chunk row read exactly once
    for a, b, info in zip(alone, together, written):
        want, got = ad.read_h5ad(a), ad.read_h5ad(b)
        assert info.path == b and info.n_rows == got.n_obs == want.n_obs > 10
        pd.testing.assert_frame_equal(got.obs, want.obs)
        np.testing.assert_array_equal(got.X, want.X)
        np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])


def test_a_failing_table_leaves_none_of_them(slide, tmp_path, monkeypatch):
    dmap, tiles, _, _, tissue = slide
    paths = [tmp_path / f"t{i}.h5ad" for i in range(len(SCALES))]
    append = StreamedTable.append

    def failing(self, names, *args, **kwargs):
        if any(str(n).startswith("bin") for n in names) and self.path == paths[2]:
            raise OSError("No space left on device")
        return append(self, names, *args, **kwargs)

    monkeypatch.setattr(StreamedTable, "append", failing)
    with pytest.raises(OSError, match="No space"):
        apply.stream_dense_tables(dmap, tiles, SCALES, paths, geo=GEO, tissue=tissue, info=INFO)
    assert not list(tmp_path.glob("t*"))
