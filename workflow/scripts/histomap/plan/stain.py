"""Stain handling in the plan (arrow: slide -> model): which slide each model reads and the
start-up checks of its stain keys (:mod:`histomap.data.stain`).

A model with ``stain_normalise: macenko | reinhard`` reads, for fold F, every slide normalised
to F's reference: ``results/stain/{method}/{F}/{sample}/slide.tif``, made by ``stain_slide``
from the ingested slide and ``results/stain/{method}/{F}/reference.json``, which
``stain_reference`` fits on the tissue pixels of F's **training** slides only (the fold
``final``: every ST sample). Its cached features are per reference too:
``results/features/{encoder}/{mpp}/stain_{method}/{F}/{sample}.zarr``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from histomap.data.stain import METHODS, StainJitter

if TYPE_CHECKING:
    from histomap.plan.folds import Folds
    from histomap.plan.models import ModelSet

AUGMENTED_FAMILIES = ("stnet", "pixnet", "istar")  # train on pixels they read themselves


def stain_method(block: dict) -> str | None:
    """The model block's normalisation method, or None (absent or ``none``)."""
    method = block.get("stain_normalise")
    return None if method in (None, "none") else method


def check_stain(models: ModelSet) -> None:
    """Refuse stain keys that cannot do what they say, naming the model and the key."""
    for model in models.names:
        block, family = models.block(model), models.family(model)
        method = stain_method(block)
        if method is not None and method not in METHODS:
            raise ValueError(f"config: {model}.stain_normalise must be none or one of "
                             f"{METHODS}, got {method!r}")
        augment = block.get("stain_augment")
        if not augment:
            continue
        if family not in AUGMENTED_FAMILIES:
            raise ValueError(f"config: {model}.stain_augment: a {family} model does not "
                             f"augment its images (models that do: {AUGMENTED_FAMILIES})")
        if block.get("feature_cache"):
            raise ValueError(f"config: {model} has stain_augment and feature_cache: true; it "
                             "trains from cached features, so there are no pixels to augment. "
                             "Set feature_cache: false or drop stain_augment")
        try:
            StainJitter.from_config(augment)
        except ValueError as exc:
            raise ValueError(f"config: {model}.{exc}") from None


class StainFiles:
    """The slides and stain files of each (model, fold)."""

    def __init__(self, models: ModelSet, folds: Folds):
        self.models, self.folds = models, folds

    def method(self, model: str) -> str | None:
        return stain_method(self.models.block(model))

    def slide(self, model: str, fold: str, sample: str) -> str:
        """The slide a model of ``fold`` reads for ``sample``."""
        method = self.method(model)
        if method is None:
            return f"results/ingest/{sample}/slide.tif"
        return f"results/stain/{method}/{fold}/{sample}/slide.tif"

    def feature_dir(self, model: str, fold: str, encoder: str, mpp: str) -> str:
        """The folder of the encode_slide caches a model of ``fold`` reads."""
        method = self.method(model)
        base = f"results/features/{encoder}/{mpp}"
        return base if method is None else f"{base}/stain_{method}/{fold}"

    def reference(self, model: str, fold: str) -> str:
        return f"results/stain/{self.method(model)}/{fold}/reference.json"

    def reference_slides(self, fold: str) -> list[str]:
        """The ingested slides a fold's reference is fitted on: its training samples only."""
        return [f"results/ingest/{s}/slide.tif" for s in self.folds.samples(fold, "train")]
