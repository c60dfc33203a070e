"""Whole-slide images: pyramidal TIFF writing, OpenSlide access and patch reading.

Slides are always accessed through OpenSlide. Sources OpenSlide cannot open as a slide (JPEG,
PNG, plain TIFF without tiles) are converted once to a tiled, JPEG-compressed pyramidal TIFF
written as ordinary pages with the resolution in centimetres, which OpenSlide opens as
``generic-tiff`` with every level and ``openslide.mpp-x/y`` (pyramids written as SubIFDs show
only level 0 in OpenSlide 4.0).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from histomap.errors import InputError
from histomap.outputs import atomic_output

TILE = 256
# A HER2ST JPEG has ~92 Mpx, above PIL's default decompression-bomb limit (89 Mpx).
Image.MAX_IMAGE_PIXELS = 4_000_000_000


def _levels(image: np.ndarray, tile: int):
    """Level 0, then halvings (2x2 box mean) until the level fits in one tile."""
    level = image
    yield level
    while max(level.shape[:2]) > tile:
        h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
        if h == 0 or w == 0:
            break
        # fixed-point box filter keeps memory at one level at a time
        level = (level[:h:2, :w:2].astype(np.uint16) + level[1:h:2, :w:2] + level[:h:2, 1:w:2]
                 + level[1:h:2, 1:w:2] + 2) // 4
        level = level.astype(np.uint8)
        yield level


def write_pyramid(image: np.ndarray, dst: str | Path, mpp: float, *, tile: int = TILE,
                  quality: int = 90) -> Path:
    """Write an RGB uint8 (H, W, 3) array as a pyramidal tiled TIFF with its mpp.

    The file is written under a temporary name and renamed, so a failure leaves nothing.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not mpp or mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp!r}")
    dst = Path(dst)
    with atomic_output(dst) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, level in enumerate(_levels(image, tile)):
            px_per_cm = 1e4 / (mpp * image.shape[1] / level.shape[1])
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                     compressionargs={"level": quality}, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
                     metadata=None)
    return dst


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode a flat image file (JPEG/PNG/TIFF) to RGB uint8, with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file does not exist")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            if arr.dtype != np.uint8:
                arr = _to_uint8(arr)
            return np.ascontiguousarray(arr[..., :3])
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InputError(path, f"cannot read image: {exc}") from exc


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    scaled = np.clip((arr.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def is_pyramidal_slide(path: str | Path) -> bool:
    """True when OpenSlide opens ``path`` as a slide (not as a flat ImageSlide)."""
    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except openslide.OpenSlideError:
        return False


def _override_mpp(src: Path, dst: Path, mpp: float) -> None:
    """Rewrite the resolution tags of ``dst`` (a copy of generic-tiff ``src``) to ``mpp``.

    OpenSlide takes ``openslide.mpp-x/y`` of a generic TIFF from level 0's resolution tags;
    other vendors keep it elsewhere, so their metadata cannot be overridden here.
    """
    try:
        if openslide.OpenSlide.detect_format(str(src)) != "generic-tiff":
            raise InputError(src, f"the slide's mpp metadata differs from the configured mpp "
                                  f"{mpp}, and only generic TIFF pyramids can be overridden; "
                                  f"remove `mpp` from the sample sheet or fix the metadata")
        with tifffile.TiffFile(dst, mode="r+b") as tif:
            width0 = tif.pages[0].imagewidth
            for page in tif.pages:
                tags = page.tags
                if not all(k in tags for k in ("XResolution", "YResolution", "ResolutionUnit")):
                    raise InputError(src, "TIFF has no resolution tags to carry the configured "
                                          "mpp; convert it to a flat image first")
                px_per_cm = 1e4 / (mpp * width0 / page.imagewidth)
                den = max(1, min(10**6, (2**32 - 1) // (int(px_per_cm) + 1)))
                value = (int(round(px_per_cm * den)), den)
                tags["XResolution"].overwrite(value)
                tags["YResolution"].overwrite(value)
                tags["ResolutionUnit"].overwrite(3)  # centimetre
        with openslide.OpenSlide(str(dst)) as slide:
            written = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X) or "nan")
        if not abs(written - mpp) <= 1e-6 * mpp:
            raise InputError(src, f"could not set mpp {mpp} on the copied slide (reads {written})")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def prepare_slide(src: str | Path, dst: str | Path, mpp: float | None) -> float:
    """Make ``dst`` an OpenSlide-readable pyramid of ``src``; return its mpp.

    A source OpenSlide already reads is linked (mpp from ``mpp`` or the slide's metadata);
    anything else is decoded once and written as a pyramidal TIFF (``mpp`` required).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(src, "image file does not exist")
    if not os.access(src, os.R_OK):
        raise InputError(src, "image file is not readable")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if is_pyramidal_slide(src):
        with openslide.OpenSlide(str(src)) as slide:
            found = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        mpp = mpp or (float(found) if found else None)
        if not mpp:
            raise InputError(src, "slide has no mpp metadata; set `mpp` in the sample sheet")
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        same_mpp = bool(found) and abs(float(found) - mpp) <= 1e-6 * mpp
        if src.suffix.lower() in (".tif", ".tiff") and same_mpp:
            os.symlink(src.resolve(), dst)
        else:  # copy so the pyramid carries the mpp the user gave
            shutil.copyfile(src, dst)
            if not same_mpp:
                _override_mpp(src, dst, mpp)
        return float(mpp)
    if not mpp:
        raise InputError(src, "image has no pixel size; set `mpp` in the sample sheet")
    write_pyramid(load_rgb(src), dst, mpp)
    return float(mpp)


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide written by :func:`prepare_slide` (or any OpenSlide format)."""
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, FileNotFoundError) as exc:
        raise InputError(path, f"OpenSlide cannot open the slide: {exc}") from exc


def slide_mpp(slide: openslide.OpenSlide, path: str | Path = "slide") -> float:
    mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    if not mpp:
        raise InputError(path, "slide has no openslide.mpp-x property")
    return float(mpp)


def read_region(slide: openslide.OpenSlide, x0: float, y0: float, w0: float, h0: float,
                out_w: int, out_h: int) -> np.ndarray:
    """Read the level-0 box (x0, y0, w0, h0) resampled to (out_h, out_w, 3) RGB uint8.

    Reads from the coarsest pyramid level that still has at least the output resolution, so
    cost does not grow with the slide; a level of exactly the output resolution is returned as
    read, without resampling. Outside the slide OpenSlide returns transparent pixels, which come
    back white (composited over white; a fully opaque region, the usual case, skips the
    compositing, which would return its RGB unchanged).
    """
    downsample = min(w0 / out_w, h0 / out_h)
    level = slide.get_best_level_for_downsample(max(downsample, 1.0))
    ds = slide.level_downsamples[level]
    lw, lh = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
    region = slide.read_region((int(round(x0)), int(round(y0))), level, (lw, lh))
    if region.getchannel("A").getextrema()[0] == 255:
        rgb = region.convert("RGB")
    else:
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, region).convert("RGB")
    if rgb.size != (out_w, out_h):
        rgb = rgb.resize((out_w, out_h), Image.BILINEAR)
    return np.asarray(rgb)


def read_patch(slide: openslide.OpenSlide, cx: float, cy: float, size_um: float, slide_mpp: float,
               out_mpp: float) -> np.ndarray:
    """Square patch of ``size_um`` centred at level-0 pixel (cx, cy), resampled to ``out_mpp``."""
    side0 = size_um / slide_mpp
    out = max(1, int(round(size_um / out_mpp)))
    return read_region(slide, cx - side0 / 2, cy - side0 / 2, side0, side0, out, out)


def write_transformed_pyramid(slide: openslide.OpenSlide, dst: str | Path, mpp: float,
                              transform, *, tile: int = TILE, quality: int = 90) -> Path:
    """Write ``slide`` as a pyramidal tiled TIFF (the levels of :func:`write_pyramid`: halvings
    until one tile holds a level) with every RGB tile passed through ``transform`` (uint8
    (tile, tile, 3) -> the same), one tile in memory at a time, so a whole-slide image of any
    size streams through. Level k is read from the source's best level for 2^k (an exact
    level of a pyramid written by :func:`write_pyramid`). Atomic, as :func:`write_pyramid`."""
    width, height = slide.dimensions
    sizes = [(height, width)]
    while max(sizes[-1]) > tile and min(sizes[-1]) >= 2:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))

    def tiles(k: int, h: int, w: int):
        down = width / w
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                th, tw = min(tile, h - y), min(tile, w - x)
                rgb = read_region(slide, x * down, y * down, tw * down, th * down, tw, th)
                out = np.full((tile, tile, 3), 255, np.uint8)
                out[:th, :tw] = transform(rgb)
                yield out

    dst = Path(dst)
    with atomic_output(dst) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, (h, w) in enumerate(sizes):
            px_per_cm = 1e4 / (mpp * width / w)
            tw.write(tiles(k, h, w), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1, metadata=None)
    return dst
