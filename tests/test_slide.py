"""Slides: pyramid writing, preparation of sources, region and patch reading."""
from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from histomap.data.slide import (
    open_slide,
    prepare_slide,
    read_patch,
    read_region,
    slide_mpp,
    write_pyramid,
    write_transformed_pyramid,
)
from histomap.errors import InputError


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB image (JPEG-friendly, but with structure a misplacement would show)."""
    noise = np.random.default_rng(seed).normal(size=(h, w, 3))
    field = ndimage.gaussian_filter(noise, sigma=(6, 6, 0))
    field = (field - field.mean()) / field.std()
    return np.clip(128 + 50 * field, 0, 255).astype(np.uint8)


def square_image(h: int = 2048, w: int = 2048, box=(800, 600, 1000, 800)) -> np.ndarray:
    """White image with a red square at level-0 box (x0, y0, x1, y1)."""
    img = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (200, 30, 30)
    return img


def is_red(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(int)
    return (rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)


def test_write_pyramid_round_trip(tmp_path):
    img = smooth_rgb(900, 1300)
    dst = write_pyramid(img, tmp_path / "slide.tif", 0.37)
    assert openslide.OpenSlide.detect_format(str(dst)) == "generic-tiff"
    assert not (tmp_path / "slide.tif.partial").exists()
    with open_slide(dst) as slide:
        assert slide.level_count > 1
        assert slide.dimensions == (1300, 900)
        assert slide.level_dimensions[1] == (650, 450)
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            assert float(slide.properties[key]) == pytest.approx(0.37, rel=1e-6)
        assert slide_mpp(slide) == pytest.approx(0.37, rel=1e-6)
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1])
                            .convert("RGB"))
    assert np.abs(level0.astype(int) - img).mean() < 6
    # level 1 is the 2x2 mean of level 0
    halved = img.reshape(450, 2, 650, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1 - halved).mean() < 6


def test_a_slide_streams_through_a_tile_transform_into_the_same_pyramid(tmp_path):
    """write_transformed_pyramid: the source's size, mpp and levels, every tile through the
    transform (here an inversion), edge tiles cut to the image."""
    img = smooth_rgb(700, 1100)
    src = write_pyramid(img, tmp_path / "slide.tif", 0.5)
    with open_slide(src) as slide:
        dst = write_transformed_pyramid(slide, tmp_path / "inverted.tif", 0.5,
                                        lambda rgb: 255 - rgb)
        levels = slide.level_dimensions
        source0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    with open_slide(dst) as out:
        assert out.level_dimensions == levels and slide_mpp(out) == pytest.approx(0.5)
        got0 = np.asarray(out.read_region((0, 0), 0, out.dimensions).convert("RGB"))
        got1 = np.asarray(out.read_region((0, 0), 1, levels[1]).convert("RGB"))
    # two JPEG encodings (the source's and the output's) at quality 90
    assert np.abs((255 - got0.astype(int)) - source0).mean() < 6
    halved = img[:700, :1100].reshape(350, 2, 550, 2, 3).mean(axis=(1, 3))
    assert np.abs((255 - got1.astype(int)) - halved).mean() < 6
    assert not (tmp_path / "inverted.tif.partial").exists()


def test_write_pyramid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="RGB uint8"):
        write_pyramid(np.zeros((10, 10), np.uint8), tmp_path / "a.tif", 0.5)
    with pytest.raises(ValueError, match="mpp"):
        write_pyramid(np.zeros((10, 10, 3), np.uint8), tmp_path / "a.tif", 0)
    assert list(tmp_path.iterdir()) == []


def test_prepare_slide_converts_png(tmp_path):
    img = smooth_rgb(700, 600, seed=1)
    src = tmp_path / "he.png"
    Image.fromarray(img).save(src)
    dst = tmp_path / "out" / "slide.tif"
    assert prepare_slide(src, dst, 0.8) == 0.8
    assert dst.is_file() and not dst.is_symlink()
    with open_slide(dst) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.dimensions == (600, 700)
        assert slide_mpp(slide) == pytest.approx(0.8, rel=1e-6)
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert np.abs(level0.astype(int) - img).mean() < 6


def test_prepare_slide_links_or_copies_a_pyramid(tmp_path):
    src = write_pyramid(smooth_rgb(600, 700, seed=2), tmp_path / "src.tif", 0.5)
    # same mpp (given or from metadata): a link, no copy
    for name, mpp in (("given.tif", 0.5), ("found.tif", None)):
        dst = tmp_path / name
        assert prepare_slide(src, dst, mpp) == pytest.approx(0.5)
        assert dst.is_symlink() and dst.resolve() == src.resolve()
    # a different configured mpp: a copy that carries it, the source untouched
    dst = tmp_path / "override.tif"
    assert prepare_slide(src, dst, 0.25) == 0.25
    assert dst.is_file() and not dst.is_symlink()
    with open_slide(dst) as slide:
        assert slide_mpp(slide) == pytest.approx(0.25, rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        assert slide.level_count > 1
    with open_slide(src) as slide:
        assert slide_mpp(slide) == pytest.approx(0.5, rel=1e-6)
    # re-running replaces the previous output
    assert prepare_slide(src, dst, 0.5) == pytest.approx(0.5)
    assert dst.is_symlink()


def test_prepare_slide_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="does not exist") as err:
        prepare_slide(missing, tmp_path / "slide.tif", 0.5)
    assert err.value.path == str(missing)
    assert str(missing) in str(err.value)
    assert not (tmp_path / "slide.tif").exists()


def test_prepare_slide_missing_mpp(tmp_path):
    png = tmp_path / "he.png"
    Image.fromarray(smooth_rgb(64, 64)).save(png)
    with pytest.raises(InputError, match="mpp") as err:
        prepare_slide(png, tmp_path / "slide.tif", None)
    assert err.value.path == str(png)
    # a tiled TIFF without physical resolution: OpenSlide reads it, but no mpp
    tif = tmp_path / "nores.tif"
    tifffile.imwrite(tif, smooth_rgb(600, 600), tile=(256, 256), photometric="rgb")
    with pytest.raises(InputError, match="mpp") as err:
        prepare_slide(tif, tmp_path / "slide2.tif", None)
    assert err.value.path == str(tif)
    with open_slide(tif) as slide, pytest.raises(InputError, match="mpp") as err:
        slide_mpp(slide, tif)
    assert err.value.path == str(tif)


def test_open_slide_unreadable(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(InputError) as err:
        open_slide(bad)
    assert err.value.path == str(bad)


@pytest.fixture(scope="module")
def square_slide(tmp_path_factory):
    """2048 px square slide at 0.5 um/px, red square at level-0 x 800-1000, y 600-800."""
    path = tmp_path_factory.mktemp("square") / "square.tif"
    write_pyramid(square_image(), path, 0.5)
    with open_slide(path) as slide:
        yield slide


def test_read_patch_size_and_content(square_slide):
    # 200 um patch centred on the square, at 2 um/px: 100 px, square 100 um -> central 50 px
    patch = read_patch(square_slide, 900, 700, size_um=200, slide_mpp=0.5, out_mpp=2.0)
    assert patch.shape == (100, 100, 3) and patch.dtype == np.uint8
    red = is_red(patch)
    assert red[25:75, 25:75][2:-2, 2:-2].all()
    assert not red[:23].any() and not red[77:].any()
    assert not red[:, :23].any() and not red[:, 77:].any()
    assert red.mean() == pytest.approx(0.25, abs=0.03)


def test_read_patch_off_centre(square_slide):
    # centred on the square's top-left corner: only the lower-right quadrant is red
    patch = read_patch(square_slide, 800, 600, size_um=100, slide_mpp=0.5, out_mpp=1.0)
    assert patch.shape == (100, 100, 3)
    red = is_red(patch)
    assert red[53:, 53:].all()
    assert not red[:47].any() and not red[:, :47].any()


def test_read_region_resamples_and_pads_white(square_slide):
    out = read_region(square_slide, 700, 500, 400, 400, 40, 40)  # 10x down
    assert out.shape == (40, 40, 3)
    red = is_red(out)
    assert red[11:29, 11:29].all() and red.mean() == pytest.approx(0.25, abs=0.04)
    # a box half outside the slide comes back white outside
    edge = read_region(square_slide, 1948, 0, 200, 200, 50, 50)
    assert (edge[:, 27:] == 255).all()
