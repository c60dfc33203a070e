"""Reader for the ``synthetic`` platform: a folder written by
:func:`histomap.data.synthetic.simulate_sample` (he.tif, cells.h5ad, spots.h5ad, meta.json)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from histomap.checked_io import read_h5ad_checked
from histomap.data.sample import Sample, annotate_spots
from histomap.errors import InputError

PLATFORM = "synthetic"
FILES = ("meta.json", "spots.h5ad", "cells.h5ad", "he.tif")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read synthetic sample metadata: {exc}") from exc
    for key in ("mpp", "spot_diameter_um"):
        if not isinstance(meta.get(key), (int, float)) or meta[key] <= 0:
            raise InputError(path, f"missing or non-positive {key!r}")
    return meta


def _checked(value: float | None, recorded: float, name: str, where: Path) -> float:
    """The recorded value, or the user's when it agrees (a disagreement is an error)."""
    if value is not None and not math.isclose(float(value), recorded, rel_tol=1e-6):
        raise InputError(where, f"sample sheet gives {name}={value} but this synthetic sample "
                                f"was generated with {name}={recorded}")
    return float(recorded)


def _read_h5ad(path: Path, what: str) -> ad.AnnData:
    adata = read_h5ad_checked(path, what=f"synthetic {what} table",
                              remedy="delete the synthetic sample's folder and rerun")
    xy = adata.obsm.get("spatial")
    if xy is None or np.asarray(xy).shape != (adata.n_obs, 2):
        raise InputError(path, f"{what} lack obsm['spatial'] (n, 2) pixel coordinates")
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    adata.X = adata.X.tocsr()
    return adata


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None) -> Sample:
    """Read a synthetic sample folder; ``mpp`` and ``spot_diameter_um`` default to the values it
    was generated with (giving different ones is an error); ``image`` replaces ``he.tif``."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "synthetic sample folder does not exist")
    for name in FILES:
        if name == "he.tif" and image is not None:
            continue
        if not (folder / name).is_file():
            raise InputError(folder / name, "missing file of the synthetic sample")
    meta = _read_meta(folder / "meta.json")
    mpp = _checked(mpp, float(meta["mpp"]), "mpp", folder / "meta.json")
    diameter = _checked(spot_diameter_um, float(meta["spot_diameter_um"]), "spot_diameter_um",
                        folder / "meta.json")
    image_path = Path(image) if image is not None else folder / "he.tif"
    if not image_path.is_file():
        raise InputError(image_path, "image file does not exist")

    spots = _read_h5ad(folder / "spots.h5ad", "spots")
    cells = _read_h5ad(folder / "cells.h5ad", "cells")
    if list(spots.var_names) != list(cells.var_names):
        raise InputError(folder / "spots.h5ad", "genes differ from cells.h5ad")
    spots.obs["diameter_um"] = diameter
    annotate_spots(spots, sample=sample, platform=PLATFORM, mpp=mpp, spot_diameter_um=diameter,
                   image=image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=mpp, spots=spots,
                  highres=cells)
