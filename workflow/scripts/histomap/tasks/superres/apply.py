"""SR applied to a sample with LR ST and H&E but no HR truth (``apply.superres``).

Arrow: SR bundle (fold ``final``) + a sample's measured spots -> **LR-only inputs** (rule
apply_sr_inputs), then :func:`histomap.tasks.superres.prediction.predict_sr` (rule apply_sr)
writes the same maps zarr and HR-bin AnnData as the benchmark, without truth layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad

from histomap.data.srpairs.lr_only import build_lr_pairs
from histomap.errors import InputError
from histomap.tasks.superres.model_file import sr_model_meta


def lr_inputs_for_model(model_path: str | Path, spots_h5ad: str | Path, slide: str | Path,
                        out_zarr: str | Path, *, min_measured: float = 0.0,
                        sample: str = "") -> dict[str, Any]:
    """LR-only inputs (:func:`histomap.data.srpairs.build_lr_pairs`) of a sample with spots
    and H&E but no HR truth, in the layout and units of an SR model trained elsewhere (its
    factor, patch shapes, H&E size, genes, normalisation and training target sum: nothing of
    this sample enters the units). ``spots_h5ad``: the sample's raw spots (ingest)."""
    meta = sr_model_meta(model_path)
    pairs = meta["pairs"]
    spots = ad.read_h5ad(spots_h5ad)
    missing = [g for g in meta["genes"] if g not in spots.var_names]
    if missing:
        raise InputError(spots_h5ad, f"{len(missing)} genes of the SR model {model_path} are not "
                                     f"measured, e.g. {', '.join(missing[:5])}")
    image_hw = pairs.get("image_hw")
    if not image_hw:
        raise InputError(model_path, "the SR model does not record its H&E patch size")
    return build_lr_pairs(spots, slide, meta["genes"], out_zarr, factor=int(pairs["scale"]),
                          n_lr=int(pairs["lr_shape"][0]), n_hr=int(pairs["hr_shape"][0]),
                          he_hw=image_hw, normalisation=pairs["normalisation"],
                          target_sum=pairs.get("target_sum"), min_measured=min_measured,
                          trained_lr_um=pairs.get("lr_um"),
                          source_name=f"{sample or spots_h5ad} spots")
