"""Synthetic demo samples: an H&E-like slide, cells with counts, and ST spots that sum them.

One seed gives one sample folder (see :func:`simulate_sample`)::

    he.tif       pyramidal TIFF (OpenSlide generic-tiff, with mpp) of an H&E-like image
    cells.h5ad   one row per cell: obs cell_type, x_px, y_px, neighbour fractions;
                 obsm["spatial"] (x, y) level-0 px; X integer counts (CSR);
                 layers["rate"] the noiseless expected counts (float32);
                 varm["type_profile"] (genes, cell types) the expression fractions expressed
    spots.h5ad   hexagonal (Visium-like) or square spot grid, only spots holding >= 1 cell;
                 X = exact sum of the counts of the cells whose centre lies inside each disc;
                 layers["rate"] the summed rates; obs n_cells, array_row, array_col,
                 diameter_um; obsm["spatial"] px; obs_names spot_{row}x{col}
    meta.json    the config, seed, dataset seed, section variation, patient and its effects
                 (``patient_effects``, null when off), mpp and spot geometry

Pixel coordinates follow the image: pixel (row i, column j) is centred at (x=j, y=i).

The tissue is a blob surrounded by glass. Inside it, smoothed random fields (argmax) lay out
spatially coherent regions of five cell types that differ visibly in the image: tumour
epithelium (large irregular dark-purple nuclei, pink-purple cytoplasm), stroma (spindle nuclei in
pink fibrous collagen), lymphocytes (small round dark-blue nuclei), adipocytes (large empty
cells with thin pink membranes) and normal ducts (glands: a white lumen lined by regular
epithelial nuclei). Expression depends on the cell type (gene programmes) and on the
neighbourhood (genes induced by the fraction of lymphocytes or tumour cells nearby), so maps
have spatial structure at 50-200 um.

**One biology per dataset.** The cell-type expression profiles (named programmes and background
genes) and the neighbourhood induction strengths are drawn from ``dataset_seed`` (the workflow's
``seed``), never from the section's own ``seed``: every section of a dataset maps H&E to
expression the same way (:func:`dataset_biology`; stored as ``cells.varm["type_profile"]``).
Sections differ in layout (the section seed), composition (``composition_sd``: a per-section
shift of the cell-type region biases), staining (``stain_sd``: per-channel optical-density
scale) and sequencing depth (``depth_log_sd``: a per-section library-size factor). A per-section
batch effect on the profiles themselves (log-normal, ``batch_effect_sd``) is a separate knob,
off (0) by default.

**Patients of a cohort.** A section may name its ``patient`` (the workflow passes the sample
sheet's column); with ``patient_effects`` (off by default: every sd 0) the patient's staining
(H and E stain vectors and amounts), per-gene expression levels and composition shift are drawn
from (dataset seed, patient) alone, so every section of a patient shares them and sections of
other patients differ (:mod:`~histomap.data.synthetic_patient`). They are recorded in meta.json
and ``cells.uns["synthetic"]["patient_effects"]``. Off, nothing is drawn and the output is
bit-identical to a section without a patient.

The steps live beside this module, which assembles and writes a sample:
:mod:`~histomap.data.synthetic_config` (cell types, gene programmes, :class:`SyntheticConfig`),
:mod:`~histomap.data.synthetic_layout` (tissue, regions, cells),
:mod:`~histomap.data.synthetic_expression` (the biology and the counts),
:mod:`~histomap.data.synthetic_render` (the H&E image),
:mod:`~histomap.data.synthetic_patient` (patient effects). :mod:`histomap.data.aggregate` sums any
point-like high-resolution AnnData (cells here, Xenium transcripts elsewhere) into discs or
square bins of any size: ground truth at any resolution. :mod:`histomap.data.write_layouts`
writes the same sections in real platforms' layouts (Space Ranger HD bins, Visium as published,
HEST-1k, Xenium with its H&E).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.aggregate import disc_membership
from histomap.data.slide import write_pyramid
from histomap.data.synthetic_config import CELL_TYPES, SyntheticConfig
from histomap.data.synthetic_expression import (dataset_biology, section_profiles,
                                                simulate_expression)
from histomap.data.synthetic_layout import make_layout
from histomap.data.synthetic_patient import draw_patient
from histomap.data.synthetic_render import render_he
from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

FORMAT = "histomap-synthetic/1"


@dataclass
class SyntheticData:
    image: np.ndarray         # (H, W, 3) uint8
    cells: ad.AnnData
    spots: ad.AnnData
    meta: dict


def spot_grid(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres (n, 2) px and their (row, col) on a hex or square grid whose discs fit in
    the image."""
    H, W = cfg.shape_px
    step = cfg.spot_spacing_um / cfg.mpp
    radius = cfg.spot_diameter_um / 2 / cfg.mpp
    dy = step * np.sqrt(3) / 2 if cfg.spot_grid == "hex" else step
    rows, cols, xs, ys = [], [], [], []
    for r, y in enumerate(np.arange(radius, H - radius + 1e-9, dy)):
        shift = step / 2 if (cfg.spot_grid == "hex" and r % 2) else 0.0
        x = np.arange(radius + shift, W - radius + 1e-9, step)
        rows.append(np.full(len(x), r))
        cols.append(np.arange(len(x)))
        xs.append(x)
        ys.append(np.full(len(x), y))
    centres = np.column_stack([np.concatenate(xs), np.concatenate(ys)])
    return centres, np.concatenate(rows), np.concatenate(cols)


def make_spots(cfg: SyntheticConfig, cells: ad.AnnData) -> tuple[ad.AnnData, int]:
    """Spots whose disc holds >= 1 cell centre; X = exact sum of those cells' counts.
    Returns (spots, number of grid spots dropped as empty)."""
    centres, rows, cols = spot_grid(cfg)
    radius = cfg.spot_diameter_um / 2 / cfg.mpp
    member = disc_membership(cells.obsm["spatial"], centres, radius)
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    keep = n_cells > 0
    n_dropped = int((~keep).sum())
    log.info("synthetic spots: %d of %d grid spots hold no cell centre; dropped",
             n_dropped, len(keep))
    member = member[keep]
    X = (member.astype(cells.X.dtype) @ cells.X).tocsr()
    rate = np.asarray(member.astype(np.float32) @ cells.layers["rate"], dtype=np.float32)
    obs = pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep],
                        "n_cells": n_cells[keep].astype(np.int64),
                        "diameter_um": float(cfg.spot_diameter_um)},
                       index=pd.Index([f"spot_{r}x{c}" for r, c in zip(rows[keep], cols[keep])]))
    spots = ad.AnnData(X=X, obs=obs, var=cells.var.copy(), layers={"rate": rate})
    spots.obsm["spatial"] = centres[keep].astype(np.float64)
    return spots, n_dropped


# ----------------------------------------------------------------------------- sample

def section_variation(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """How one section differs from the others of its dataset besides its layout: region biases
    (composition), per-channel stain scale, library-size factor (depth)."""
    shift = rng.normal(0, cfg.composition_sd, len(CELL_TYPES))
    bias = {t: float(cfg.region_bias.get(t, 0.0) + d) for t, d in zip(CELL_TYPES, shift)}
    stain = np.exp(rng.normal(0, cfg.stain_sd, 3))
    depth = float(np.exp(rng.normal(0, cfg.depth_log_sd)))
    return {"region_bias": bias, "stain": [float(v) for v in stain], "depth": depth}


def simulate(cfg: SyntheticConfig) -> SyntheticData:
    """Generate a whole sample in memory (deterministic given ``cfg.seed`` and
    ``cfg.dataset_seed``)."""
    layout_rng, expr_rng, image_rng, section_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4))
    section = section_variation(cfg, section_rng)
    patient = draw_patient(cfg)   # None unless cfg.patient_effects has an sd above 0
    biology = dataset_biology(cfg)
    profiles = section_profiles(biology, cfg.batch_effect_sd, section_rng)
    bias = section["region_bias"] if patient is None else patient.region_bias(
        section["region_bias"])
    layout = make_layout(replace(cfg, region_bias=bias), layout_rng)
    counts, rate, var, library, frac = simulate_expression(
        cfg, layout.xy_um, layout.cell_type, expr_rng, biology=biology, profiles=profiles,
        depth=section["depth"], level=None if patient is None else patient.level_factor())
    xy_px = layout.xy_um / cfg.mpp
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(layout.cell_type.astype(np.int64),
                                                categories=list(CELL_TYPES)),
         "x_px": xy_px[:, 0], "y_px": xy_px[:, 1], "library_size": library},
        index=pd.Index([f"cell_{i:06d}" for i in range(len(xy_px))]))
    for t, name in enumerate(CELL_TYPES):
        obs[f"frac_{name}"] = frac[:, t]
    cells = ad.AnnData(X=counts, obs=obs, var=var.copy(), layers={"rate": rate})
    cells.varm["type_profile"] = np.ascontiguousarray(profiles.T)  # (genes, cell types)
    cells.obsm["spatial"] = xy_px.astype(np.float64)
    dataset_seed = int(cfg.seed if cfg.dataset_seed is None else cfg.dataset_seed)
    cells.uns["synthetic"] = {"seed": int(cfg.seed), "dataset_seed": dataset_seed,
                              "mpp": float(cfg.mpp),
                              "neighbourhood_um": float(cfg.neighbourhood_um),
                              "cell_types": list(CELL_TYPES)}
    effects = None if patient is None else patient.record(list(var.index))
    if cfg.patient is not None:
        cells.uns["synthetic"]["patient"] = str(cfg.patient)
    if effects is not None:
        cells.uns["synthetic"]["patient_effects"] = effects
    spots, n_dropped = make_spots(cfg, cells)
    image = render_he(cfg, layout, image_rng, stain=np.asarray(section["stain"]),
                      patient_stain=None if patient is None else patient.stain_transform())
    H, W = cfg.shape_px
    meta = {"format": FORMAT, "seed": int(cfg.seed), "dataset_seed": dataset_seed,
            "section": section, "patient": None if cfg.patient is None else str(cfg.patient),
            "patient_effects": effects, "mpp": float(cfg.mpp),
            "spot_diameter_um": float(cfg.spot_diameter_um),
            "spot_spacing_um": float(cfg.spot_spacing_um), "spot_grid": cfg.spot_grid,
            "size_px": [W, H], "cell_types": list(CELL_TYPES), "n_cells": int(cells.n_obs),
            "n_spots": int(spots.n_obs), "n_spots_dropped": n_dropped,
            "n_glands": int(len(layout.glands)), "config": asdict(cfg)}
    log.info("synthetic sample (seed %d): %d cells (%s), %d spots, image %dx%d px",
             cfg.seed, cells.n_obs,
             ", ".join(f"{k} {v}" for k, v in cells.obs["cell_type"].value_counts().items()),
             spots.n_obs, W, H)
    return SyntheticData(image=image, cells=cells, spots=spots, meta=meta)


def write_sample(data: SyntheticData, out_dir: str | Path) -> Path:
    """Write ``he.tif``, ``cells.h5ad``, ``spots.h5ad``, ``meta.json`` atomically: into a
    temporary sibling folder renamed at the end, so a failure leaves no partial folder."""
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        write_pyramid(data.image, tmp / "he.tif", data.meta["mpp"])
        data.cells.write_h5ad(tmp / "cells.h5ad")
        data.spots.write_h5ad(tmp / "spots.h5ad")
        (tmp / "meta.json").write_text(json.dumps(data.meta, indent=2) + "\n")
    return out_dir


def simulate_sample(out_dir: str | Path, *, seed: int, config: SyntheticConfig | None = None,
                    **params) -> None:
    """Generate the synthetic sample of ``seed`` into ``out_dir`` (see module docstring).

    ``params`` are :class:`SyntheticConfig` fields (size_um=(w, h) um, mpp, n_genes,
    spot_diameter_um, spot_spacing_um, ...), applied over ``config`` when given.
    """
    cfg = replace(config, seed=seed, **params) if config else SyntheticConfig(seed=seed, **params)
    write_sample(simulate(cfg), out_dir)
