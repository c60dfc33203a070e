"""Synthetic sections written in the layouts of real platforms (the ``raw sample`` box of the
DESIGN.md picture, made from simulated cells so that the ground truth is known).

One simulated section (:func:`histomap.data.synthetic.simulate`: H&E, cells with counts) is
written as
* ``visium_hd``: a Space Ranger HD ``outs/`` folder: ``binned_outputs/square_{002,008,016}um/``
  (``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet``,
  ``spatial/scalefactors_json.json``), ``feature_slice.h5`` (its layout metadata) and
  ``spatial/tissue_{hires,lowres}_image.png``, plus the full-resolution H&E ``he.tif`` beside
  ``outs/``. The 2 um bins sum the cells whose centre lies in them (a cell's counts sit at its
  centre); coarser bins are sums of 2 um bins, as in Space Ranger. A bin is under tissue when its
  16 um parent holds a cell.
* ``visium``: Visium as many datasets are published: ``outs/`` with the matrix and ``spatial/``
  (``tissue_positions.csv``, ``scalefactors_json.json``, ``tissue_{hires,lowres}_image.png``)
  and no full-resolution image; spots are the section's Visium-like spots (55 um).
* ``hest``: a HEST-1k sample: ``st/{id}.h5ad`` (the section's Visium-like spots, raw counts,
  positions in full-resolution pixels), ``wsis/{id}.tif``, ``metadata/{id}.json``; with
  ``technology="Xenium"`` also ``transcripts/{id}_transcripts.parquet`` (H&E pixels ``he_x``,
  ``he_y``), as HEST ships its Xenium samples.
* ``xenium``: a Xenium output folder: ``transcripts.parquet`` (each cell's counts as transcripts
  scattered around its centre, in Xenium micrometres), ``experiment.xenium``, the post-Xenium
  H&E ``{name}_he_image.ome.tif`` and 10x's alignment file ``{name}_he_imagealignment.csv``:
  the 3 x 3 affine taking H&E pixels to Xenium morphology pixels (``pixel_size`` um each),
  here a quarter turn, a scale and a shift, as Xenium Explorer exports it.

Command (a user can try the pipeline on a layout before their data arrive)::

    python -m histomap.data.write_layouts visium_hd data/synthetic_visium_hd --dataset-seed 0 \\
        --seeds 1 2 3 --size-um 300 300

writes ``data/synthetic_visium_hd/{S1,S2,S3}/`` (run with ``PYTHONPATH=workflow/scripts``).
**One biology per cohort**: ``--dataset-seed`` (required) draws the gene programmes and the
neighbourhood induction strengths shared by every section written
(:func:`histomap.data.synthetic_expression.dataset_biology`); each ``--seeds`` value is one
section (its layout, composition, staining, depth). The configs' sections use dataset seed 0,
the workflow's ``seed``.
Each folder is written under a temporary name and renamed at the end (no partial output).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from histomap.data.aggregate import aggregate_bins
from histomap.data.slide import write_pyramid
from histomap.data.synthetic import SyntheticData, simulate
from histomap.data.synthetic_config import SyntheticConfig
from histomap.outputs import atomic_output

LAYOUTS = ("visium_hd", "visium", "hest", "xenium")
HD_BIN_SIZES_UM = (2, 8, 16)
XENIUM_PIXEL_SIZE_UM = 0.2125
HIRES_SCALEF = 0.25
LOWRES_SCALEF = 0.05


# ----------------------------------------------------------------------------- 10x files

def write_10x_h5(path: Path, counts: sp.spmatrix, barcodes, genes, gene_ids=None) -> None:
    """A 10x HDF5 feature-barcode matrix (``matrix/`` group, CSC features x barcodes)."""
    csc = sp.csr_matrix(counts).astype(np.int32)  # CSR barcodes x genes = CSC genes x barcodes
    csc.sort_indices()
    genes = [str(g) for g in genes]
    gene_ids = list(gene_ids) if gene_ids is not None else [f"ENSG{i:011d}" for i in
                                                            range(len(genes))]
    with h5py.File(path, "w") as h5:
        group = h5.create_group("matrix")
        group.create_dataset("barcodes", data=np.array([str(b).encode() for b in barcodes]))
        group.create_dataset("data", data=csc.data)
        group.create_dataset("indices", data=csc.indices.astype(np.int64))
        group.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array([len(genes), csc.shape[0]], np.int32))
        features = group.create_group("features")
        features.create_dataset("id", data=np.array([g.encode() for g in gene_ids]))
        features.create_dataset("name", data=np.array([g.encode() for g in genes]))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        features.create_dataset("genome", data=np.array([b"GRCh38"] * len(genes)))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def _thumbnail(image: np.ndarray, scale: float) -> Image.Image:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Image.fromarray(image).resize(size, Image.BILINEAR)


# ----------------------------------------------------------------------------- Visium HD

def hd_barcode(bin_um: int, row: int, col: int) -> str:
    return f"s_{bin_um:03d}um_{row:05d}_{col:05d}-1"


def write_visium_hd(data: SyntheticData, out_dir: Path,
                    bin_sizes_um=HD_BIN_SIZES_UM) -> Path:
    """``out_dir/outs/`` (Space Ranger HD layout) and ``out_dir/he.tif``."""
    mpp = float(data.meta["mpp"])
    width, height = data.meta["size_px"]
    outs = out_dir / "outs"
    coarsest = max(bin_sizes_um)
    parent = aggregate_bins(data.cells, coarsest, mpp, shape=(
        int(height * mpp // coarsest), int(width * mpp // coarsest)), keep_empty=True)
    tissue_parent = np.asarray(parent.X.sum(axis=1)).ravel().reshape(
        parent.uns["bins"]["shape"]) > 0
    for bin_um in sorted(bin_sizes_um):
        n_rows, n_cols = int(height * mpp // bin_um), int(width * mpp // bin_um)
        bins = aggregate_bins(data.cells, bin_um, mpp, shape=(n_rows, n_cols), keep_empty=True)
        rows, cols = bins.obs["row"].to_numpy(), bins.obs["col"].to_numpy()
        ratio = coarsest // bin_um
        pr, pc = rows // ratio, cols // ratio
        inside_parent = (pr < tissue_parent.shape[0]) & (pc < tissue_parent.shape[1])
        in_tissue = np.zeros(len(rows), bool)
        in_tissue[inside_parent] = tissue_parent[pr[inside_parent], pc[inside_parent]]
        barcodes = [hd_barcode(bin_um, r, c) for r, c in zip(rows, cols)]
        folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
        (folder / "spatial").mkdir(parents=True)
        keep = np.flatnonzero(in_tissue)
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", bins.X[keep],
                     [barcodes[i] for i in keep], bins.var_names)
        xy = np.asarray(bins.obsm["spatial"])
        pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(np.int32),
                      "array_row": rows.astype(np.int32), "array_col": cols.astype(np.int32),
                      "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]}
                     ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "spot_diameter_fullres": bin_um / mpp, "bin_size_um": float(bin_um),
            "microns_per_pixel": mpp, "regist_target_img_scalef": HIRES_SCALEF,
            "tissue_lowres_scalef": LOWRES_SCALEF, "fiducial_diameter_fullres": 0.0,
            "tissue_hires_scalef": HIRES_SCALEF}, indent=2))
    (outs / "spatial").mkdir()
    _thumbnail(data.image, HIRES_SCALEF).save(outs / "spatial" / "tissue_hires_image.png")
    _thumbnail(data.image, LOWRES_SCALEF).save(outs / "spatial" / "tissue_lowres_image.png")
    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    with h5py.File(outs / "feature_slice.h5", "w") as h5:
        h5.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout),
                                                "synthetic": data.meta["seed"]})
    write_pyramid(data.image, out_dir / "he.tif", mpp)
    return out_dir


# ----------------------------------------------------------------------------- Visium

def write_visium_published(data: SyntheticData, out_dir: Path) -> Path:
    """``out_dir/outs/``: matrix and ``spatial/`` with the hires/lowres PNGs only."""
    mpp = float(data.meta["mpp"])
    spots = data.spots
    spatial = out_dir / "outs" / "spatial"
    spatial.mkdir(parents=True)
    rows = spots.obs["array_row"].to_numpy()
    cols = spots.obs["array_col"].to_numpy()
    barcodes = [f"SPOT{r:03d}X{c:03d}-1" for r, c in zip(rows, cols)]
    write_10x_h5(out_dir / "outs" / "filtered_feature_bc_matrix.h5", spots.X, barcodes,
                 spots.var_names)
    xy = np.asarray(spots.obsm["spatial"], np.float64)
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": rows, "array_col": cols,
                  "pxl_row_in_fullres": np.round(xy[:, 1]).astype(np.int64),
                  "pxl_col_in_fullres": np.round(xy[:, 0]).astype(np.int64)}
                 ).to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": float(data.meta["spot_diameter_um"]) / mpp,
        "tissue_hires_scalef": HIRES_SCALEF, "fiducial_diameter_fullres": 65.0 / mpp,
        "tissue_lowres_scalef": LOWRES_SCALEF}, indent=2))
    _thumbnail(data.image, HIRES_SCALEF).save(spatial / "tissue_hires_image.png")
    _thumbnail(data.image, LOWRES_SCALEF).save(spatial / "tissue_lowres_image.png")
    return out_dir


# ----------------------------------------------------------------------------- HEST

def write_hest(data: SyntheticData, out_dir: Path, sample_id: str,
               technology: str = "Visium") -> Path:
    """``st/{id}.h5ad``, ``wsis/{id}.tif``, ``metadata/{id}.json`` of HEST-1k (and
    ``transcripts/{id}_transcripts.parquet`` for ``technology="Xenium"``)."""
    mpp = float(data.meta["mpp"])
    spots = data.spots
    xy = np.asarray(spots.obsm["spatial"], np.float64)
    obs = pd.DataFrame({"in_tissue": 1, "pxl_col_in_fullres": xy[:, 0],
                        "pxl_row_in_fullres": xy[:, 1],
                        "array_row": spots.obs["array_row"].to_numpy(),
                        "array_col": spots.obs["array_col"].to_numpy()},
                       index=spots.obs_names.copy())
    st = ad.AnnData(X=sp.csr_matrix(spots.X).astype(np.float32), obs=obs,
                    var=pd.DataFrame(index=spots.var_names.copy()))
    st.obsm["spatial"] = xy
    for sub in ("st", "wsis", "metadata"):
        (out_dir / sub).mkdir(parents=True)
    st.write_h5ad(out_dir / "st" / f"{sample_id}.h5ad")
    write_pyramid(data.image, out_dir / "wsis" / f"{sample_id}.tif", mpp)
    width, height = data.meta["size_px"]
    (out_dir / "metadata" / f"{sample_id}.json").write_text(json.dumps({
        "id": sample_id, "st_technology": technology, "species": "Homo sapiens (synthetic)",
        "pixel_size_um_embedded": mpp, "pixel_size_um_estimated": mpp,
        "spot_diameter": float(data.meta["spot_diameter_um"]),
        "inter_spot_dist": float(data.meta["spot_spacing_um"]),
        "spots_under_tissue": int(spots.n_obs), "fullres_px_width": int(width),
        "fullres_px_height": int(height)}, indent=2))
    if technology == "Xenium":
        gene, xy = cell_transcripts(data, np.random.default_rng(int(data.meta["seed"]) + 7))
        (out_dir / "transcripts").mkdir()
        pd.DataFrame({"feature_name": np.asarray(data.cells.var_names)[gene],
                      "he_x": xy[:, 0], "he_y": xy[:, 1], "qv": np.full(len(gene), 40.0)}
                     ).to_parquet(out_dir / "transcripts" / f"{sample_id}_transcripts.parquet",
                                  index=False)
    return out_dir


# ----------------------------------------------------------------------------- Xenium

def xenium_alignment(he_mpp: float, he_size_px: tuple[int, int],
                     pixel_size: float = XENIUM_PIXEL_SIZE_UM,
                     shift_px: tuple[float, float] = (400.0, 300.0)) -> np.ndarray:
    """3 x 3 affine H&E pixel -> Xenium morphology pixel: a quarter turn (H&E x runs along
    Xenium -y), the pixel-size ratio and a shift keeping every Xenium coordinate positive."""
    s = he_mpp / pixel_size
    width = he_size_px[0]
    return np.array([[0.0, s, shift_px[0]],
                     [-s, 0.0, shift_px[1] + s * width],
                     [0.0, 0.0, 1.0]])


def cell_transcripts(data: SyntheticData, rng: np.random.Generator, spread_um: float = 2.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each count of each cell as a transcript near the cell centre: (gene index (n,), H&E
    pixel xy (n, 2)), kept on the image (a transcript scattered off it is moved back)."""
    counts = sp.coo_matrix(data.cells.X)
    reps = counts.data.astype(np.int64)
    gene = np.repeat(counts.col, reps)
    centre = np.asarray(data.cells.obsm["spatial"], np.float64)[np.repeat(counts.row, reps)]
    mpp = float(data.meta["mpp"])
    xy = centre + rng.normal(0.0, spread_um / mpp, size=centre.shape)
    width, height = data.meta["size_px"]
    xy[:, 0] = np.clip(xy[:, 0], 0.0, width - 1e-3)
    xy[:, 1] = np.clip(xy[:, 1], 0.0, height - 1e-3)
    return gene, xy


def write_xenium(data: SyntheticData, out_dir: Path, name: str) -> Path:
    """A Xenium output folder with the post-Xenium H&E and its alignment file."""
    mpp = float(data.meta["mpp"])
    width, height = data.meta["size_px"]
    rng = np.random.default_rng(int(data.meta["seed"]) + 7)
    gene, xy_he = cell_transcripts(data, rng)
    matrix = xenium_alignment(mpp, (width, height))
    xy_morph = xy_he @ matrix[:2, :2].T + matrix[:2, 2]
    xy_um = xy_morph * XENIUM_PIXEL_SIZE_UM
    genes = np.asarray(data.cells.var_names)
    n = len(gene)
    out_dir.mkdir(parents=True)
    pd.DataFrame({"transcript_id": np.arange(1, n + 1, dtype=np.uint64),
                  "cell_id": "UNASSIGNED", "overlaps_nucleus": np.zeros(n, np.uint8),
                  "feature_name": genes[gene], "x_location": xy_um[:, 0].astype(np.float32),
                  "y_location": xy_um[:, 1].astype(np.float32),
                  "z_location": np.full(n, 10.0, np.float32),
                  "qv": np.full(n, 40.0, np.float32)}
                 ).to_parquet(out_dir / "transcripts.parquet", index=False)
    (out_dir / "experiment.xenium").write_text(json.dumps({
        "major_version": 1, "minor_version": 0, "run_name": f"synthetic_{name}",
        "region_name": name, "pixel_size": XENIUM_PIXEL_SIZE_UM,
        "analysis_sw_version": "xenium-1.0.2", "panel_organism": "Human",
        "num_cells": 0}, indent=2))
    write_empty_cells_zarr(out_dir / "cells.zarr.zip")
    write_ome_rgb(data.image, out_dir / f"{name}_he_image.ome.tif", mpp)
    np.savetxt(out_dir / f"{name}_he_imagealignment.csv", matrix, delimiter=",", fmt="%.10g")
    return out_dir


def write_empty_cells_zarr(path: Path) -> None:
    """``cells.zarr.zip`` of a run without cell segmentation (an empty zarr group): the
    synthetic transcripts are not assigned to cells."""
    import zarr

    store = zarr.storage.ZipStore(path, mode="w")
    zarr.create_group(store=store, zarr_format=2, attributes={"synthetic": "no segmentation"})
    store.close()


def write_ome_rgb(image: np.ndarray, path: Path, mpp: float) -> None:
    """An RGB OME-TIFF (interleaved, tiled) with its PhysicalSizeX/Y."""
    import tifffile

    tifffile.imwrite(path, image, photometric="rgb", tile=(256, 256),
                     metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                               "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})


# ----------------------------------------------------------------------------- driver

def write_layout(layout: str, out_dir: str | Path, *, seed: int, dataset_seed: int,
                 name: str | None = None, technology: str = "Visium", **params) -> Path:
    """Simulate one section (``params``: :class:`SyntheticConfig` fields) and write it in
    ``layout`` to ``out_dir`` (atomically: a temporary sibling renamed at the end).

    ``seed``: the section (layout, composition, staining, depth); ``dataset_seed``: the
    biology (gene programmes, induction strengths), the same for every section of a cohort;
    ``technology``: the HEST sample's ``st_technology`` (``Visium`` or ``Xenium``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dataset_seed is None:
        raise ValueError("write_layout: dataset_seed is required (the biology shared by every "
                         "section of the cohort)")
    out_dir = Path(out_dir)
    name = name or out_dir.name
    data = simulate(SyntheticConfig(seed=seed, dataset_seed=int(dataset_seed), **params))
    with atomic_output(out_dir) as tmp:
        if layout == "visium_hd":
            write_visium_hd(data, tmp)
        elif layout == "visium":
            write_visium_published(data, tmp)
        elif layout == "hest":
            write_hest(data, tmp, name, technology)
        else:
            write_xenium(data, tmp, name)
        data.cells.write_h5ad(tmp / "cells_truth.h5ad")  # the ground truth, for checks
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m histomap.data.write_layouts",
        description="Write synthetic sections in a real platform's layout (see module doc).")
    parser.add_argument("layout", choices=LAYOUTS)
    parser.add_argument("out", help="folder; one sub-folder S{seed} per section")
    parser.add_argument("--dataset-seed", type=int, required=True,
                        help="the biology shared by all sections written (gene programmes, "
                             "induction strengths); the configs' sections use 0, the "
                             "workflow's `seed`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="one section per value (its layout, composition, staining, "
                             "depth), written to OUT/S{seed}")
    parser.add_argument("--size-um", type=float, nargs=2, default=(300.0, 300.0),
                        metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--n-genes", type=int, default=60)
    parser.add_argument("--tissue-margin-um", type=float, default=20.0)
    parser.add_argument("--technology", choices=("Visium", "Xenium"), default="Visium",
                        help="hest: the sample's st_technology (Xenium adds transcripts/)")
    args = parser.parse_args(argv)
    for seed in args.seeds:
        path = write_layout(args.layout, Path(args.out) / f"S{seed}", seed=seed,
                            dataset_seed=args.dataset_seed, size_um=tuple(args.size_um),
                            mpp=args.mpp, n_genes=args.n_genes,
                            tissue_margin_um=args.tissue_margin_um,
                            technology=args.technology)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
