"""Reader for legacy Spatial Transcriptomics sections in the HER2ST layout.

A section folder holds
* ``{sample}.tsv.gz``: raw UMI counts, tab-separated, rows are spots named ``{x}x{y}`` (array
  coordinates; the first column holds the name), columns are gene symbols;
* ``{sample}_selection.tsv``: one row per spot under tissue with ``x``, ``y`` (array
  coordinates), ``new_x``, ``new_y`` (array coordinates refined on the image), ``pixel_x``,
  ``pixel_y`` (spot centre in level-0 image pixels) and ``selected`` (1 = kept);
* one H&E image (``*.jpg``/``*.png``/``*.tif``), or the ``image`` given explicitly.

Legacy ST spots are 100 um across on a 200 um centre-to-centre grid; when ``mpp`` is not given it
is inferred from the grid (pixels per grid step). The image-size and count checks are shared
with the other readers (:mod:`histomap.data.io._checks`).
"""
from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.io._checks import (check_counts, check_positive, check_unique,
                                      check_within_image, examples, to_csr_counts)
from histomap.data.sample import UNS_KEY, Sample, annotate_spots, dropped_entry
from histomap.errors import InputError

log = logging.getLogger(__name__)

PLATFORM = "legacy_st"
SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0  # centre-to-centre distance of neighbouring spots on the array
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
MIN_GRID_SPOTS = 3  # fewest spots (spanning >= 2 grid positions) to fit px per grid step
MAX_FIT_SPOTS = 2000  # Theil-Sen is O(n^2); a legacy ST array has at most ~1000 spots


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None) -> Sample:
    """Read one legacy ST section folder into a :class:`Sample`.

    ``mpp`` is micrometres per level-0 pixel of the H&E (``None``: inferred from the spot grid),
    ``spot_diameter_um`` defaults to 100 um, ``image`` overrides the image found in the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "legacy ST section folder does not exist")
    counts_path = find_counts_file(folder, sample)
    selection_path = find_selection_file(folder, sample)
    image_path = Path(image) if image is not None else find_image(folder)
    spot_diameter_um = check_positive(spot_diameter_um, "spot_diameter_um", folder,
                                      default=SPOT_DIAMETER_UM)

    counts = read_counts(counts_path)
    selection = read_selection(selection_path)
    spots, dropped = match_spots(selection, counts, selection_path, counts_path)

    if mpp is None:
        mpp = infer_mpp(spots, sample)
        if mpp is None:
            raise InputError(selection_path, "missing mpp: the spot grid has too few spots or no "
                                             "new_x/new_y columns to infer the pixel size; set "
                                             "`mpp` in the sample sheet")
    mpp = check_positive(mpp, "mpp", folder)

    xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    check_within_image(image_path, xy, spots.index)
    matrix = counts.loc[spots.index].to_numpy()
    adata = ad.AnnData(
        X=to_csr_counts(matrix),
        obs=pd.DataFrame({"array_x": spots["x"].to_numpy(), "array_y": spots["y"].to_numpy()},
                         index=pd.Index(spots.index, name=None)),
        var=pd.DataFrame(index=pd.Index(counts.columns, name=None)),
    )
    adata.obsm["spatial"] = xy
    annotate_spots(adata, sample=sample, platform=PLATFORM, mpp=mpp,
                   spot_diameter_um=spot_diameter_um, image=image_path)
    adata.uns[UNS_KEY]["dropped"] = dropped
    log.info("%s: %d spots x %d genes, mpp %.4f um/px, spot diameter %g um, image %s",
             sample, adata.n_obs, adata.n_vars, mpp, spot_diameter_um, image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=float(mpp),
                  spots=adata)


# --- finding the files ---------------------------------------------------------------------------

def find_counts_file(folder: Path, sample: str) -> Path:
    """``{sample}.tsv.gz`` (or ``.tsv``), else the one other counts TSV in ``folder``."""
    for name in (f"{sample}.tsv.gz", f"{sample}.tsv"):
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.name.endswith((".tsv.gz", ".tsv"))
                    and "_selection.tsv" not in p.name)
    if len(others) == 1:
        log.info("%s: no %s.tsv.gz, using counts file %s", sample, sample, others[0].name)
        return others[0]
    if not others:
        raise InputError(folder, f"no counts file {sample}.tsv.gz (or any other *.tsv.gz/*.tsv)")
    raise InputError(folder, f"no {sample}.tsv.gz and several candidate counts files: "
                             f"{', '.join(p.name for p in others)}")


def find_selection_file(folder: Path, sample: str) -> Path:
    """``{sample}_selection.tsv``, else the one ``*_selection.tsv`` in ``folder``."""
    named = folder / f"{sample}_selection.tsv"
    if named.is_file():
        return named
    others = sorted(p for p in folder.glob("*_selection.tsv*") if p.is_file())
    if len(others) == 1:
        log.info("%s: no %s, using spot selection file %s", sample, named.name, others[0].name)
        return others[0]
    if not others:
        raise InputError(folder, f"no spot selection file {named.name} (x, y, pixel_x, pixel_y)")
    raise InputError(folder, f"no {named.name} and several candidate selection files: "
                             f"{', '.join(p.name for p in others)}")


def find_image(folder: Path) -> Path:
    """The one H&E image (jpg/png/tif) in ``folder``."""
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(folder, "no H&E image (*.jpg, *.png, *.tif) in the section folder; "
                                 "give it as `image` in the sample sheet")
    if len(images) > 1:
        raise InputError(folder, f"several images ({', '.join(p.name for p in images)}); "
                                 "choose one with `image` in the sample sheet")
    return images[0]


# --- reading -------------------------------------------------------------------------------------

def read_header(path: Path) -> list[str]:
    """The fields of the first line of a (gzipped) TSV, quotes stripped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            line = fh.readline()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(path, f"cannot read counts file: {exc}; if it is truncated or corrupt, "
                               "replace it with an intact copy") from exc
    return [f.strip().strip('"') for f in line.rstrip("\r\n").split("\t")]


def read_counts(path: Path) -> pd.DataFrame:
    """Counts table (spots x genes) with unique names and non-negative integer values."""
    header = read_header(path)
    genes = pd.Index(header[1:])
    if len(genes) == 0:
        raise InputError(path, "counts file has no gene columns (expected a tab-separated table "
                               "with spots as rows and genes as columns)")
    check_unique(genes, path, "gene names")
    try:
        counts = pd.read_csv(path, sep="\t", index_col=0)
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        cut = isinstance(exc, (EOFError, OSError, zlib.error)) or "end-of-stream" in str(exc)
        raise InputError(path, f"cannot parse counts table: {exc}" + (
            "; the file is truncated or corrupt: replace it with an intact copy" if cut else "")
        ) from exc
    if counts.shape[1] != len(genes):
        raise InputError(path, f"header has {len(genes)} genes but rows have {counts.shape[1]} "
                               "values")
    counts.columns = genes  # pandas renames duplicates ("G.1"); keep the checked header names
    counts.index = counts.index.astype(str).str.strip()
    if counts.empty:
        raise InputError(path, "counts table has no spots")
    check_unique(counts.index, path, "spot names")
    check_counts(counts, path)
    return counts


def read_selection(path: Path) -> pd.DataFrame:
    """Spot selection table indexed by ``{x}x{y}``, only ``selected == 1`` rows where present."""
    try:
        selection = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(path, f"cannot parse spot selection table: {exc}") from exc
    missing = [c for c in SELECTION_COLUMNS if c not in selection.columns]
    if missing:
        raise InputError(path, f"spot selection table lacks column(s) {', '.join(missing)} "
                               f"(has {', '.join(map(str, selection.columns))})")
    numeric = [c for c in (*SELECTION_COLUMNS, "new_x", "new_y", "selected")
               if c in selection.columns]
    for column in numeric:
        values = pd.to_numeric(selection[column], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise InputError(path, f"column {column} has a missing or non-numeric value "
                                   f"(data row {row + 1})")
        selection[column] = values
    if selection.empty:
        raise InputError(path, "spot selection table has no rows")
    selection.index = pd.Index([f"{_grid_label(x)}x{_grid_label(y)}"
                                for x, y in zip(selection["x"], selection["y"])])
    unselected: list[str] = []
    if "selected" in selection.columns:
        keep = selection["selected"] == 1
        if not keep.any():
            raise InputError(path, f"every one of its {len(selection)} spots has selected = "
                                   f"{', '.join(f'{v:g}' for v in sorted(selection['selected'].unique()))} (no spot is "
                                   "marked 1, under tissue): nothing to read")
        if not keep.all():
            log.info("%s: dropped %d spots with selected != 1", path.name, int((~keep).sum()))
        unselected = list(selection.index[~keep])
        selection = selection[keep]
    check_unique(selection.index, path, "spot positions (x, y)")
    selection.attrs["unselected"] = unselected
    return selection


def _grid_label(value: float) -> str:
    """Array coordinate as written in count row names (integers without a decimal point)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def match_spots(selection: pd.DataFrame, counts: pd.DataFrame, selection_path: Path,
                counts_path: Path) -> tuple[pd.DataFrame, dict]:
    """Selection rows that have a counts row (selection order), and what each side loses
    ({what: :func:`histomap.data.sample.dropped_entry`}; count rows of spots the selection
    marks ``selected != 1`` are left out on purpose and not counted)."""
    in_counts = selection.index.isin(counts.index)
    in_selection = counts.index.isin(selection.index)
    in_selection |= counts.index.isin(selection.attrs.get("unselected", []))
    dropped = {}
    if not in_counts.any():
        raise InputError(counts_path, f"no count row name matches a spot of {selection_path.name} "
                                      f"(count rows look like {list(counts.index[:3])}, "
                                      f"selected spots like {list(selection.index[:3])})")
    if not in_counts.all():
        lost = selection.index[~in_counts]
        log.warning("%s: %d selected spots have no row in %s and are dropped: %s",
                    selection_path.name, len(lost), counts_path.name, examples(lost))
        dropped[f"selected spots of {selection_path.name} without a count row in "
                f"{counts_path.name}"] = dropped_entry(counts_path, len(lost), len(selection),
                                                       lost)
    if not in_selection.all():
        lost = counts.index[~in_selection]
        log.warning("%s: %d count rows have no selected spot in %s and are dropped: %s",
                    counts_path.name, len(lost), selection_path.name, examples(lost))
        dropped[f"count rows without a spot in {selection_path.name}"] = dropped_entry(
            counts_path, len(lost), len(counts), lost)
    return selection[in_counts], dropped


# --- geometry ------------------------------------------------------------------------------------

def infer_mpp(spots: pd.DataFrame, sample: str = "") -> float | None:
    """Micrometres per pixel from the spot grid: 200 um / (pixels per grid step).

    Pixels per step is the robust (Theil-Sen) slope of ``pixel_x`` on ``new_x`` and of
    ``pixel_y`` on ``new_y``, averaged; ``None`` when neither axis can be fitted.
    """
    steps = {axis: _px_per_step(spots, f"new_{axis}", f"pixel_{axis}") for axis in ("x", "y")}
    fitted = {axis: s for axis, s in steps.items() if s is not None}
    if not fitted:
        return None
    if len(fitted) == 2 and abs(fitted["x"] - fitted["y"]) > 0.05 * max(fitted.values()):
        log.warning("%s: pixels per grid step differ between x (%.1f) and y (%.1f); the inferred "
                    "mpp uses their mean", sample, fitted["x"], fitted["y"])
    px_per_step = float(np.mean(list(fitted.values())))
    mpp = SPOT_PITCH_UM / px_per_step
    log.info("%s: inferred mpp %.4f um/px from the spot grid (%s px per %g um grid step)",
             sample, mpp, ", ".join(f"{a}: {s:.1f}" for a, s in fitted.items()), SPOT_PITCH_UM)
    return mpp


def _px_per_step(spots: pd.DataFrame, grid_col: str, pixel_col: str) -> float | None:
    """Absolute Theil-Sen slope of pixel on grid coordinate, or ``None`` if not identifiable."""
    from scipy.stats import theilslopes

    if grid_col not in spots.columns or len(spots) < MIN_GRID_SPOTS:
        return None
    grid = spots[grid_col].to_numpy(dtype=np.float64)
    pixel = spots[pixel_col].to_numpy(dtype=np.float64)
    if np.ptp(grid) < 1.0:  # all spots in one grid row/column
        return None
    if len(grid) > MAX_FIT_SPOTS:
        pick = np.random.default_rng(0).choice(len(grid), MAX_FIT_SPOTS, replace=False)
        grid, pixel = grid[pick], pixel[pick]
    slope = abs(float(theilslopes(pixel, grid)[0]))
    return slope if np.isfinite(slope) and slope > 0 else None
