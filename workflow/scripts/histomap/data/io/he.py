"""Reader for the ``he`` platform: an H&E whole-slide image alone, for application.

Arrow of the DESIGN.md picture: raw sample -> ingest, for the slides a trained model is applied
to (``apply``). The sample-sheet ``path`` (or ``image``) names one image file:

* anything OpenSlide opens as a slide (SVS, NDPI, MRXS, generic tiled TIFF, ...): its mpp is the
  slide's ``openslide.mpp-x`` metadata unless the sheet gives ``mpp``;
* a flat TIFF: its mpp is read from the resolution tags (centimetre or inch units) unless the
  sheet gives one;
* JPEG, PNG (and other flat images PIL reads): the sheet must give ``mpp``; their dpi fields are
  mostly screen defaults (72, 96 dpi), never a microscope's pixel size, so they are not trusted.

With neither slide metadata nor a sheet value the reader fails naming the file. Ingest then
converts flat images to the pyramidal TIFF every slide becomes (:func:`histomap.data.slide.
prepare_slide`). The :class:`~histomap.data.sample.Sample` has an empty spot table (no spots,
no genes) and no high-resolution measurements.
"""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import openslide
import pandas as pd
import scipy.sparse as sp
import tifffile
from PIL import Image

from histomap.data.sample import Sample, annotate_spots
from histomap.errors import InputError
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

PLATFORM = "he"
TIFF_SUFFIXES = (".tif", ".tiff")
UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre


def empty_spots() -> ad.AnnData:
    """A spot table with no spots and no genes (the contract's types, zero rows)."""
    spots = ad.AnnData(X=sp.csr_matrix((0, 0), dtype=np.int32),
                       obs=pd.DataFrame(index=pd.Index([], dtype=str)),
                       var=pd.DataFrame(index=pd.Index([], dtype=str)))
    spots.obsm["spatial"] = np.zeros((0, 2), dtype=np.float64)
    spots.obs["diameter_um"] = np.zeros(0, dtype=np.float64)
    return spots


def slide_metadata_mpp(path: str | Path) -> float | None:
    """Micrometres per level-0 pixel from the image's own metadata, or ``None``.

    OpenSlide's ``openslide.mpp-x`` for slides it opens; the resolution tags of a flat TIFF.
    """
    path = Path(path)
    try:
        is_slide = openslide.OpenSlide.detect_format(str(path)) is not None
    except openslide.OpenSlideError:
        is_slide = False
    if is_slide:
        try:
            with openslide.OpenSlide(str(path)) as slide:
                value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        except openslide.OpenSlideError as exc:
            raise InputError(path, f"OpenSlide cannot open the slide: {exc}") from exc
        return float(value) if value and float(value) > 0 else None
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres = tags.get("XResolution")
            if unit is None or xres is None or int(unit.value) not in UM_PER_UNIT:
                return None
            num, den = xres.value
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InputError(path, f"cannot read TIFF: {exc}") from exc
    if not num or not den:
        return None
    return UM_PER_UNIT[int(unit.value)] * den / num


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None) -> Sample:
    """Read an H&E-only sample: ``image`` (when given) or ``path`` is the slide file.

    ``mpp`` from the sheet wins over the slide's metadata (a differing value is logged); with
    neither, an :class:`InputError` names the file. ``spot_diameter_um`` is unused (no spots).
    """
    slide = Path(image) if image is not None else Path(path)
    if slide.is_dir():
        raise InputError(slide, "the `he` platform needs the slide file itself (SVS, NDPI, "
                                "MRXS, TIFF, JPEG, PNG) as `path` or `image`, not a folder")
    if not slide.is_file():
        raise InputError(slide, "slide file does not exist")
    found = slide_metadata_mpp(slide)
    if mpp is None:
        if found is None:
            raise InputError(slide, "no pixel size: the image carries no mpp metadata; set "
                                    "`mpp` (micrometres per pixel) in the sample sheet")
        mpp = found
        log.info("%s: mpp %.4f um/px from the slide's metadata", sample, mpp)
    else:
        mpp = float(mpp)
        if not np.isfinite(mpp) or mpp <= 0:
            raise InputError(slide, f"mpp must be a positive number, got {mpp!r}")
        if found is not None and abs(found - mpp) > 1e-3 * mpp:
            log.warning("%s: the sample sheet's mpp %g replaces the slide's metadata %g",
                        sample, mpp, found)
    spots = annotate_spots(empty_spots(), sample=sample, platform=PLATFORM, mpp=mpp,
                           spot_diameter_um=spot_diameter_um or 0.0, image=slide)
    log.info("%s: H&E-only slide %s, mpp %.4f um/px", sample, slide, mpp)
    return Sample(name=sample, platform=PLATFORM, image_path=slide, mpp=float(mpp), spots=spots)


def write_he_only(src: str | Path, dst: str | Path) -> Path:
    """An H&E-only copy of a slide (e.g. a synthetic section's ``he.tif``, for the worked
    example ``config/apply.yaml``): ``.tif``/``.tiff`` copies the pyramid with its mpp metadata;
    ``.png``/``.jpg`` writes level 0 as a flat image without a pixel size (the sheet gives it)."""
    import shutil

    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg"):
        raise ValueError(f"{dst}: write .tif, .png or .jpg")
    with atomic_output(dst) as tmp:
        if suffix in TIFF_SUFFIXES:
            shutil.copyfile(src, tmp)
        else:
            level0 = tifffile.imread(src, key=0)
            Image.fromarray(np.ascontiguousarray(level0[..., :3])).save(
                tmp, format="PNG" if suffix == ".png" else "JPEG", quality=95)
    return dst
