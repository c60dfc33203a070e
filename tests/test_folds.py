"""Folds by patient, by sample or explicit; validation blocks never leave a slide empty."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histomap.errors import InputError
from histomap.evaluation.folds import fold_kinds, make_folds, validation_split

SHEET = pd.DataFrame({"sample": ["B4", "C2", "C3", "C4"], "patient": ["B", "C", "C", "C"]})


def test_leave_one_patient_out_keeps_patients_together():
    folds = make_folds(SHEET, "leave_one_patient_out")
    assert folds == {"B": {"train": ["C2", "C3", "C4"], "test": ["B4"]},
                     "C": {"train": ["B4"], "test": ["C2", "C3", "C4"]}}


def test_leave_one_sample_out():
    folds = make_folds(SHEET, "leave_one_sample_out")
    assert list(folds) == ["B4", "C2", "C3", "C4"]
    for fold, parts in folds.items():
        assert parts["test"] == [fold]
        assert fold not in parts["train"] and len(parts["train"]) == 3


def test_explicit_folds_and_errors():
    folds = make_folds(SHEET, "explicit", {"cross_patient": ["B4"]})
    assert folds["cross_patient"]["train"] == ["C2", "C3", "C4"]
    with pytest.raises(InputError, match="not in the sheet.*X9"):
        make_folds(SHEET, "explicit", {"f": ["X9"]}, sheet="my.tsv")
    with pytest.raises(InputError, match="leaves no training samples"):
        make_folds(SHEET, "explicit", {"f": ["B4", "C2", "C3", "C4"]})
    with pytest.raises(InputError, match="unknown fold strategy"):
        make_folds(SHEET, "random")
    single = pd.DataFrame({"sample": ["A"], "patient": ["P"]})
    for strategy in ("leave_one_patient_out", "leave_one_sample_out"):
        with pytest.raises(InputError, match="at least two ST samples.*benchmark: false"):
            make_folds(single, strategy)
    one_patient = pd.DataFrame({"sample": ["A", "B"], "patient": ["P", "P"]})
    with pytest.raises(InputError, match="single patient 'P'.*leave_one_sample_out.*"
                                         "benchmark: false"):
        make_folds(one_patient, "leave_one_patient_out")
    assert list(make_folds(one_patient, "leave_one_sample_out")) == ["A", "B"]
    with pytest.raises(InputError, match=r"folds.explicit\['f'\] lists every sample"):
        make_folds(SHEET, "explicit", {"f": ["B4", "C2", "C3", "C4"]})


def test_fold_kinds_from_the_sample_sheet():
    """HER2ST leave-one-section-out: B4 is the only cross-patient fold; C2, C3, C4 train on
    serial sections of their own patient."""
    assert fold_kinds(SHEET, make_folds(SHEET, "leave_one_sample_out")) == {
        "B4": "cross_patient", "C2": "within_patient", "C3": "within_patient",
        "C4": "within_patient"}
    assert set(fold_kinds(SHEET, make_folds(SHEET, "leave_one_patient_out")).values()) == {
        "cross_patient"}
    mixed = make_folds(SHEET, "explicit", {"both": ["B4", "C2"]})
    assert fold_kinds(SHEET, mixed) == {"both": "mixed"}


def test_validation_split_is_blockwise_and_bounded():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(500, 2))
    val = validation_split(xy, fraction=0.2, block_px=100, seed=3)
    assert 0.15 <= val.mean() <= 0.35
    blocks = np.floor(xy / 100).astype(int)
    # whole blocks: every spot of a chosen block is in validation
    for b in {tuple(k) for k in blocks[val]}:
        assert val[(blocks == b).all(axis=1)].all()
    assert np.array_equal(val, validation_split(xy, fraction=0.2, block_px=100, seed=3))
    one_block = validation_split(xy, fraction=0.2, block_px=1e6, seed=0)
    assert not one_block.any(), "must never hold out a whole slide"
    assert not validation_split(xy, fraction=0.0, block_px=100, seed=0).any()
