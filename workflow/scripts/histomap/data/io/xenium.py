"""Reader for 10x Xenium outputs: decoded transcripts plus a morphology (or registered H&E) image.

A Xenium folder (``path``) holds
* ``transcripts.parquet`` or ``transcripts.csv(.gz)`` (or one ``transcripts*.parquet|csv``):
  one row per decoded transcript with the 10x columns ``transcript_id, cell_id,
  overlaps_nucleus, feature_name, x_location, y_location, z_location, qv`` (locations in
  micrometres; a leading unnamed row-index column is ignored). Only ``feature_name``,
  ``x_location``, ``y_location`` are required; without ``qv`` no quality filter is applied;
* the image: ``image`` when given, else ``morphology_mip*.tif``, ``morphology_focus*.tif`` or
  ``morphology.ome.tif`` in ``path`` (a DAPI image is uint16, single channel: the slide is made
  from it by :func:`histomap.data.slide.prepare_slide`, grey to RGB);
* optionally ``alignment.json`` = ``{"origin_um": [x, y]}``: the transcript-frame position (um)
  of the image's top-left corner, and ``experiment.xenium`` (its ``pixel_size`` is an mpp source).

Post-Xenium H&E. With an H&E ``image`` and 10x's alignment file (``alignment``, else
``{prefix}_he_imagealignment.csv`` beside a ``{prefix}_he_image.ome.tif``), transcripts are
placed on the H&E by the file's 3 x 3 affine, which (Xenium Explorer's convention, also
spatialdata-io's) takes H&E pixels (x, y, 1) to Xenium morphology-image pixels; a transcript at
(x_um, y_um) is at morphology pixel (x_um, y_um) / ``pixel_size`` (``experiment.xenium``, else
10x's 0.2125 um), so its H&E pixel is ``A^-1 ((x_um, y_um) / pixel_size - t)``. The H&E mpp is the
sheet's, else ``pixel_size * sqrt(|det A|)``. Without an alignment file the image is placed by
``origin_um`` as below, and without ``image`` the morphology image is the slide.

Geometry. A transcript at (x_um, y_um) lies at level-0 pixel ((x_um - ox) / mpp,
(y_um - oy) / mpp) of the image, with origin (ox, oy) from the ``origin_um`` argument, else
``alignment.json``, else (0, 0). When the origin is not given and the transcripts would fall off
the image at (0, 0), the image is taken to be a crop starting at (floor(min x), floor(min y)) um,
which is logged as a warning (it is how cropped exports such as the 10x breast crop are laid
out); if they still do not fit, the reader fails rather than guess further.

Filtering. Transcripts with ``qv < min_qv`` (default 20, 10x's own threshold) and control
features (negative-control probes and codewords, blank, unassigned and deprecated codewords,
antisense and intergenic probes; and ``is_gene == False`` where that column exists) are dropped,
with counts per category in the log.

Outputs (the :class:`~histomap.data.sample.Sample` contract):
* ``highres``: transcripts summed into ``highres_bin_um`` (2 um) square bins on a grid starting
  at image pixel (0, 0), non-empty bins only: X raw counts (CSR), obs ``row, col, n_points,
  diameter_um``, obsm["spatial"] bin centres (level-0 px), obs_names ``bin_{row}x{col}``,
  uns["bins"] (as :func:`histomap.data.aggregate.aggregate_bins`) and uns["xenium"] (origin,
  filters, transcript counts);
* ``spots``: a Visium-like pseudo-spot grid (discs of ``spot_diameter_um``, default 55 um, on a
  hexagonal lattice with ``spot_pitch_um`` = 100 um centre spacing, every disc inside the image)
  summing the transcripts whose position lies in each disc; spots holding no transcript are
  dropped (logged). obs ``array_row``, ``array_col`` (Visium convention: odd rows are shifted by
  half a pitch and columns are doubled, so ``array_row + array_col`` is even), ``n_transcripts``.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from histomap.checked_io import REMEDY_USER, check_parquet
from histomap.data.io._checks import check_positive, image_size
from histomap.data.sample import Sample, annotate_spots
from histomap.errors import InputError

log = logging.getLogger(__name__)

PLATFORM = "xenium"
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0
HIGHRES_BIN_UM = 2.0
MIN_QV = 20.0
TRANSCRIPT_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
TRANSCRIPT_GLOBS = ("transcripts*.parquet", "transcripts*.csv.gz", "transcripts*.csv")
IMAGE_GLOBS = ("morphology_mip*.tif", "morphology_mip*.tiff", "morphology_focus*.tif",
               "morphology_focus*.tiff", "morphology.ome.tif")
REQUIRED_COLUMNS = ("feature_name", "x_location", "y_location")
OPTIONAL_COLUMNS = ("qv", "is_gene")
# feature-name prefix -> category of control features that are not genes
CONTROL_PREFIXES = {
    "NegControlProbe_": "negative control probe",
    "NegControlCodeword_": "negative control codeword",
    "BLANK_": "blank codeword",
    "UnassignedCodeword_": "unassigned codeword",
    "DeprecatedCodeword_": "deprecated codeword",
    "antisense_": "antisense probe",
    "Intergenic": "intergenic probe",
}
MAX_OUTSIDE_FRACTION = 1e-3  # transcripts off the image tolerated (dropped, logged) at its edge


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None,
         origin_um: tuple[float, float] | None = None, min_qv: float = MIN_QV,
         highres_bin_um: float = HIGHRES_BIN_UM, spot_pitch_um: float = SPOT_PITCH_UM,
         alignment: str | Path | None = None) -> Sample:
    """Read a Xenium folder into a :class:`Sample` (see the module docstring).

    ``mpp``: micrometres per level-0 pixel of the image (None: from the image's OME/TIFF
    metadata or ``experiment.xenium``, else InputError "missing mpp"); ``spot_diameter_um``:
    pseudo-spot diameter (default 55 um); ``image``: the image to use instead of the morphology
    image in ``path``; ``origin_um``: (x, y) um of the image's top-left corner in the transcript
    frame (overrides ``alignment.json``); ``alignment``: 10x's H&E alignment CSV (see the
    module docstring; found beside a ``*he_image.ome.tif`` when not given).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "Xenium folder does not exist")
    transcripts_path = find_transcripts(folder)
    image_path = Path(image) if image is not None else find_image(folder)
    if not image_path.is_file():
        raise InputError(image_path, "image file does not exist")
    spot_diameter_um = check_positive(spot_diameter_um, "spot_diameter_um", folder,
                                      default=SPOT_DIAMETER_UM)
    highres_bin_um = check_positive(highres_bin_um, "highres_bin_um", folder)
    spot_pitch_um = check_positive(spot_pitch_um, "spot_pitch_um", folder)
    alignment = find_he_alignment(image_path, folder) if alignment is None and image is not None \
        else (Path(alignment) if alignment is not None else None)
    if alignment is not None:
        matrix = read_he_alignment(alignment)
        pixel_size = xenium_pixel_size(folder)
        mpp = he_mpp(mpp, matrix, pixel_size, image_path, alignment)
    else:
        mpp = resolve_mpp(mpp, image_path, folder)

    table = read_transcripts(transcripts_path)
    n_read = len(table)
    table, genes, dropped = filter_transcripts(table, transcripts_path, min_qv)
    width, height = image_size(image_path)
    xy_um = table[["x_location", "y_location"]].to_numpy(np.float64)
    if alignment is not None:
        xy_px = he_pixels(xy_um, matrix, pixel_size)
        origin, origin_source = (float("nan"), float("nan")), f"H&E alignment {alignment.name}"
    else:
        origin, origin_source = resolve_origin(origin_um, folder, table, transcripts_path,
                                               width * mpp, height * mpp)
        xy_px = (xy_um - np.asarray(origin)) / mpp
    keep = on_image(xy_px, width, height, transcripts_path, image_path)
    if not keep.all():
        dropped["outside the image"] = int((~keep).sum())
        xy_px, table = xy_px[keep], table[keep]
    gene_code = table["feature_name"].cat.codes.to_numpy(np.int64)

    highres = bin_transcripts(xy_px, gene_code, genes, highres_bin_um, mpp, (height, width))
    highres.uns["xenium"] = {
        "transcripts": str(transcripts_path), "origin_um": [float(v) for v in origin],
        "origin_source": origin_source, "min_qv": float(min_qv), "n_transcripts_read": n_read,
        **({"he_alignment": str(alignment), "he_to_xenium_px": matrix.tolist(),
            "xenium_pixel_size_um": pixel_size} if alignment is not None else {}),
        "n_transcripts_kept": int(len(table)), "dropped": dict(dropped)}
    spots = pseudo_spots(xy_px, gene_code, genes, mpp, (height, width), spot_diameter_um,
                         spot_pitch_um, image_path)
    annotate_spots(spots, sample=sample, platform=PLATFORM, mpp=mpp,
                   spot_diameter_um=spot_diameter_um, image=image_path)
    log.info("%s: %d of %d transcripts kept, %d genes; %d bins of %g um, %d pseudo-spots of "
             "%g um every %g um; mpp %.4f um/px, origin (%.2f, %.2f) um (%s), image %s",
             sample, len(table), n_read, len(genes), highres.n_obs, highres_bin_um, spots.n_obs,
             spot_diameter_um, spot_pitch_um, mpp, origin[0], origin[1], origin_source,
             image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=float(mpp),
                  spots=spots, highres=highres)


# --- finding the files ---------------------------------------------------------------------------

def find_transcripts(folder: Path) -> Path:
    """``transcripts.parquet`` / ``.csv.gz`` / ``.csv``, else the one ``transcripts*`` table."""
    for name in TRANSCRIPT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted({p for pattern in TRANSCRIPT_GLOBS for p in folder.glob(pattern)
                    if p.is_file()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(folder / "transcripts.parquet",
                         "Xenium transcripts file not found (transcripts.parquet or "
                         "transcripts.csv(.gz))")
    raise InputError(folder, f"several transcripts tables ({', '.join(p.name for p in found)}); "
                             "keep one")


def find_image(folder: Path) -> Path:
    """The morphology image of the folder (first pattern of ``IMAGE_GLOBS`` that matches)."""
    for pattern in IMAGE_GLOBS:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise InputError(folder, f"several morphology images ({names}); choose one with "
                                     "`image` in the sample sheet")
    raise InputError(folder, "no morphology image (morphology_mip*.tif, morphology_focus*.tif, "
                             "morphology.ome.tif); give the image as `image` in the sample sheet")


# --- pixel size ----------------------------------------------------------------------------------

_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "mm": 1e3,
            "cm": 1e4, "m": 1e6}


def mpp_from_image(path: Path) -> float | None:
    """um per pixel from OME-XML ``PhysicalSizeX`` or TIFF resolution tags (inch/cm), or None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.ome_metadata:
                mpp = _ome_mpp(tif.ome_metadata)
                if mpp:
                    return mpp
            tags = tif.pages[0].tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                per_unit = num / den if den else 0.0
                um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
                if um_per_unit and per_unit > 0:
                    return um_per_unit / per_unit
    except (OSError, ValueError, tifffile.TiffFileError, KeyError):
        return None
    return None


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
            unit = element.get("PhysicalSizeXUnit", "µm")
            factor = _UNIT_UM.get(unit)
            value = float(element.get("PhysicalSizeX"))
            if factor and value > 0:
                return value * factor
    return None


def mpp_from_experiment(folder: Path) -> float | None:
    """``pixel_size`` (um) of ``experiment.xenium`` in the folder, or None."""
    path = folder / "experiment.xenium"
    if not path.is_file():
        return None
    try:
        value = float(json.loads(path.read_text()).get("pixel_size"))
    except (OSError, ValueError, TypeError, json.JSONDecodeError):
        log.warning("%s: no readable pixel_size", path)
        return None
    return value if value > 0 else None


def resolve_mpp(mpp: float | None, image_path: Path, folder: Path) -> float:
    """The given mpp (warning when the metadata disagrees), else the metadata's, else an error."""
    found = mpp_from_image(image_path)
    source = f"{image_path.name} metadata"
    if found is None:
        found, source = mpp_from_experiment(folder), "experiment.xenium"
    if mpp is not None:
        mpp = check_positive(mpp, "mpp", image_path)
        if found is not None and not math.isclose(found, mpp, rel_tol=1e-3):
            log.warning("%s: configured mpp %g differs from %g in %s; using %g", image_path, mpp,
                        found, source, mpp)
        return mpp
    if found is None:
        raise InputError(image_path, "missing mpp: the image has no pixel size metadata (OME "
                                     "PhysicalSizeX or TIFF resolution) and there is no "
                                     "experiment.xenium; set `mpp` in the sample sheet "
                                     "(0.2125 um/px for Xenium morphology images)")
    log.info("%s: mpp %g um/px from %s", image_path.name, found, source)
    return float(found)


# --- transcripts ---------------------------------------------------------------------------------

def _columns(path: Path) -> list[str]:
    if path.name.endswith(".parquet"):
        check_parquet(path, what="transcripts table", remedy=REMEDY_USER)
    try:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (OSError, ValueError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(path, f"cannot read transcripts table: {exc}") from exc


def read_transcripts(path: Path) -> pd.DataFrame:
    """Checked transcripts: ``feature_name`` (str), ``x_location``, ``y_location`` (finite,
    >= 0 um) and ``qv`` / ``is_gene`` where present."""
    columns = _columns(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(path, f"transcripts table lacks column(s) {', '.join(missing)} "
                               f"(has {', '.join(columns)})")
    use = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in columns)]
    try:  # a Parquet file's magic and footer were checked by _columns
        if path.name.endswith(".parquet"):
            table = pd.read_parquet(path, columns=use)
        else:
            table = pd.read_csv(path, usecols=use, dtype={"feature_name": str})
    except (OSError, ValueError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(path, f"cannot parse transcripts table ({exc}); {REMEDY_USER}") from exc
    if table.empty:
        raise InputError(path, "transcripts table has no rows")
    names = table["feature_name"]
    if isinstance(names.iloc[0], bytes):  # binary column in parquet of early Xenium versions
        names = names.map(lambda v: v.decode() if isinstance(v, bytes) else v)
    if names.isna().any():
        raise InputError(path, f"missing feature_name (data row {_first(names.isna()) + 1})")
    table["feature_name"] = names.astype(str)
    for column in ("x_location", "y_location", *(c for c in ("qv",) if c in table)):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values)
        if bad.any():
            row = _first(bad)
            raise InputError(path, f"column {column} has a missing or non-numeric value "
                                   f"(data row {row + 1}: {table[column].iloc[row]!r})")
        table[column] = values.astype(np.float64)
    for column in ("x_location", "y_location"):
        negative = table[column] < 0
        if negative.any():
            row = _first(negative)
            raise InputError(path, f"negative {column} {table[column].iloc[row]:g} um (data row "
                                   f"{row + 1}); Xenium locations are >= 0 um")
    return table


def _first(mask: pd.Series) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def control_category(name: str) -> str | None:
    """Category of a control feature name, None for a gene."""
    for prefix, category in CONTROL_PREFIXES.items():
        if name.startswith(prefix):
            return category
    return None


def filter_transcripts(table: pd.DataFrame, path: Path, min_qv: float
                       ) -> tuple[pd.DataFrame, pd.Index, dict[str, int]]:
    """Drop low-quality transcripts and control features (logged per category).

    Returns the kept rows with ``feature_name`` as a categorical over the gene panel (every
    non-control feature of the table, sorted, also genes left with no kept transcript), the
    panel, and {reason: number of transcripts dropped}.
    """
    names = table["feature_name"]
    features = pd.Index(names.unique())
    category = pd.Series({f: control_category(f) for f in features}, dtype=object)
    if "is_gene" in table:
        is_gene = table["is_gene"]
        if not pd.api.types.is_bool_dtype(is_gene):
            is_gene = is_gene.astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))
        not_gene = table.loc[~is_gene.to_numpy(), "feature_name"].unique()
        category[[f for f in not_gene if category[f] is None]] = "is_gene == False"
    genes = pd.Index(sorted(f for f in features if category[f] is None))
    if genes.empty:
        raise InputError(path, "transcripts table has no gene features (only controls)")
    dropped: dict[str, int] = {}
    row_category = names.map(category)
    for cat, n in row_category.value_counts().items():
        dropped[str(cat)] = int(n)
    keep = row_category.isna().to_numpy()
    if "qv" in table:
        low = (table["qv"].to_numpy() < min_qv) & keep
        if low.any():
            dropped[f"qv < {min_qv:g}"] = int(low.sum())
        keep &= ~low
    else:
        log.warning("%s: no qv column; no transcript quality filter applied", path.name)
    n_controls = len(features) - len(genes)
    log.info("%s: %d transcripts, %d features (%d genes, %d controls); dropped %s", path.name,
             len(table), len(features), len(genes), n_controls,
             ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none")
    kept = table[keep].copy()
    kept["feature_name"] = pd.Categorical(kept["feature_name"], categories=genes)
    return kept, genes, dropped


# --- geometry ------------------------------------------------------------------------------------

XENIUM_PIXEL_SIZE_UM = 0.2125  # 10x's morphology-image pixel size
HE_IMAGE_SUFFIX = "he_image.ome.tif"
HE_ALIGNMENT_SUFFIX = "he_imagealignment.csv"


def find_he_alignment(image_path: Path, folder: Path) -> Path | None:
    """10x's alignment CSV of an H&E named ``{prefix}he_image.ome.tif`` (beside it or in the
    Xenium folder), or None."""
    if not image_path.name.endswith(HE_IMAGE_SUFFIX):
        return None
    name = image_path.name[:-len(HE_IMAGE_SUFFIX)] + HE_ALIGNMENT_SUFFIX
    for candidate in (image_path.with_name(name), folder / name):
        if candidate.is_file():
            return candidate
    log.warning("%s: an H&E image without its alignment file %s; it is placed as a morphology "
                "image (origin_um / alignment.json): give `alignment` in the sample sheet if "
                "it was registered in Xenium Explorer", image_path, name)
    return None


def read_he_alignment(path: Path) -> np.ndarray:
    """The 3 x 3 affine (H&E px -> Xenium morphology px) of 10x's alignment CSV."""
    if not path.is_file():
        raise InputError(path, "H&E alignment file not found")
    try:
        table = pd.read_csv(path, header=None)
        matrix = table.to_numpy(dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"H&E alignment file is not a 3 x 3 affine matrix: {exc}") from exc
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise InputError(path, f"H&E alignment file is not a 3 x 3 affine matrix: found "
                               f"{matrix.shape[0]} x {matrix.shape[1] if matrix.ndim > 1 else 1} "
                               "values (expected 3 comma-separated rows of 3 numbers)")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise InputError(path, f"H&E alignment file is not an affine matrix: its last row is "
                               f"{matrix[2].tolist()}, expected [0, 0, 1]")
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InputError(path, "H&E alignment matrix is singular (not invertible)")
    return matrix


def xenium_pixel_size(folder: Path) -> float:
    found = mpp_from_experiment(folder)
    if found is None:
        log.warning("%s: no pixel_size in experiment.xenium; using 10x's %g um per morphology "
                    "pixel for the H&E alignment", folder, XENIUM_PIXEL_SIZE_UM)
        return XENIUM_PIXEL_SIZE_UM
    return found


def he_mpp(mpp: float | None, matrix: np.ndarray, pixel_size: float, image_path: Path,
           alignment: Path) -> float:
    """The H&E's um per pixel: the sheet's, else implied by the alignment's scale."""
    implied = pixel_size * math.sqrt(abs(float(np.linalg.det(matrix[:2, :2]))))
    if mpp is None:
        log.info("%s: mpp %.4f um/px implied by %s (pixel size %g um)", image_path.name, implied,
                 alignment.name, pixel_size)
        return implied
    mpp = check_positive(mpp, "mpp", image_path)
    if not math.isclose(mpp, implied, rel_tol=0.02):
        log.warning("%s: sheet mpp %g differs from %g implied by %s; using %g", image_path.name,
                    mpp, implied, alignment.name, mpp)
    return mpp


def he_pixels(xy_um: np.ndarray, matrix: np.ndarray, pixel_size: float) -> np.ndarray:
    """Xenium micrometres -> H&E level-0 pixels through the inverse alignment."""
    xenium_px = xy_um / pixel_size - matrix[:2, 2]
    return xenium_px @ np.linalg.inv(matrix[:2, :2]).T

def read_alignment(path: Path) -> tuple[float, float]:
    try:
        value = json.loads(path.read_text())["origin_um"]
        x, y = (float(v) for v in value)
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(path, f'expected {{"origin_um": [x, y]}} (micrometres): {exc}') from exc
    if not (np.isfinite(x) and np.isfinite(y)):
        raise InputError(path, f"origin_um must be finite, got {value!r}")
    return x, y


def _outside_fraction(xy_um: np.ndarray, origin, width_um: float, height_um: float) -> float:
    x, y = xy_um[:, 0] - origin[0], xy_um[:, 1] - origin[1]
    return float(np.mean((x < 0) | (y < 0) | (x >= width_um) | (y >= height_um)))


def resolve_origin(origin_um, folder: Path, table: pd.DataFrame, transcripts_path: Path,
                   width_um: float, height_um: float) -> tuple[tuple[float, float], str]:
    """Image top-left corner in the transcript frame (um) and where it came from."""
    if origin_um is not None:
        x, y = (float(v) for v in origin_um)
        return (x, y), "argument"
    if (folder / "alignment.json").is_file():
        return read_alignment(folder / "alignment.json"), "alignment.json"
    xy = table[["x_location", "y_location"]].to_numpy(np.float64)
    if not len(xy) or _outside_fraction(xy, (0.0, 0.0), width_um, height_um) \
            <= MAX_OUTSIDE_FRACTION:
        return (0.0, 0.0), "default (0, 0)"
    inferred = (float(np.floor(xy[:, 0].min())), float(np.floor(xy[:, 1].min())))
    if _outside_fraction(xy, inferred, width_um, height_um) <= MAX_OUTSIDE_FRACTION:
        log.warning("%s: transcripts span x %.1f-%.1f um, y %.1f-%.1f um, outside the %.1f x "
                    "%.1f um image placed at (0, 0); INFERRED that the image is a crop whose "
                    "top-left corner is at (%g, %g) um (floor of the smallest coordinates). Put "
                    '{"origin_um": [x, y]} in %s to set it explicitly', transcripts_path.name,
                    xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max(), width_um,
                    height_um, *inferred, folder / "alignment.json")
        return inferred, "inferred from the transcript extent"
    raise InputError(transcripts_path,
                     f"transcripts span x {xy[:, 0].min():.1f}-{xy[:, 0].max():.1f} um, y "
                     f"{xy[:, 1].min():.1f}-{xy[:, 1].max():.1f} um, which does not fit the "
                     f"{width_um:.1f} x {height_um:.1f} um image (wrong mpp or image?); give the "
                     f'image origin as {{"origin_um": [x, y]}} in {folder / "alignment.json"}')


def on_image(xy_px: np.ndarray, width: int, height: int, transcripts_path: Path,
             image_path: Path) -> np.ndarray:
    """Mask of transcripts on the image; a few at the edge are dropped (logged), many fail."""
    inside = ((xy_px[:, 0] >= 0) & (xy_px[:, 0] < width) & (xy_px[:, 1] >= 0)
              & (xy_px[:, 1] < height))
    n_out = int((~inside).sum())
    if n_out > MAX_OUTSIDE_FRACTION * len(xy_px):
        raise InputError(transcripts_path, f"{n_out} of {len(xy_px)} transcripts lie outside "
                                           f"the {width} x {height} px image {image_path.name} "
                                           "(check mpp and alignment.json origin_um)")
    if n_out:
        log.warning("%s: %d transcripts lie just outside the image and are dropped",
                    transcripts_path.name, n_out)
    return inside


def _counts(rows: np.ndarray, gene_code: np.ndarray, n_rows: int, n_genes: int) -> sp.csr_matrix:
    """(n_rows, n_genes) CSR int32 of how many transcripts of each gene fall in each row."""
    matrix = sp.coo_matrix((np.ones(len(rows), np.int32), (rows, gene_code)),
                           shape=(n_rows, n_genes)).tocsr()
    matrix.sum_duplicates()
    return matrix


def bin_transcripts(xy_px: np.ndarray, gene_code: np.ndarray, genes: pd.Index, bin_um: float,
                    mpp: float, image_shape: tuple[int, int]) -> ad.AnnData:
    """Transcripts summed into square bins of ``bin_um`` covering the image from pixel (0, 0);
    non-empty bins only, in the layout of :func:`histomap.data.aggregate.aggregate_bins`."""
    side = bin_um / mpp
    n_rows = int(math.ceil(image_shape[0] / side))
    n_cols = int(math.ceil(image_shape[1] / side))
    col = np.minimum(np.floor(xy_px[:, 0] / side).astype(np.int64), n_cols - 1)
    row = np.minimum(np.floor(xy_px[:, 1] / side).astype(np.int64), n_rows - 1)
    ids, member = np.unique(row * n_cols + col, return_inverse=True)
    X = _counts(member.ravel(), gene_code, len(ids), len(genes))
    b_row, b_col = ids // n_cols, ids % n_cols
    n_points = np.bincount(member.ravel(), minlength=len(ids)).astype(np.int64)
    obs = pd.DataFrame({"row": b_row, "col": b_col, "n_points": n_points,
                        "diameter_um": float(bin_um)},
                       index=pd.Index([f"bin_{r}x{c}" for r, c in zip(b_row, b_col)]))
    bins = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name=None)))
    bins.obsm["spatial"] = np.column_stack([(b_col + 0.5) * side, (b_row + 0.5) * side])
    bins.uns["bins"] = {"bin_um": float(bin_um), "mpp": float(mpp), "origin_px": [0.0, 0.0],
                        "shape": [n_rows, n_cols]}
    return bins


def hex_grid(width: int, height: int, pitch_px: float, radius_px: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexagonal lattice of disc centres (n, 2) px whose discs lie inside the image, with Visium
    array_row and array_col (odd rows shifted by half a pitch, columns doubled)."""
    dy = pitch_px * math.sqrt(3) / 2
    centres, rows, cols = [], [], []
    for r, y in enumerate(np.arange(radius_px, height - radius_px + 1e-9, dy)):
        shift = pitch_px / 2 if r % 2 else 0.0
        xs = np.arange(radius_px + shift, width - radius_px + 1e-9, pitch_px)
        centres.append(np.column_stack([xs, np.full(len(xs), y)]))
        rows.append(np.full(len(xs), r))
        cols.append(2 * np.arange(len(xs)) + r % 2)
    if not centres:
        return np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centres), np.concatenate(rows), np.concatenate(cols)


def pseudo_spots(xy_px: np.ndarray, gene_code: np.ndarray, genes: pd.Index, mpp: float,
                 image_shape: tuple[int, int], diameter_um: float, pitch_um: float,
                 image_path: str | Path = "image") -> ad.AnnData:
    """Visium-like spots: transcripts within ``diameter_um / 2`` of each hex-lattice centre."""
    height, width = image_shape
    radius = diameter_um / 2 / mpp
    centres, rows, cols = hex_grid(width, height, pitch_um / mpp, radius)
    if not len(centres):
        raise InputError(image_path, f"the image ({width * mpp:.0f} x {height * mpp:.0f} um) is "
                                  f"smaller than one {diameter_um:g} um pseudo-spot")
    if diameter_um <= pitch_um:  # discs do not overlap: each transcript is in <= 1 disc
        dist, nearest = cKDTree(centres).query(xy_px, distance_upper_bound=radius)
        inside = np.isfinite(dist) & (dist <= radius)
        X = _counts(nearest[inside], gene_code[inside], len(centres), len(genes))
    else:
        from histomap.data.aggregate import disc_membership

        member = disc_membership(xy_px, centres, radius).astype(np.int32)
        X = (member @ _counts(np.arange(len(xy_px)), gene_code, len(xy_px), len(genes))).tocsr()
    n_transcripts = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    keep = n_transcripts > 0
    if not keep.all():
        log.info("pseudo-spots: %d of %d lattice spots hold no transcript; dropped",
                 int((~keep).sum()), len(keep))
    names = [f"spot_{r}x{c}" for r, c in zip(rows[keep], cols[keep])]
    obs = pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep],
                        "n_transcripts": n_transcripts[keep], "diameter_um": float(diameter_um)},
                       index=pd.Index(names))
    spots = ad.AnnData(X=X[np.flatnonzero(keep)].tocsr(), obs=obs,
                       var=pd.DataFrame(index=pd.Index(genes, name=None)))
    spots.obsm["spatial"] = centres[keep].astype(np.float64)
    spots.uns["pseudo_spots"] = {"pitch_um": float(pitch_um), "lattice": "hex"}
    return spots
