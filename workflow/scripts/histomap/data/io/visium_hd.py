"""Reader for 10x Visium HD: Space Ranger's square bins plus the full-resolution H&E
(raw sample -> ingest, in the DESIGN.md picture).

A Space Ranger HD ``outs/`` folder (``path``: ``outs/``, its parent, or ``binned_outputs/``) holds
``binned_outputs/square_{002,008,016}um/`` (and any custom size ``square_NNNum``), each with
* ``filtered_feature_bc_matrix.h5``: the 10x HDF5 matrix of the bins under tissue (read as for
  Visium, :func:`histomap.data.io.visium.read_10x_h5`);
* ``spatial/tissue_positions.parquet``: barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres (bin centre in full-resolution H&E pixels);
* ``spatial/scalefactors_json.json`` with ``microns_per_pixel`` (um per full-resolution pixel)
  and ``bin_size_um``.
The full-resolution H&E (the microscope image given to Space Ranger) is the sheet's ``image``.

Geometry. Bins are axis-aligned squares: ``obs["shape"] = "square"``, ``obs["diameter_um"]`` =
the side. The sheet's ``spot_diameter_um`` (default 16) chooses the training spots:
* ``spot_shape="square"`` (default): the bins of that size (its folder must exist);
* ``spot_shape="disc"``: Visium-like pseudo-spots of that diameter on a hexagonal lattice
  (``spot_pitch_um``, default 100/55 x the diameter as on Visium), each the sum of the finest bins
  whose centre lies in the disc.
``highres``: every bin size present (obs ``bin_size_um``), so every finer size is cross-scale
ground truth as measured (:mod:`histomap.evaluation.scales`), and the finest bins are the points
other sizes are re-measured from.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomap.data.io import read_json_object
from histomap.data.io._checks import check_positive, check_within_image, examples
from histomap.data.io.visium import read_10x_h5, read_positions
from histomap.data.sample import Sample, annotate_spots
from histomap.errors import InputError

log = logging.getLogger(__name__)

PLATFORM = "visium_hd"
DEFAULT_BIN_UM = 16.0
BINNED_OUTPUTS = "binned_outputs"
BIN_PREFIX = "square_"
BIN_FOLDER = re.compile(r"^square_(\d{3})um$")
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITIONS_FILE = "tissue_positions.parquet"
SCALEFACTORS_FILE = "scalefactors_json.json"
VISIUM_PITCH_PER_DIAMETER = 100.0 / 55.0


def bin_folder_name(bin_um: float) -> str:
    """Space Ranger's folder name of a bin size: 8 -> ``square_008um``."""
    return f"{BIN_PREFIX}{round(bin_um):03d}um"


def find_binned_outputs(path: Path) -> Path:
    """The ``binned_outputs`` folder of ``path`` (itself, ``path/binned_outputs`` or
    ``path/outs/binned_outputs``)."""
    for candidate in (path, path / BINNED_OUTPUTS, path / "outs" / BINNED_OUTPUTS):
        if candidate.name == BINNED_OUTPUTS and candidate.is_dir():
            return candidate
    if not path.exists():
        raise InputError(path, "Space Ranger HD outs folder does not exist")
    raise InputError(path / BINNED_OUTPUTS, "Space Ranger HD binned_outputs folder not found "
                                            "(expected binned_outputs/square_016um/ ...)")


def bin_sizes(binned: Path) -> dict[float, Path]:
    """{bin size um: folder} of every ``square_NNNum`` folder, finest first."""
    found = {float(m.group(1)): p for p in binned.iterdir()
             if p.is_dir() and (m := BIN_FOLDER.match(p.name))}
    if not found:
        raise InputError(binned, "no bin size folder (square_002um, square_008um, square_016um)")
    return dict(sorted(found.items()))


def read_scalefactors(path: Path, bin_um: float) -> dict:
    """The scale factors of one bin folder; ``bin_size_um`` (when given) must match the folder."""
    factors = read_json_object(path, "scale factors")
    if factors.get("bin_size_um") is not None:
        recorded = check_positive(factors["bin_size_um"], "bin_size_um", path)
        if not math.isclose(recorded, bin_um, rel_tol=1e-6):
            raise InputError(path, f"bin_size_um {recorded:g} does not match its folder "
                                   f"{bin_folder_name(bin_um)}")
    return factors


def resolve_mpp(mpp: float | None, scalefactors: Path, factors: dict, sample: str) -> float:
    """The sheet's mpp (warning when ``microns_per_pixel`` disagrees), else
    ``microns_per_pixel``, else InputError naming the scale factors file."""
    found = factors.get("microns_per_pixel")
    if found is not None:
        found = check_positive(found, "microns_per_pixel", scalefactors)
    if mpp is not None:
        mpp = check_positive(mpp, "mpp", scalefactors)
        if found is not None and not math.isclose(found, mpp, rel_tol=1e-3):
            log.warning("%s: sheet mpp %g differs from microns_per_pixel %g in %s; using %g",
                        sample, mpp, found, scalefactors, mpp)
        return mpp
    if found is None:
        raise InputError(scalefactors, "missing mpp: microns_per_pixel is absent; set `mpp` "
                                       "(um per pixel of the full-resolution H&E) in the "
                                       "sample sheet")
    log.info("%s: mpp %.4f um/px from microns_per_pixel in %s", sample, found, scalefactors)
    return float(found)


def read_bins(folder: Path, bin_um: float) -> ad.AnnData:
    """One bin size: counts of the in-tissue bins with their centres (full-res px)."""
    matrix_path = folder / MATRIX_FILE
    positions_path = folder / "spatial" / POSITIONS_FILE
    for required in (matrix_path, positions_path):
        if not required.is_file():
            raise InputError(required, f"missing file of the {bin_um:g} um bins")
    counts = read_10x_h5(matrix_path)
    positions = read_positions(positions_path)
    unknown = ~counts.obs_names.isin(positions.index)
    if unknown.any():
        raise InputError(positions_path, f"positions do not match the matrix barcodes: "
                                         f"{int(unknown.sum())} of {counts.n_obs} barcodes of "
                                         f"{matrix_path.name} have no row here (e.g. "
                                         f"{examples(counts.obs_names[unknown], 3)})")
    positions = positions.loc[counts.obs_names]
    in_tissue = positions["in_tissue"].to_numpy() == 1
    if not in_tissue.all():
        log.warning("%s: %d bins are not under tissue (in_tissue = 0) and are dropped",
                    matrix_path, int((~in_tissue).sum()))
        counts, positions = counts[in_tissue].copy(), positions[in_tissue]
    if counts.n_obs == 0:
        raise InputError(positions_path, "no bin under tissue")
    counts.obs["array_row"] = positions["array_row"].to_numpy(np.int64)
    counts.obs["array_col"] = positions["array_col"].to_numpy(np.int64)
    counts.obs["bin_size_um"] = float(bin_um)
    counts.obs["diameter_um"] = float(bin_um)
    counts.obs["shape"] = "square"
    counts.obsm["spatial"] = positions[["pxl_col_in_fullres",
                                        "pxl_row_in_fullres"]].to_numpy(np.float64)
    return counts


def pseudo_spots(bins: ad.AnnData, mpp: float, image_size: tuple[int, int], diameter_um: float,
                 pitch_um: float, image_path: Path) -> ad.AnnData:
    """Discs of ``diameter_um`` on a hex lattice (every disc on the image) summing the bins
    whose centre lies inside; spots holding no bin are dropped (logged)."""
    from histomap.data.io.xenium import hex_grid
    from histomap.data.aggregate import disc_membership

    width, height = image_size
    radius = diameter_um / 2 / mpp
    centres, rows, cols = hex_grid(width, height, pitch_um / mpp, radius)
    if not len(centres):
        raise InputError(image_path, f"the image ({width * mpp:.0f} x {height * mpp:.0f} um) is "
                                     f"smaller than one {diameter_um:g} um pseudo-spot")
    member = disc_membership(np.asarray(bins.obsm["spatial"]), centres, radius)
    n_bins = np.asarray(member.sum(axis=1)).ravel()
    keep = n_bins > 0
    if not keep.all():
        log.info("pseudo-spots: %d of %d lattice spots cover no bin; dropped",
                 int((~keep).sum()), len(keep))
    member = member[np.flatnonzero(keep)]
    X = (member.astype(bins.X.dtype) @ sp.csr_matrix(bins.X)).tocsr()
    obs = pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep],
                        "n_bins": n_bins[keep].astype(np.int64),
                        "diameter_um": float(diameter_um)},
                       index=pd.Index([f"spot_{r}x{c}" for r, c in zip(rows[keep], cols[keep])]))
    spots = ad.AnnData(X=X, obs=obs, var=bins.var.copy())
    spots.obsm["spatial"] = centres[keep].astype(np.float64)
    spots.uns["pseudo_spots"] = {"pitch_um": float(pitch_um), "lattice": "hex",
                                 "from_bin_um": float(bins.obs["bin_size_um"].iloc[0])}
    return spots


def read(sample: str, path: str | Path, *, mpp: float | None = None,
         spot_diameter_um: float | None = None, image: str | Path | None = None,
         spot_shape: str = "square", spot_pitch_um: float | None = None) -> Sample:
    """Read a Space Ranger HD output into a :class:`Sample` (see the module docstring)."""
    binned = find_binned_outputs(Path(path))
    sizes = bin_sizes(binned)
    if image is None:
        raise InputError(binned.parent, "Visium HD needs the full-resolution H&E image: set "
                                        "`image` in the sample sheet")
    image_path = Path(image)
    diameter = check_positive(spot_diameter_um, "spot_diameter_um", binned,
                              default=DEFAULT_BIN_UM)
    if spot_shape not in ("square", "disc"):
        raise InputError(binned, f"spot_shape must be 'square' (bins) or 'disc' (pseudo-spots), "
                                 f"got {spot_shape!r}")
    if spot_shape == "square" and not any(math.isclose(diameter, s) for s in sizes):
        raise InputError(binned / bin_folder_name(diameter),
                         f"bin size folder missing: training on {diameter:g} um bins needs it "
                         f"(found {', '.join(p.name for p in sizes.values())})")
    reference_um = min(sizes, key=lambda s: abs(s - diameter))  # the training bins' folder
    scalefactors = sizes[reference_um] / "spatial" / SCALEFACTORS_FILE
    mpp = resolve_mpp(mpp, scalefactors, read_scalefactors(scalefactors, reference_um), sample)

    tables = {}
    for bin_um, folder in sizes.items():
        read_scalefactors(folder / "spatial" / SCALEFACTORS_FILE, bin_um)
        tables[bin_um] = read_bins(folder, bin_um)
        first = tables[next(iter(tables))]
        if list(tables[bin_um].var_names) != list(first.var_names):
            raise InputError(folder / MATRIX_FILE, f"genes differ from those of the "
                                                   f"{next(iter(tables)):g} um bins")
        check_within_image(image_path, tables[bin_um].obsm["spatial"],
                           tables[bin_um].obs_names)

    if spot_shape == "square":
        spots = tables[next(s for s in sizes if math.isclose(s, diameter))].copy()
    else:
        pitch = check_positive(spot_pitch_um, "spot_pitch_um", binned,
                               default=diameter * VISIUM_PITCH_PER_DIAMETER)
        from histomap.data.io._checks import image_size

        spots = pseudo_spots(tables[min(tables)], mpp, image_size(image_path), diameter, pitch,
                             image_path)
    annotate_spots(spots, sample=sample, platform=PLATFORM, mpp=mpp, spot_diameter_um=diameter,
                   image=image_path, spot_shape=spot_shape)
    highres = ad.concat(list(tables.values()), join="outer", merge="same")
    highres.obs["shape"] = highres.obs["shape"].astype(str)
    highres.uns["visium_hd"] = {"binned_outputs": str(binned),
                                "bin_sizes_um": [float(s) for s in sizes]}
    log.info("%s: %d %s of %g um x %d genes for training; bins %s; mpp %.4f um/px, image %s",
             sample, spots.n_obs, "bins" if spot_shape == "square" else "pseudo-spots", diameter,
             spots.n_vars, ", ".join(f"{s:g} um: {t.n_obs}" for s, t in tables.items()), mpp,
             image_path)
    return Sample(name=sample, platform=PLATFORM, image_path=image_path, mpp=float(mpp),
                  spots=spots, highres=highres)
