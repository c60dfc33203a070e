"""The configured models and their variants (arrow: config -> model).

``models`` lists what the benchmark trains: model families of :mod:`histomap.models` (spot,
dense, baseline) or ``variants`` entries, each a family's block with some keys overridden and
resolved by :func:`histomap.plan.inherit.resolve_base`. A variant runs through its family's
rules (``train_pixnet`` trains every PixNet variant); :meth:`ModelSet.runs` gives the wildcard
regex of those names.
"""
from __future__ import annotations

from collections.abc import Iterable

from histomap.models import BASELINE_MODELS, DENSE_MODELS, MODEL_FAMILIES, SPOT_MODELS
from histomap.models.encoder_specs import flatten_encoder
from histomap.plan.inherit import Resolved, resolve_base

# keys of a model block the pipeline reads; the rest configures the network (model_params)
# (`pretrained: false` only tells the start-up checks that a random encoder is meant)
PIPELINE_KEYS = ("train", "predict_spot_diameters_um", "train_diameters_um", "feature_cache",
                 "pretrained", "stain_normalise")
VARIANT_ROOTS = SPOT_MODELS + DENSE_MODELS  # what a variant may be built on (no baseline)


def alternation(names: Iterable[str]) -> str:
    """Wildcard regex matching exactly these names (none: matches nothing)."""
    names = list(names)
    return "|".join(names) if names else "(?!x)x"


class ModelSet:
    """``config["models"]`` with their families and merged config blocks."""

    def __init__(self, config: dict):
        self.config = config
        self.names = list(config["models"])
        self.variants = config.get("variants", {})
        for model in self.names:
            if self.family(model) not in MODEL_FAMILIES:
                raise ValueError(
                    f"config: `models` entry {model!r} is neither a model "
                    f"{MODEL_FAMILIES} nor a `variants` entry"
                )
            self.block(model)

    def resolve(self, model: str) -> Resolved:
        """A model or variant with its `base` chain resolved down to its family."""
        roots = {family: self.config.get(family) for family in VARIANT_ROOTS}
        return resolve_base(model, self.variants, where="variants", roots=roots,
                            roots_label=f"a model ({', '.join(VARIANT_ROOTS)})")

    def family(self, model: str) -> str:
        """The model family a model or variant is built on (``base_model`` in the rules)."""
        return self.resolve(model).root

    def is_dense(self, model: str) -> bool:
        return self.family(model) in DENSE_MODELS

    def block(self, model: str) -> dict:
        """The config block of a model or variant (variant keys override the base block); an
        encoder given as a mapping (``encoder: {name, checkpoint}``) is written as ``encoder:
        name`` with ``checkpoint`` and ``pretrained`` keys
        (:func:`histomap.models.encoder_specs.flatten_encoder`)."""
        family = self.family(model)
        if family in BASELINE_MODELS and family not in self.config:
            return {}  # nothing to configure
        if family not in self.config:
            raise ValueError(f"config: model {model!r} needs a `{family}:` block")
        return flatten_encoder(self.resolve(model).settings, where=model)

    def params(self, model: str) -> dict:
        """A model's config block without the pipeline-only keys (train overrides, scales)."""
        block = self.block(model)
        for key in PIPELINE_KEYS:
            block.pop(key, None)
        return block

    def train(self, model: str) -> dict:
        """The `train` settings with the model's own `train:` overrides."""
        return {**self.config["train"], **self.block(model).get("train", {})}

    def of_family(self, *families: str) -> list[str]:
        """Configured models (and variants) built on one of ``families``, in config order."""
        return [m for m in self.names if self.family(m) in families]

    def runs(self, family: str) -> str:
        """Wildcard regex of the configured models (and variants) built on ``family``."""
        return alternation(self.of_family(family))

    @property
    def spot_runs(self) -> str:
        """Wildcard regex of the configured spot models (one crop per spot)."""
        return alternation(self.of_family(*SPOT_MODELS))

    @property
    def dense_runs(self) -> str:
        """Wildcard regex of the configured dense models (dense_spots, dense figures)."""
        return alternation(self.of_family(*DENSE_MODELS))
