"""The benchmark's folds as the workflow plans them (arrow: spots -> model, which samples train
and which are held out).

Folds split the sheet's ST samples (image-only samples never enter a fold) by patient, by sample
or explicitly (:func:`histomap.evaluation.folds.make_folds`); ``benchmark: false`` plans none.
The fold ``final`` is train_final's: every ST sample trains, none is tested.
"""
from __future__ import annotations

from dataclasses import dataclass

from histomap.evaluation.folds import fold_kinds, make_folds
from histomap.plan.samples import SampleSheet

FINAL_FOLD = "final"  # results/models/{model}/final/...: train_final's checkpoints


@dataclass
class Folds:
    """``folds``: {fold: {"train": [...], "test": [...]}}; ``kinds``: cross_patient /
    within_patient / mixed per fold (reported as separate rows, never averaged)."""

    folds: dict[str, dict[str, list[str]]]
    kinds: dict[str, str]
    st_samples: list[str]

    @classmethod
    def from_config(cls, config: dict, sheet: SampleSheet) -> Folds:
        benchmark = bool(config.get("benchmark", True))
        st = sheet.st_samples
        folds = (
            make_folds(sheet.table.loc[st].reset_index(drop=True), config["folds"]["strategy"],
                       config["folds"].get("explicit"), sheet=sheet.path)
            if benchmark else {}
        )
        return cls(folds, fold_kinds(sheet.table.reset_index(drop=True), folds), st)

    @property
    def names(self) -> list[str]:
        return list(self.folds)

    def samples(self, fold: str, part: str) -> list[str]:
        """Samples of a fold's part (``train`` or ``test``); the fold `final` (train_final's
        bundles) trains on every ST sample and tests none."""
        if fold == FINAL_FOLD:
            return list(self.st_samples) if part == "train" else []
        return self.folds[fold][part]

    def check_final_name(self, sheet: str) -> None:
        if FINAL_FOLD in self.folds:
            raise ValueError(f"{sheet}: a fold may not be named {FINAL_FOLD!r} (train_final's)")
