"""Cross-validation folds (by patient, by sample, or explicit) and training-only validation splits.

The test fold is decided here once; training code receives only training samples, and
validation (early stopping, model selection) is carved out of those, never out of the test fold.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from histomap.errors import InputError

log = logging.getLogger(__name__)
STRATEGIES = ("leave_one_patient_out", "leave_one_sample_out", "explicit")
FOLD_KINDS = ("cross_patient", "within_patient", "mixed")


def make_folds(samples: pd.DataFrame, strategy: str, explicit: dict | None = None,
               sheet: str = "samples.tsv") -> dict[str, dict[str, list[str]]]:
    """Return ``{fold: {"train": [...], "test": [...]}}`` in sample-sheet order.

    ``leave_one_patient_out`` names folds after the held-out patient, ``leave_one_sample_out``
    after the held-out sample; ``explicit`` takes ``{fold: [test samples]}`` and trains on all
    other samples.
    """
    names = list(samples["sample"])
    if strategy == "leave_one_patient_out":
        groups = {str(p): list(samples.loc[samples["patient"] == p, "sample"])
                  for p in pd.unique(samples["patient"])}
    elif strategy == "leave_one_sample_out":
        groups = {s: [s] for s in names}
    elif strategy == "explicit":
        if not explicit:
            raise InputError(sheet, "folds.strategy is 'explicit' but folds.explicit is empty")
        groups = {}
        for fold, tests in explicit.items():
            unknown = sorted(set(tests) - set(names))
            if unknown:
                raise InputError(sheet, f"fold {fold!r} names samples not in the sheet: {unknown}")
            groups[str(fold)] = list(tests)
    else:
        raise InputError(sheet, f"unknown fold strategy {strategy!r}; use one of {STRATEGIES}")
    folds = {}
    for fold, tests in groups.items():
        train = [s for s in names if s not in tests]
        if not train:
            raise InputError(sheet, f"fold {fold!r} leaves no training samples: "
                                    + _no_training_advice(strategy, fold, names))
        folds[fold] = {"train": train, "test": list(tests)}
    return folds


def fold_kinds(samples: pd.DataFrame, folds: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    """What each fold measures, from the sample sheet's ``patient`` column:
    ``cross_patient`` when no test sample's patient has a section among the fold's training
    samples, ``within_patient`` when every test sample's patient has one (e.g. HER2ST's
    leave-one-section-out folds C2, C3, C4 train on serial sections of patient C), ``mixed``
    otherwise. Tables report the kinds apart, never their mean."""
    patient = dict(zip(samples["sample"].astype(str), samples["patient"].astype(str)))
    kinds = {}
    for fold, parts in folds.items():
        seen = {patient[s] for s in parts["train"]}
        shared = [patient[s] in seen for s in parts["test"]]
        kinds[fold] = ("within_patient" if all(shared)
                       else "mixed" if any(shared) else "cross_patient")
    return kinds


NO_BENCHMARK = ("or set `benchmark: false` to train a deployable bundle on every sample "
                "(train_final) and apply it, with no folds")


def _no_training_advice(strategy: str, fold: str, names: list[str]) -> str:
    """What to change when a fold has nothing to train on, for the strategy in use."""
    if len(names) < 2:
        return (f"a benchmark needs at least two ST samples and the sheet has "
                f"{len(names)} ({', '.join(names) or 'none'}); add samples "
                + NO_BENCHMARK)
    if strategy == "leave_one_patient_out":
        return (f"every ST sample belongs to the single patient {fold!r}, and a single patient "
                "cannot be left out; use folds.strategy leave_one_sample_out (within-patient "
                "folds) or explicit folds, " + NO_BENCHMARK)
    return (f"folds.explicit[{fold!r}] lists every sample as a test sample; leave at least one "
            "out of it to train on, " + NO_BENCHMARK)


def validation_split(coords_px: np.ndarray, *, fraction: float, block_px: float, seed: int
                     ) -> np.ndarray:
    """Boolean mask of validation spots: whole square spatial blocks of one training slide.

    Neighbouring spots share tissue, so a random spot split would leak; blocks of ``block_px``
    level-0 pixels are drawn at random until about ``fraction`` of the spots is held out.
    """
    n = len(coords_px)
    if fraction <= 0 or n < 4:
        return np.zeros(n, dtype=bool)
    block = np.floor(coords_px / block_px).astype(np.int64)
    keys, inverse = np.unique(block, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.random.default_rng(seed).permutation(len(keys))
    counts = np.bincount(inverse, minlength=len(keys))
    chosen, total = [], 0
    for k in order:
        if total >= fraction * n:
            break
        if total + counts[k] >= n:  # never hold out a whole slide
            continue
        chosen.append(k)
        total += counts[k]
    return np.isin(inverse, chosen)
