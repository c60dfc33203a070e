"""Tissue mask and tiling: synthetic slides with known tissue, and one real HER2ST section."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from histomap.data import tiling
from histomap.data.slide import open_slide, prepare_slide, write_pyramid
from histomap.data.tiling import (INDEX_COLUMNS, read_tile_index, read_tiles, tile_slide,
                                  tissue_fraction, tissue_mask)
from histomap.errors import InputError

MPP = 0.5
H, W = 3000, 4000                  # level-0 px: 1.5 x 2 mm
CENTRE, RADII = (1500, 1700), (900, 1100)   # ellipse (y, x) centre and radii, level-0 px
SPECK = (400, 3600)                 # a 20 px dark dust speck far from the tissue


def ellipse(h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """True tissue on a grid whose pixels are ``scale`` level-0 px (pixel centres)."""
    yy = (np.arange(h) + 0.5) * scale
    xx = (np.arange(w) + 0.5) * scale
    return (((yy[:, None] - CENTRE[0]) / RADII[0]) ** 2
            + ((xx[None, :] - CENTRE[1]) / RADII[1]) ** 2) <= 1


def synthetic_he(seed: int = 0) -> np.ndarray:
    """Glass (near white, slightly noisy) with an H&E-coloured, textured elliptical blob."""
    rng = np.random.default_rng(seed)
    img = rng.integers(240, 249, size=(H, W, 3), dtype=np.uint8)
    # texture with ~10 um features: smooth noise at 1/4 resolution, upsampled
    coarse = ndimage.gaussian_filter(rng.standard_normal((H // 4, W // 4), dtype=np.float32), 2)
    texture = ndimage.zoom(coarse / coarse.std(), 4, order=1)
    tissue = ellipse(H, W)
    base = np.array([175, 95, 165], np.float32)   # eosin-pink / haematoxylin-purple
    blob = base + 40 * texture[tissue][:, None] * np.array([1.0, 0.6, 0.5], np.float32)
    img[tissue] = np.clip(blob, 0, 255).astype(np.uint8)
    y, x = SPECK
    img[y:y + 20, x:x + 20] = (60, 30, 70)
    return img


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(slide path, level-0 image) of the synthetic slide."""
    img = synthetic_he()
    path = write_pyramid(img, tmp_path_factory.mktemp("synthetic") / "slide.tif", MPP)
    return path, img


@pytest.fixture(scope="module")
def tiled(synthetic, tmp_path_factory):
    path, _ = synthetic
    out = tmp_path_factory.mktemp("tiles")
    index = tile_slide(path, out / "t.zarr", out / "t.parquet", tile_px=64, tile_mpp=2.0,
                       min_tissue=0.5)
    return index, out


def test_tissue_mask_finds_the_blob(synthetic):
    path, _ = synthetic
    with open_slide(path) as slide:
        mask, mask_mpp = tissue_mask(slide, mask_mpp=16.0)
    assert mask_mpp == pytest.approx(16.0)
    scale = mask_mpp / MPP
    assert mask.shape == (int(np.ceil(H / scale)), int(np.ceil(W / scale)))
    truth = ellipse(*mask.shape, scale=scale)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    speck = (int(SPECK[0] / scale), int(SPECK[1] / scale))
    assert not mask[speck[0] - 2:speck[0] + 3, speck[1] - 2:speck[1] + 3].any()


def test_tissue_fraction_is_exact():
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    x0 = np.array([0.0, 6.0, 9.0, 15.0, 100.0])
    y0 = np.array([0.0, 6.0, 3.0, 9.0, 100.0])
    got = tissue_fraction(mask, 2.0, x0, y0, size0=7.0)   # mask px = 2 level-0 px
    fine = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)  # 1 level-0 px per pixel
    fine = np.pad(fine, ((0, 200), (0, 200)))
    # brute force at 0.5 level-0 px resolution (box edges fall on half pixels at most)
    up = np.repeat(np.repeat(fine, 2, axis=0), 2, axis=1)
    want = [up[int(2 * y):int(2 * y) + 14, int(2 * x):int(2 * x) + 14].mean()
            for x, y in zip(x0, y0)]
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert got[-1] == 0 and 0 < got[1] < 1


def test_tiles_cover_only_tissue(synthetic, tiled):
    index, _ = tiled
    size0 = 64 * 2.0 / MPP
    assert list(index.columns) == INDEX_COLUMNS
    assert (index["size_px0"] == size0).all()
    assert (index["tissue_fraction"] >= 0.5).all() and (index["tissue_fraction"] <= 1).all()
    # every kept tile is mostly on the ellipse, and the ellipse is covered
    truth = ellipse(H + 512, W + 512)
    true_frac = np.array([truth[y:y + 256, x:x + 256].mean()
                          for x, y in zip(index["x0_px"], index["y0_px"])])
    assert (true_frac > 0.35).all()
    # the mask has 16 um (32 level-0 px) pixels, a tile is 8 x 8 of them: misjudging the mask
    # pixels the ellipse's edge cuts by up to half their area, with cancelling signs, moves a
    # tile's fraction by ~0.015 (measured: at most 0.025); a mask one pixel off moves the edge
    # tiles by up to 0.125
    np.testing.assert_allclose(index["tissue_fraction"], true_frac, atol=0.05)
    ellipse_tiles = np.pi * RADII[0] * RADII[1] / size0**2
    assert 0.75 * ellipse_tiles < len(index) < 1.15 * ellipse_tiles
    # grid positions and coordinates agree
    assert (index["x0_px"] == np.round(index["col"] * size0)).all()
    assert (index["y0_px"] == np.round(index["row"] * size0)).all()
    np.testing.assert_allclose(index["x0_um"], index["x0_px"] * MPP)
    np.testing.assert_allclose(index["y0_um"], index["y0_px"] * MPP)
    assert (index["tile_id"] == np.arange(len(index))).all()
    assert not index.duplicated(["row", "col"]).any()


def test_tile_content_matches_index(synthetic, tiled):
    _, img = synthetic
    index, out = tiled
    tiles, attrs = read_tiles(out / "t.zarr")
    assert tiles.shape == (len(index), 64, 64, 3) and tiles.dtype == np.uint8
    assert tiles.chunks == (1, 64, 64, 3)
    assert attrs["mpp"] == 2.0 and attrs["tile_px"] == 64 and attrs["overlap_px"] == 0
    assert attrs["slide_mpp"] == pytest.approx(MPP) and attrs["slide"].endswith("slide.tif")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "t.parquet"), index)
    padded = np.pad(img, ((0, 256), (0, 256), (0, 0)), constant_values=255)
    errors, shifted = [], []
    for i in range(0, len(index), max(1, len(index) // 12)):
        x, y = int(index["x0_px"][i]), int(index["y0_px"][i])
        tile = tiles[i].astype(float)
        want = padded[y:y + 256, x:x + 256].reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        errors.append(np.abs(tile - want).mean())
        off = padded[y + 16:y + 272, x + 16:x + 272].reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        shifted.append(np.abs(tile - off).mean())
    # each tile is the slide at its index position, and a 16 px (8 um) shift would be visible
    assert max(errors) < 6
    assert np.mean(shifted) > 2 * np.mean(errors)


def test_index_only_tiling_writes_no_tile_images(synthetic, tiled, tmp_path):
    """Without a zarr path only the index is written: the same tiles, the parameters in its
    metadata, and no tile image store."""
    path, _ = synthetic
    index = tile_slide(path, None, tmp_path / "t.parquet", tile_px=64, tile_mpp=2.0,
                       min_tissue=0.5)
    pd.testing.assert_frame_equal(index, tiled[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    stored, params = read_tile_index(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(stored, tiled[0])
    assert params["tile_px"] == 64 and params["mpp"] == 2.0 and params["n_tiles"] == len(index)


def _reference_tile(slide, x0, y0, size0, out):
    """A tile as the tile store wrote it before issue 17 (every region composited over white,
    then resampled with PIL's bilinear filter): the pixels the store must keep producing."""
    from PIL import Image

    level = slide.get_best_level_for_downsample(max(size0 / out, 1.0))
    side = max(1, round(size0 / slide.level_downsamples[level]))
    region = slide.read_region((round(x0), round(y0)), level, (side, side))
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, region).convert("RGB")
    if rgb.size != (out, out):
        rgb = rgb.resize((out, out), Image.BILINEAR)
    return np.asarray(rgb)


@pytest.mark.parametrize("tile_mpp, compression", [(2.0, "zstd"), (1.5, "none")])
def test_sharded_tile_store_holds_every_tile(synthetic, tmp_path, monkeypatch, tile_mpp,
                                             compression):
    """Tiles written a shard at a time (several shards, the last one partial), with either
    codec, equal exactly the tiles the store wrote before issue 17: at 2 um/px a pyramid level
    is read as is, at 1.5 um/px level 1 is resampled; the grid's last column and row cross the
    slide's edge (composited over white)."""
    monkeypatch.setattr(tiling, "SHARD_TILES", 11)
    path, _ = synthetic
    index = tile_slide(path, tmp_path / "t.zarr", tmp_path / "t.parquet", tile_px=64,
                       tile_mpp=tile_mpp, min_tissue=0.0, compression=compression)
    assert len(index) % 11 != 0 and len(index) > 3 * 11
    size0 = float(index["size_px0"].iloc[0])
    assert (index["x0_px"] + size0 > W).any() and (index["y0_px"] + size0 > H).any()
    tiles, _ = read_tiles(tmp_path / "t.zarr")
    codecs = [type(c).__name__ for c in tiles.metadata.codecs[0].codecs]
    assert ("ZstdCodec" in codecs) == (compression == "zstd")
    stored = tiles[:]
    with open_slide(path) as slide:
        for i, row in index.iterrows():
            expected = _reference_tile(slide, row.x0_px, row.y0_px, size0, 64)
            np.testing.assert_array_equal(stored[i], expected)


def test_opaque_regions_skip_compositing_exactly():
    """read_region returns an opaque region's RGB without compositing it over white: PIL's
    compositing of an opaque pixel returns it unchanged, for every channel value."""
    from PIL import Image

    values = np.arange(256, dtype=np.uint8)
    rgba = np.full((256, 256, 4), 255, np.uint8)
    rgba[..., 0], rgba[..., 1] = np.meshgrid(values, values, indexing="ij")
    rgba[..., 2] = rgba[..., 0][::-1]
    region = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    np.testing.assert_array_equal(
        np.asarray(Image.alpha_composite(white, region).convert("RGB")), rgba[..., :3])


def test_unknown_tile_compression_fails_before_any_work(synthetic, tmp_path):
    path, _ = synthetic
    with pytest.raises(ValueError, match="tile_compression"):
        tile_slide(path, tmp_path / "t.zarr", tmp_path / "t.parquet", compression="gzip")
    assert list(tmp_path.iterdir()) == []


def test_failed_shard_write_leaves_nothing(synthetic, tmp_path, monkeypatch):
    """An error writing the second shard stops tiling and removes the partial outputs."""
    import zarr

    monkeypatch.setattr(tiling, "SHARD_TILES", 7)
    real_setitem, calls = zarr.Array.__setitem__, []

    def failing_setitem(self, key, value):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    path, _ = synthetic
    with pytest.raises(OSError, match="disk full"):
        tile_slide(path, tmp_path / "t.zarr", tmp_path / "t.parquet", tile_px=64, tile_mpp=2.0)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_overlap_shrinks_the_stride(synthetic, tmp_path):
    path, _ = synthetic
    index = tile_slide(path, tmp_path / "o.zarr", tmp_path / "o.parquet", tile_px=64,
                       tile_mpp=2.0, overlap_px=32, min_tissue=0.5)
    stride0 = 32 * 2.0 / MPP
    assert (index["x0_px"] % stride0 == 0).all() and (index["y0_px"] % stride0 == 0).all()
    tiles, attrs = read_tiles(tmp_path / "o.zarr")
    assert attrs["overlap_px"] == 32 and tiles.shape[0] == len(index)
    # overlapping neighbours share content: right half of a tile = left half of the next
    nxt = index.reset_index().merge(index.reset_index(), on="row", suffixes=("", "_r"))
    pair = nxt[nxt["col_r"] == nxt["col"] + 1].iloc[0]
    a, b = tiles[int(pair["tile_id"])], tiles[int(pair["tile_id_r"])]
    assert np.abs(a[:, 32:].astype(int) - b[:, :32]).mean() < 4


def test_blank_slide_fails_and_leaves_nothing(tmp_path):
    glass = np.random.default_rng(1).integers(240, 249, size=(1200, 1500, 3), dtype=np.uint8)
    slide = write_pyramid(glass, tmp_path / "blank.tif", MPP)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no tissue") as err:
        tile_slide(slide, out / "t.zarr", out / "t.parquet", tile_px=64, tile_mpp=2.0)
    assert err.value.path == str(slide)
    assert not out.exists() or list(out.iterdir()) == []


def test_failure_while_writing_leaves_nothing(synthetic, tmp_path, monkeypatch):
    path, _ = synthetic
    real_read = tiling.read_region
    calls = []

    def flaky_read(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk went away")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(tiling, "read_region", flaky_read)
    with pytest.raises(OSError, match="disk went away"):
        tile_slide(path, tmp_path / "t.zarr", tmp_path / "t.parquet", tile_px=64, tile_mpp=2.0)
    assert len(calls) > 3
    assert list(tmp_path.iterdir()) == []


def test_too_high_min_tissue_is_reported(synthetic, tmp_path):
    path, _ = synthetic
    with pytest.raises(InputError, match="min_tissue"):
        # tiles larger than the blob never reach full coverage
        tile_slide(path, tmp_path / "t.zarr", tmp_path / "t.parquet", tile_px=64,
                   tile_mpp=40.0, min_tissue=1.0)
    assert list(tmp_path.iterdir()) == []


def test_read_tiles_missing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_tiles(tmp_path / "nope.zarr")


# --------------------------------------------------------------------------- real slide
@pytest.fixture(scope="module")
def her2st_slide(her2st_dir, tmp_path_factory):
    """HER2ST section C2 converted once to a pyramid at 0.69 um/px."""
    src = next((her2st_dir / "C2").glob("*.jpg"))
    dst = tmp_path_factory.mktemp("her2st") / "slide.tif"
    prepare_slide(src, dst, mpp=0.69)
    return dst


def test_real_slide_tiles(her2st_slide, her2st_dir, tmp_path):
    with open_slide(her2st_slide) as slide:
        w0, h0 = slide.dimensions
    tracemalloc.start()
    try:
        index = tile_slide(her2st_slide, tmp_path / "t.zarr", tmp_path / "t.parquet",
                           tile_px=128, tile_mpp=4.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the section covers ~7 mm2 of a 6.4 x 6.8 mm image; a tile is 0.512 x 0.512 mm
    n_grid = int(np.ceil(w0 * 0.69 / 512) * np.ceil(h0 * 0.69 / 512))
    assert 15 <= len(index) <= 0.5 * n_grid
    assert index["tissue_fraction"].between(0.25, 1).all()
    tiles, attrs = read_tiles(tmp_path / "t.zarr")
    assert tiles.shape == (len(index), 128, 128, 3) and attrs["slide_mpp"] == pytest.approx(0.69)
    # tiles hold stained tissue, not glass
    grey = np.array([tiles[i].mean() for i in range(len(index))])
    assert np.median(grey) < 200
    # the ST spots under tissue fall in kept tiles
    spots = pd.read_csv(her2st_dir / "C2" / "C2_selection.tsv", sep="\t")
    col = (spots["pixel_x"] // index["size_px0"][0]).astype(int)
    row = (spots["pixel_y"] // index["size_px0"][0]).astype(int)
    kept = set(zip(index["row"], index["col"]))
    assert np.mean([(r, c) in kept for r, c in zip(row, col)]) > 0.8
    # streamed: Python-tracked peak memory is a small fraction of the level-0 image
    level0_bytes = w0 * h0 * 3
    assert peak < level0_bytes / 20, f"peak {peak / 1e6:.1f} MB"


def test_thumbnail_in_bands_matches_one_read(synthetic, monkeypatch):
    path, _ = synthetic
    with open_slide(path) as slide:
        whole = tiling.read_thumbnail(slide, 20.0)
        monkeypatch.setattr(tiling, "BAND_PIXELS", 2_000)   # a few thumbnail rows per band
        banded = tiling.read_thumbnail(slide, 20.0)
    assert whole.shape == banded.shape == (150, 200, 3)
    assert np.abs(whole.astype(int) - banded).mean() < 1.5


def test_greyscale_slide_uses_darkness(synthetic):
    """A colourless (greyscale) bright-field image still gives the blob."""
    _, img = synthetic
    grey = np.repeat(img[::8, ::8].mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)
    mask = tiling.tissue_from_rgb(grey, pixel_um=8 * MPP)
    truth = ellipse(*mask.shape, scale=8)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def test_real_fluorescence_crop_is_tissue(xenium_crop_dir, tmp_path):
    """The Xenium DAPI crop (no glass in view): nearly every tile is tissue."""
    slide = tmp_path / "dapi.tif"
    prepare_slide(xenium_crop_dir / "morphology_mip_small.tif", slide, mpp=0.2125)
    index = tile_slide(slide, tmp_path / "t.zarr", tmp_path / "t.parquet", tile_px=64,
                       tile_mpp=1.0)
    n_grid = int(np.ceil(2400 * 0.2125 / 64) * np.ceil(1800 * 0.2125 / 64))
    assert len(index) >= 0.8 * n_grid
