"""The benchmark's folds as the workflow plans them (arrow: spots -> model, which samples train
and which are held out).

Folds split the sheet's ST samples (image-only samples never enter a fold) by patient, by sample
or explicitly (:func:`histomap.evaluation.folds.make_folds`); ``benchmark: false`` plans none.
The fold ``final`` is train_final's: every ST sample trains, none is tested. Inner folds of the
nested choice (:mod:`histomap.plan.nested`: ``{outer}~i{patient}``, made of one outer fold's
training samples) are registered with :meth:`Folds.add_inner`; they run through the same rules
but are not benchmark folds (``names`` lists the outer folds only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    inner: dict[str, dict[str, list[str]]] = field(default_factory=dict)

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
        """The benchmark's (outer) folds."""
        return list(self.folds)

    @property
    def all_names(self) -> list[str]:
        """Every fold a run may have: the outer folds, then the nested choice's inner folds."""
        return [*self.folds, *self.inner]

    def add_inner(self, inner: dict[str, dict[str, list[str]]], kinds: dict[str, str]) -> None:
        """Register inner folds (name -> train/test samples) and their kinds."""
        clash = sorted(set(inner) & {*self.folds, FINAL_FOLD})
        if clash:
            raise ValueError(f"inner fold names {clash} clash with the benchmark's folds")
        self.inner.update(inner)
        self.kinds.update(kinds)

    def samples(self, fold: str, part: str) -> list[str]:
        """Samples of a fold's part (``train`` or ``test``); the fold `final` (train_final's
        bundles) trains on every ST sample and tests none."""
        if fold == FINAL_FOLD:
            return list(self.st_samples) if part == "train" else []
        return (self.inner[fold] if fold in self.inner else self.folds[fold])[part]

    def check_final_name(self, sheet: str) -> None:
        if FINAL_FOLD in self.folds:
            raise ValueError(f"{sheet}: a fold may not be named {FINAL_FOLD!r} (train_final's)")
