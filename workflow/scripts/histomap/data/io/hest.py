"""Reader for one HEST-1k sample (raw sample -> ingest, in the DESIGN.md picture).

HEST-1k (mahmoodlab/HEST) distributes every sample, whatever its technology (Visium, legacy ST,
Visium HD, Xenium as pseudo-Visium spots), in one layout under a root folder (``path``):
* ``st/{id}.h5ad``: spots x genes, raw counts in ``X``; spot centres in full-resolution pixels
  of the WSI in ``obs["pxl_col_in_fullres"]``, ``obs["pxl_row_in_fullres"]`` (else
  ``obsm["spatial"]`` = (x, y)); ``obs["in_tissue"]`` where present;
* ``wsis/{id}.tif``: the pyramidal H&E (the sheet's ``image`` overrides it);
* ``metadata/{id}.json``: ``pixel_size_um_estimated`` (um per WSI pixel, estimated by HEST from
  the spot grid; preferred) or ``pixel_size_um_embedded`` (the WSI's own), ``spot_diameter`` and
  ``inter_spot_dist`` (um), ``st_technology``.
* Xenium samples only, optionally: ``transcripts/{id}_transcripts.parquet``, the transcripts with
  HEST's H&E pixel positions ``he_x``, ``he_y`` (and 10x's ``feature_name``, ``qv``). When
  present they are filtered as Xenium's (qv >= 20, control probes dropped) and summed into 2 um
  bins as ``highres``, so the sample has cross-scale ground truth.
``{id}`` is the sheet's ``hest_id`` column, else the sample name. The sheet's ``mpp`` and
``spot_diameter_um`` override the metadata (a disagreement is logged).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.checked_io import (REMEDY_USER, check_parquet, read_h5ad_checked,
                                 read_parquet_checked)
from histomap.data.io import read_json_object
from histomap.data.io._checks import (
    check_count_values,
    check_positive,
    check_within_image,
    examples,
    to_csr_counts,
)
from histomap.data.sample import Sample, annotate_spots
from histomap.errors import InputError

log = logging.getLogger(__name__)

PLATFORM = "hest"
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
POSITION_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")
TRANSCRIPT_COLUMNS = ("feature_name", "he_x", "he_y")
HIGHRES_BIN_UM = 2.0


def sample_files(root: Path, hest_id: str) -> dict[str, Path]:
    """The three files of a HEST sample under ``root``."""
    return {"st": root / "st" / f"{hest_id}.h5ad", "wsi": root / "wsis" / f"{hest_id}.tif",
            "metadata": root / "metadata" / f"{hest_id}.json"}


def transcripts_file(root: str | Path, hest_id: str) -> Path:
    return Path(root) / "transcripts" / f"{hest_id}_transcripts.parquet"


def has_transcripts(root: str | Path, hest_id: str) -> bool:
    """Whether a (Xenium) HEST sample ships its transcripts: ground truth at other scales."""
    return transcripts_file(root, hest_id).is_file()


def read_transcript_bins(path: Path, mpp: float, image_path: Path) -> ad.AnnData:
    """HEST's H&E-aligned transcripts summed into 2 um bins (see the module docstring)."""
    import pyarrow.parquet as pq

    from histomap.data.io import xenium
    from histomap.data.io._checks import image_size

    check_parquet(path, what="HEST transcripts table", remedy=REMEDY_USER)
    try:
        columns = list(pq.ParquetFile(path).schema_arrow.names)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read transcripts: corrupt ({exc}); {REMEDY_USER}"
                         ) from exc
    missing = [c for c in TRANSCRIPT_COLUMNS if c not in columns]
    if missing:
        raise InputError(path, f"transcripts lack column(s) {', '.join(missing)} (HEST "
                               "writes the H&E pixel position as he_x, he_y)")
    use = [*TRANSCRIPT_COLUMNS, *(c for c in ("qv", "is_gene") if c in columns)]
    table = read_parquet_checked(path, columns=use, what="HEST transcripts table",
                                 remedy=REMEDY_USER)
    names = table["feature_name"]
    if len(names) and isinstance(names.iloc[0], bytes):
        table["feature_name"] = names.map(lambda v: v.decode() if isinstance(v, bytes) else v)
    table["feature_name"] = table["feature_name"].astype(str)
    table, genes, dropped = xenium.filter_transcripts(table, path, xenium.MIN_QV)
    xy_px = table[["he_x", "he_y"]].to_numpy(np.float64)
    if not np.isfinite(xy_px).all():
        raise InputError(path, "he_x/he_y have missing or non-finite values")
    width, height = image_size(image_path)
    keep = xenium.on_image(xy_px, width, height, path, image_path)
    gene_code = table["feature_name"].cat.codes.to_numpy(np.int64)[keep]
    bins = xenium.bin_transcripts(xy_px[keep], gene_code, genes, HIGHRES_BIN_UM, mpp,
                                  (height, width))
    bins.uns["hest_transcripts"] = {"path": str(path), "dropped": dict(dropped),
                                    "n_transcripts_kept": int(keep.sum())}
    return bins


def read_metadata(path: Path) -> dict:
    return read_json_object(path, "HEST metadata")


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def metadata_spot_diameter(root: str | Path, hest_id: str) -> float | None:
    """``spot_diameter`` (um) of a sample's metadata, or None (for the sample sheet's default)."""
    path = sample_files(Path(root), hest_id)["metadata"]
    try:
        return _positive(json.loads(path.read_text()).get("spot_diameter"))
    except (OSError, ValueError, AttributeError):
        return None


def resolve_mpp(mpp: float | None, meta: dict, path: Path, sample: str) -> float:
    found = next(((k, v) for k in PIXEL_SIZE_KEYS if (v := _positive(meta.get(k)))), None)
    if mpp is not None:
        mpp = check_positive(mpp, "mpp", path)
        if found and not math.isclose(found[1], mpp, rel_tol=1e-2):
            log.warning("%s: sheet mpp %g differs from %s %g in %s; using %g", sample, mpp,
                        found[0], found[1], path, mpp)
        return mpp
    if found is None:
        raise InputError(path, f"no pixel size: none of {', '.join(PIXEL_SIZE_KEYS)} is a "
                               "positive number; set `mpp` in the sample sheet")
    log.info("%s: mpp %.4f um/px from %s", sample, found[1], found[0])
    return found[1]


def read_st(path: Path) -> tuple[ad.AnnData, np.ndarray]:
    """Counts (CSR integers) and spot centres (level-0 px) of ``st/{id}.h5ad``."""
    if not path.is_file():
        raise InputError(path, "HEST expression file not found")
    adata = read_h5ad_checked(path, what="HEST expression file", remedy=REMEDY_USER)
    if all(c in adata.obs for c in POSITION_COLUMNS):
        xy = adata.obs[list(POSITION_COLUMNS)].to_numpy(dtype=np.float64)
    elif "spatial" in adata.obsm and np.asarray(adata.obsm["spatial"]).shape == (adata.n_obs, 2):
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    else:
        raise InputError(path, "no spot positions: neither obs pxl_col_in_fullres/"
                               "pxl_row_in_fullres nor obsm['spatial']")
    if not np.isfinite(xy).all():
        raise InputError(path, "spot positions have missing or non-finite values")
    X = adata.X
    values = X.data if sp.issparse(X) else np.asarray(X)
    check_count_values(np.asarray(values), path)
    counts = ad.AnnData(X=to_csr_counts(X), obs=pd.DataFrame(index=adata.obs_names.copy()),
                        var=pd.DataFrame(index=adata.var_names.astype(str)))
    for column in ("array_row", "array_col"):
        if column in adata.obs:
            counts.obs[column] = adata.obs[column].to_numpy()
    if "in_tissue" in adata.obs:
        in_tissue = adata.obs["in_tissue"].astype(int).to_numpy() == 1
        if not in_tissue.all():
            log.warning("%s: %d spots are not under tissue (in_tissue = 0) and are dropped",
                        path, int((~in_tissue).sum()))
            counts, xy = counts[in_tissue].copy(), xy[in_tissue]
    if counts.var_names.duplicated().any():
        duplicated = counts.var_names[counts.var_names.duplicated()]
        counts.var_names_make_unique()
        log.warning("%s: %d duplicate gene names renamed to be unique (e.g. %s)", path,
                    len(duplicated), examples(duplicated, 3))
    if counts.n_obs == 0:
        raise InputError(path, "no spot under tissue")
    return counts, xy


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None,
         hest_id: str | None = None) -> Sample:
    """Read HEST-1k sample ``hest_id`` (default: ``sample``) under the root ``path``."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(root, "HEST folder does not exist")
    hest_id = str(hest_id or sample)
    files = sample_files(root, hest_id)
    meta = read_metadata(files["metadata"])
    mpp = resolve_mpp(mpp, meta, files["metadata"], sample)
    recorded = _positive(meta.get("spot_diameter"))
    if spot_diameter_um is None and recorded is None:
        raise InputError(files["metadata"], "no spot_diameter; set `spot_diameter_um` in the "
                                            "sample sheet")
    diameter = check_positive(spot_diameter_um, "spot_diameter_um", files["metadata"],
                              default=recorded)
    if recorded and not math.isclose(recorded, diameter, rel_tol=1e-3):
        log.warning("%s: sheet spot_diameter_um %g differs from spot_diameter %g in %s",
                    sample, diameter, recorded, files["metadata"])
    image_path = Path(image) if image is not None else files["wsi"]
    counts, xy = read_st(files["st"])
    check_within_image(image_path, xy, counts.obs_names)
    counts.obsm["spatial"] = xy
    annotate_spots(counts, sample=sample, platform=PLATFORM, mpp=mpp, spot_diameter_um=diameter,
                   image=image_path)
    technology = str(meta.get("st_technology", "unknown"))
    counts.uns[PLATFORM] = {"id": hest_id, "st_technology": technology,
                            "metadata": str(files["metadata"])}
    highres = None
    if has_transcripts(root, hest_id):
        highres = read_transcript_bins(transcripts_file(root, hest_id), mpp, image_path)
        log.info("%s: %d transcript bins of %g um as high-resolution data", sample,
                 highres.n_obs, HIGHRES_BIN_UM)
    log.info("%s: HEST sample %s (%s): %d spots x %d genes, mpp %.4f um/px, spot diameter %g "
             "um, image %s", sample, hest_id, technology, counts.n_obs, counts.n_vars, mpp,
             diameter, image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=float(mpp),
                  spots=counts, highres=highres)
