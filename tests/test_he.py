"""The `he` platform: H&E-only slides (tiled TIFF with mpp metadata, PNG with mpp from the sheet)
and their ingest into a slide with an empty spot table."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image

from histomap.data.ingest import ingest_sample
from histomap.data.io import read_sample
from histomap.data.slide import open_slide, slide_mpp, write_pyramid
from histomap.errors import InputError


def he_image(h: int = 300, w: int = 400) -> np.ndarray:
    """Pink tissue disc on white glass, with texture (an H&E-like RGB uint8 image)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    tissue = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.4 * min(h, w)) ** 2
    img = np.full((h, w, 3), 245, np.uint8)
    noise = rng.integers(0, 40, (h, w))
    img[tissue] = np.stack([200 - noise, 120 - noise, 170 - noise], -1)[tissue]
    return img


def test_tiled_tiff_mpp_from_metadata(tmp_path):
    slide = write_pyramid(he_image(), tmp_path / "slide.tif", mpp=0.75, tile=64)
    sample = read_sample("he", "H1", slide)
    assert sample.platform == "he" and sample.mpp == pytest.approx(0.75)
    assert sample.spots.n_obs == 0 and sample.spots.obsm["spatial"].shape == (0, 2)
    assert sample.highres is None


def test_flat_tiff_mpp_from_resolution_tags(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, he_image(), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    assert read_sample("he", "H2", path).mpp == pytest.approx(0.5)


def test_png_mpp_from_sheet_and_ingest(tmp_path):
    path = tmp_path / "slide.png"
    Image.fromarray(he_image()).save(path)
    out = tmp_path / "ingest"
    smp = ingest_sample(platform="he", sample="H3", path=path, out_dir=out, mpp=2.0,
                        spatialdata_mpp=8.0)
    assert smp.mpp == 2.0
    with open_slide(out / "slide.tif") as slide:
        assert slide_mpp(slide) == pytest.approx(2.0)
        assert slide.dimensions == (400, 300)
    spots = ad.read_h5ad(out / "spots.h5ad")
    assert spots.n_obs == 0 and spots.uns["histomap"]["platform"] == "he"
    assert spots.uns["histomap"]["mpp"] == pytest.approx(2.0)
    import spatialdata as sd
    assert "he" in sd.read_zarr(out / "sample.zarr").images


def test_png_without_mpp_fails_naming_the_file(tmp_path):
    path = tmp_path / "nompp.png"
    Image.fromarray(he_image()).save(path, dpi=(72, 72))  # a screen dpi is not a pixel size
    with pytest.raises(InputError, match=r"nompp\.png.*no pixel size.*`mpp`"):
        read_sample("he", "H4", path)


def test_tiff_without_resolution_fails(tmp_path):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, he_image(), photometric="rgb")
    with pytest.raises(InputError, match=r"bare\.tif.*no pixel size"):
        read_sample("he", "H5", path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_sample("he", "H6", tmp_path / "absent.svs")
    with pytest.raises(InputError, match="not a folder"):
        read_sample("he", "H7", tmp_path)


def test_write_he_only_keeps_pixels_and_mpp(tmp_path):
    from histomap.data.io.he import write_he_only

    image = he_image()
    src = write_pyramid(image, tmp_path / "src.tif", mpp=0.5, tile=64)
    tif = write_he_only(src, tmp_path / "out" / "A.tif")
    assert read_sample("he", "A", tif).mpp == pytest.approx(0.5)
    png = write_he_only(src, tmp_path / "out" / "B.png")
    assert np.asarray(Image.open(png)).shape == image.shape
    np.testing.assert_array_equal(np.asarray(Image.open(png)), tifffile.imread(src, key=0))
    with pytest.raises(InputError, match="no pixel size"):
        read_sample("he", "B", png)
