"""Reader for 10x Visium (standard, 55 um spots) Space Ranger ``outs/`` folders.

Reads
* ``filtered_feature_bc_matrix.h5``: the 10x HDF5 matrix (CSC by barcode), read with h5py;
  only "Gene Expression" features are kept and gene symbols become ``var_names``. 10x files do
  contain duplicate symbols (e.g. several Ensembl ids per symbol): this reader is the one place
  in histomap where duplicates are renamed (as ``var_names_make_unique``: ``TBCE``, ``TBCE-1``)
  instead of rejected, and it logs how many were renamed; ``var["gene_ids"]`` keeps the ids;
* ``spatial/tissue_positions.parquet``, ``spatial/tissue_positions.csv`` (header, Space Ranger
  >= 2.0) or ``spatial/tissue_positions_list.csv`` (no header, 1.x), columns barcode,
  in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres;
* ``spatial/scalefactors_json.json`` (``spot_diameter_fullres``) to infer mpp when not given.

The full-resolution H&E is given as ``image``. Many published datasets ship only ``spatial/``
with the hires/lowres PNGs: with ``image="hires"`` (or ``"lowres"``) in the sample sheet, an
explicit opt-in, the PNG is the slide. Its mpp is the full-resolution mpp (the sheet's ``mpp``,
else 55 um / ``spot_diameter_fullres``) divided by ``tissue_hires_scalef`` (or
``tissue_lowres_scalef``), the spot centres are scaled by the same factor, and the log and
``uns["histomap"]["note"]`` say that the image is a downsampled one. Without the opt-in a missing
full-resolution image is an error: the PNGs silently change the pixel scale.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.checked_io import REMEDY_USER, check_hdf5, read_parquet_checked
from histomap.data.io import read_json_object
from histomap.data.io._checks import (
    check_count_values,
    check_positive,
    check_unique,
    check_within_image,
    examples,
    to_csr_counts,
)
from histomap.data.sample import UNS_KEY, Sample, annotate_spots, dropped_entry
from histomap.errors import InputError

log = logging.getLogger(__name__)

PLATFORM = "visium"
SPOT_DIAMETER_UM = 55.0
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv",
                  "tissue_positions_list.csv")
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                    "pxl_col_in_fullres"]
GENE_EXPRESSION = "Gene Expression"
# sheet `image` keyword -> (PNG in spatial/, its scale factor key in scalefactors_json.json)
DOWNSAMPLED_IMAGES = {"hires": ("tissue_hires_image.png", "tissue_hires_scalef"),
                      "lowres": ("tissue_lowres_image.png", "tissue_lowres_scalef")}


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None) -> Sample:
    """Read a Space Ranger ``outs/`` folder (or its parent) into a :class:`Sample`.

    ``image`` is the full-resolution H&E (required), or ``"hires"``/``"lowres"`` for the PNG of
    ``spatial/`` (see the module docstring); ``mpp`` the full-resolution image's micrometres per
    pixel (``None``: 55 um / ``spot_diameter_fullres``); ``spot_diameter_um`` defaults to 55 um.
    """
    outs = find_outs(Path(path))
    if image is None:
        raise InputError(outs, "Visium needs the full-resolution H&E image: set `image` in the "
                               "sample sheet, or `image: hires` (or lowres) to use the "
                               "downsampled PNG of spatial/ explicitly")
    scalefactors = outs / "spatial" / "scalefactors_json.json"
    downsampled = str(image) in DOWNSAMPLED_IMAGES
    image_path = (outs / "spatial" / DOWNSAMPLED_IMAGES[str(image)][0] if downsampled
                  else Path(image))
    spot_diameter_um = check_positive(spot_diameter_um, "spot_diameter_um", outs,
                                      default=SPOT_DIAMETER_UM)
    if mpp is None:
        mpp = infer_mpp(scalefactors, sample)
    mpp = check_positive(mpp, "mpp", outs)
    check_mpp_against_scalefactors(scalefactors, mpp, sample)
    scale, note = 1.0, None
    if downsampled:
        scale = read_scale_factor(scalefactors, DOWNSAMPLED_IMAGES[str(image)][1])
        mpp = mpp / scale
        note = (f"downsampled image: {image_path.name} is the full-resolution H&E scaled by "
                f"{scale:g} ({mpp:.3f} um/px); no full-resolution image was given")
        log.warning("%s: %s", sample, note)

    counts = read_10x_h5(outs / MATRIX_FILE)
    positions_path = find_positions_file(outs)
    positions = read_positions(positions_path)
    counts, positions, dropped = match_barcodes(counts, positions, outs / MATRIX_FILE,
                                                positions_path)

    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    xy = xy * scale
    check_within_image(image_path, xy, counts.obs_names)
    counts.obs["array_row"] = positions["array_row"].to_numpy()
    counts.obs["array_col"] = positions["array_col"].to_numpy()
    counts.obsm["spatial"] = xy
    annotate_spots(counts, sample=sample, platform=PLATFORM, mpp=mpp,
                   spot_diameter_um=spot_diameter_um, image=image_path, note=note)
    counts.uns[UNS_KEY]["dropped"] = dropped
    log.info("%s: %d spots x %d genes, mpp %.4f um/px, spot diameter %g um, image %s",
             sample, counts.n_obs, counts.n_vars, mpp, spot_diameter_um, image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=float(mpp),
                  spots=counts)


def find_outs(path: Path) -> Path:
    """The folder holding the matrix: ``path`` itself or ``path/outs``."""
    if (path / MATRIX_FILE).is_file():
        return path
    if (path / "outs" / MATRIX_FILE).is_file():
        return path / "outs"
    if not path.is_dir():
        raise InputError(path, "Space Ranger outs folder does not exist")
    raise InputError(path / MATRIX_FILE, "Space Ranger filtered matrix not found")


# --- matrix --------------------------------------------------------------------------------------

def read_10x_h5(path: Path) -> ad.AnnData:
    """10x HDF5 matrix as AnnData (barcodes x gene-expression features, raw counts CSR)."""
    check_hdf5(path, what="10x HDF5 matrix", remedy=REMEDY_USER)
    try:
        with h5py.File(path, "r") as h5:
            if "matrix" in h5:  # Cell Ranger / Space Ranger >= 3 layout
                group = h5["matrix"]
                features = group["features"]
                names = _strings(features["name"])
                ids = _strings(features["id"])
                types = (_strings(features["feature_type"]) if "feature_type" in features
                         else np.full(len(names), GENE_EXPRESSION))
            else:  # legacy layout: one group per genome with genes / gene_names
                keys = list(h5.keys())
                if len(keys) != 1:
                    raise InputError(path, f"not a 10x matrix: expected group 'matrix', found "
                                           f"{keys}")
                group = h5[keys[0]]
                names, ids = _strings(group["gene_names"]), _strings(group["genes"])
                types = np.full(len(names), GENE_EXPRESSION)
            barcodes = _strings(group["barcodes"])
            data, indices = group["data"][:], group["indices"][:]
            indptr, shape = group["indptr"][:], tuple(int(v) for v in group["shape"][:])
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"cannot read 10x HDF5 matrix: corrupt, truncated or not from "
                               f"Space Ranger ({exc}); {REMEDY_USER}") from exc
    n_features, n_barcodes = shape
    if len(barcodes) != n_barcodes or len(names) != n_features or len(indptr) != n_barcodes + 1:
        raise InputError(path, f"inconsistent 10x matrix: shape {shape}, {len(barcodes)} "
                               f"barcodes, {len(names)} features, {len(indptr)} indptr entries")
    check_count_values(data, path)
    # CSC (features x barcodes) has exactly the arrays of CSR (barcodes x features)
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    check_unique(pd.Index(barcodes), path, "barcodes")

    keep = types == GENE_EXPRESSION
    if not keep.all():
        dropped = pd.Series(types[~keep]).value_counts()
        log.info("%s: dropped %d non gene-expression features (%s)", path.name, int((~keep).sum()),
                 ", ".join(f"{k}: {v}" for k, v in dropped.items()))
        matrix = matrix[:, np.flatnonzero(keep)]
    symbols = pd.Index(names[keep])
    duplicated = symbols.duplicated()
    if duplicated.any():  # same renaming as AnnData.var_names_make_unique: GA, GA-1, ...
        symbols = ad.utils.make_index_unique(symbols)
        log.warning("%s: %d duplicate gene symbols renamed to be unique (e.g. %s)", path.name,
                    int(duplicated.sum()), examples(symbols[duplicated], 3))
    return ad.AnnData(X=to_csr_counts(matrix), obs=pd.DataFrame(index=pd.Index(barcodes)),
                      var=pd.DataFrame({"gene_ids": ids[keep]}, index=symbols))


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    """Byte-string HDF5 dataset as a numpy array of str."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in dataset[:]],
                    dtype=object)


# --- positions -----------------------------------------------------------------------------------

def find_positions_file(outs: Path) -> Path:
    """The first existing tissue positions file under ``outs/spatial``."""
    for name in POSITION_FILES:
        candidate = outs / "spatial" / name
        if candidate.is_file():
            return candidate
    raise InputError(outs / "spatial", f"no tissue positions file ({', '.join(POSITION_FILES)})")


def read_positions(path: Path) -> pd.DataFrame:
    """Tissue positions indexed by barcode with the six Space Ranger columns."""
    try:
        if path.suffix == ".parquet":
            positions = read_parquet_checked(path, what="tissue positions table",
                                             remedy=REMEDY_USER)
        else:
            with open(path) as fh:
                first = fh.readline()
            has_header = first.split(",")[0].strip().strip('"') == "barcode"
            positions = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                if positions.shape[1] != len(POSITION_COLUMNS):
                    raise InputError(path, f"expected {len(POSITION_COLUMNS)} columns "
                                           f"({', '.join(POSITION_COLUMNS)}), found "
                                           f"{positions.shape[1]}")
                positions.columns = POSITION_COLUMNS
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, ImportError) as exc:
        raise InputError(path, f"cannot read tissue positions: {exc}") from exc
    missing = [c for c in POSITION_COLUMNS if c not in positions.columns]
    if missing:
        raise InputError(path, f"tissue positions lack column(s) {', '.join(missing)}")
    positions = positions[POSITION_COLUMNS].copy()
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(positions[column], errors="coerce")
        if values.isna().any():
            raise InputError(path, f"column {column} has a missing or non-numeric value")
        positions[column] = values
    positions.index = pd.Index(positions.pop("barcode").astype(str))
    check_unique(positions.index, path, "barcodes")
    return positions


def match_barcodes(counts: ad.AnnData, positions: pd.DataFrame, matrix_path: Path,
                   positions_path: Path) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """In-tissue spots present in the matrix, in matrix order; log every kind of drop and
    return the unintended ones ({what: :func:`histomap.data.sample.dropped_entry`}; barcodes
    off tissue are left out on purpose and not counted)."""
    in_tissue = positions["in_tissue"] == 1
    known = counts.obs_names.isin(positions.index)
    dropped = {}
    if (~known).any():
        log.warning("%s: %d barcodes have no row in %s and are dropped: %s", matrix_path.name,
                    int((~known).sum()), positions_path.name,
                    examples(counts.obs_names[~known]))
        dropped[f"matrix barcodes without a position in {positions_path.name}"] = dropped_entry(
            positions_path, int((~known).sum()), counts.n_obs, counts.obs_names[~known])
    tissue_barcodes = positions.index[in_tissue]
    keep = counts.obs_names.isin(tissue_barcodes)
    off_tissue = known & ~keep
    if off_tissue.any():
        log.warning("%s: %d barcodes are not under tissue (in_tissue = 0) and are dropped",
                    matrix_path.name, int(off_tissue.sum()))
    if not keep.any():
        raise InputError(matrix_path, f"no barcode matches an in-tissue spot of "
                                      f"{positions_path.name} (matrix barcodes look like "
                                      f"{list(counts.obs_names[:3])})")
    missing = ~tissue_barcodes.isin(counts.obs_names)
    if missing.any():
        log.warning("%s: %d in-tissue spots have no column in %s and are dropped: %s",
                    positions_path.name, int(missing.sum()), matrix_path.name,
                    examples(tissue_barcodes[missing]))
        dropped[f"in-tissue spots of {positions_path.name} without counts in "
                f"{matrix_path.name}"] = dropped_entry(matrix_path, int(missing.sum()),
                                                       len(tissue_barcodes),
                                                       tissue_barcodes[missing])
    counts = counts[keep].copy()
    return counts, positions.loc[counts.obs_names], dropped


# --- scale ---------------------------------------------------------------------------------------

def read_spot_diameter_fullres(path: Path) -> float | None:
    """``spot_diameter_fullres`` (px) from the scale-factors JSON, ``None`` if absent."""
    if not path.is_file():
        return None
    try:
        factors = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read scale factors: {exc}") from exc
    value = factors.get("spot_diameter_fullres") if isinstance(factors, dict) else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def read_scale_factor(path: Path, key: str) -> float:
    """A positive scale factor (``tissue_hires_scalef``, ...) of the scale-factors JSON."""
    factors = read_json_object(path, "scale factors",
                               missing=f"scale factors file not found (needed for {key})")
    value = factors.get(key)
    if value is None:
        raise InputError(path, f"no {key}: the downsampled image cannot be placed")
    return check_positive(value, key, path)


def infer_mpp(scalefactors: Path, sample: str = "") -> float:
    """mpp = 55 um / ``spot_diameter_fullres``; InputError "missing mpp" when unavailable."""
    diameter_px = read_spot_diameter_fullres(scalefactors)
    if diameter_px is None:
        raise InputError(scalefactors, "missing mpp: no usable spot_diameter_fullres to infer "
                                       "the pixel size from; set `mpp` in the sample sheet")
    mpp = SPOT_DIAMETER_UM / diameter_px
    log.info("%s: inferred mpp %.4f um/px from spot_diameter_fullres %.2f px (55 um spots)",
             sample, mpp, diameter_px)
    return mpp


def check_mpp_against_scalefactors(scalefactors: Path, mpp: float, sample: str = "") -> None:
    """Warn when a given mpp disagrees (> 10 %) with the one implied by the scale factors."""
    diameter_px = read_spot_diameter_fullres(scalefactors)
    if diameter_px is None:
        return
    implied = SPOT_DIAMETER_UM / diameter_px
    if abs(implied - mpp) > 0.1 * implied:
        log.warning("%s: mpp %.4f differs from %.4f implied by spot_diameter_fullres in %s; "
                    "check the sample sheet", sample, mpp, implied, scalefactors)
