"""Cross-scale settings (arrow: dense map -> spots or bins at any scale -> metrics).

Dense models (and the mean baseline) trained at one spot size are scored at every diameter of
``cross_scale.diameters_um``, on folds whose test samples all have high-resolution ground truth
(truth_at_scale re-measures it with discs of each size). Spot models (one crop per spot: ST-Net,
the probe, HisToGene) named in ``cross_scale.models`` are scored at the diameter they were
trained at (when it is one of ``diameters_um``), predicted at the centres of the same truth
table: **every model of one column of the cross-scale table is scored on the same discs or
bins**, the truth's (the evaluation records how many). ``train_diameters_um`` of a dense model
adds those re-measured discs to its training spots (mixed-scale supervision).
"""
from __future__ import annotations

from histomap.models import BASELINE_MODELS, DENSE_MODELS, SPOT_MODELS
from histomap.plan.folds import Folds
from histomap.plan.models import ModelSet
from histomap.plan.samples import SampleSheet

DEFAULT_CROSS_SCALE = {"enabled": False, "models": [], "diameters_um": [100.0],
                       "min_spacing_um": 10}


def scale_label(um) -> str:
    """How a diameter in um appears in file names: 55.0 -> "55", 2.5 -> "2.5"."""
    return f"{float(um):g}"


class CrossScale:
    """``settings``: the `cross_scale` block; ``labels``: its diameters as file-name labels;
    ``preprocess``: the spot QC of re-measured discs (`preprocess` with the block's own
    min_counts/min_genes)."""

    def __init__(self, config: dict, sheet: SampleSheet, folds: Folds, models: ModelSet):
        self.sheet, self.folds, self.model_set = sheet, folds, models
        self.settings = config.get("cross_scale", DEFAULT_CROSS_SCALE)
        self.labels = [scale_label(um) for um in self.settings["diameters_um"]]
        self.preprocess = {
            **config["preprocess"],
            **{k: self.settings[k] for k in ("min_counts", "min_genes") if k in self.settings},
        }

    def models(self) -> list[str]:
        """Configured models named in cross_scale.models, when enabled (dense and baseline
        models at every diameter, spot models at their training diameter)."""
        if not self.settings["enabled"]:
            return []
        return [m for m in self.model_set.names if m in self.settings["models"]
                and self.model_set.family(m) in DENSE_MODELS + BASELINE_MODELS + SPOT_MODELS]

    def is_spot_model(self, model: str) -> bool:
        return self.model_set.family(model) in SPOT_MODELS

    def training_diameters(self, fold: str) -> list[float]:
        """The configured diameters equal to the spot size of every training sample of a fold
        (the one size a spot model predicts at; [] when the samples differ or it is not
        configured)."""
        sizes = {self.sheet.spot_diameter_um(s) for s in self.folds.samples(fold, "train")}
        if len(sizes) != 1 or None in sizes:
            return []
        size = float(sizes.pop())
        return [um for um in self.settings["diameters_um"] if float(um) == size]

    def fold_names(self) -> list[str]:
        """Folds whose test samples all have high-resolution ground truth."""
        return [f for f in self.folds.names
                if all(self.sheet.has_highres(s) for s in self.folds.samples(f, "test"))]

    def pairs(self, fold: str, model: str | None = None) -> list[tuple[str, str]]:
        """(sample, diameter label) of a fold's cross-scale evaluation (of ``model``: at its
        :meth:`diameters`), in a fixed order."""
        labels = (self.labels if model is None
                  else [scale_label(um) for um in self.diameters(model, fold)])
        return [(s, label) for s in self.folds.samples(fold, "test") for label in labels]

    def diameters(self, model: str, fold: str) -> list:
        """Cross-scale diameters a run of this model and fold is scored at ([]: none): every
        configured one for a dense map or the baseline, the training one for a spot model."""
        if model not in self.models() or fold not in self.fold_names():
            return []
        if self.is_spot_model(model):
            return self.training_diameters(fold)
        return list(self.settings["diameters_um"])

    def scored(self, model: str) -> list[str]:
        """The folds a model has cross-scale metrics for."""
        return [f for f in self.fold_names() if self.diameters(model, f)]

    def truth(self, model: str, fold: str, sample: str) -> list[str]:
        """The cross-scale ground-truth files whose discs a dense map must cover ([] for other
        models: a spot model predicts at the truth's centres, it covers nothing)."""
        if self.is_spot_model(model):
            return []
        return [f"results/scales/{sample}/truth_{scale_label(um)}um.h5ad"
                for um in self.diameters(model, fold)]

    def check_train_diameters(self) -> None:
        """`train_diameters_um` must be sizes this block re-measures from high-resolution data."""
        for model in self.model_set.names:
            for um in self.model_set.block(model).get("train_diameters_um", []):
                if scale_label(um) not in self.labels:
                    raise ValueError(
                        f"config: {model}.train_diameters_um has {um}, which is not one of "
                        f"cross_scale.diameters_um {self.settings['diameters_um']} (the sizes "
                        "re-measured from high-resolution data)"
                    )
