"""Patient effects of the synthetic generator (a cohort of patients with several sections each):
off by default and then bit-identical to the generator without them; shared by the sections of
a patient, different between patients; visible in the image, the counts and the composition;
the sample sheet's patient reaching the generator in the workflow."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from histomap.data.synthetic import CELL_TYPES, SyntheticConfig, simulate, simulate_sample
from histomap.data.synthetic_config import PatientEffects
from histomap.data.synthetic_patient import apply_stain, draw_patient, reference_stains
from histomap.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SMALL = (300.0, 300.0)      # ~150 cells, a fraction of a second
MEDIUM = (400.0, 400.0)
ALL = {"stain_sd": 0.1, "intensity_sd": 0.2, "level_sd": 0.3, "composition_sd": 0.3}

def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _fingerprint(data) -> dict[str, str]:
    cx, sx = data.cells.X, data.spots.X
    return {"image": _sha(data.image), "cells": _sha(cx.data, cx.indices, cx.indptr),
            "spots": _sha(sx.data, sx.indices, sx.indptr)}


def _od(image: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0)


@pytest.mark.parametrize("extra", [
    {"patient_effects": None},
    {"patient_effects": {}},
    {"patient": "P1"},
    {"patient": "P1", "patient_effects": {k: 0.0 for k in ALL}},
    {"patient": 7, "patient_effects": PatientEffects()},
], ids=["none", "empty", "patient_only", "all_zero", "int_patient_default"])
def test_effects_off_are_bit_identical_to_a_config_without_them(extra):
    # same process, same machine: any difference is the patient code running, not rounding
    # (a hash recorded on one machine would also compare the CPU's float kernels)
    plain = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=SMALL))
    data = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=SMALL, **extra))
    assert _fingerprint(data) == _fingerprint(plain), (
        "with patient effects off the generator must write what it writes without them")
    assert data.meta["patient_effects"] is None
    assert "patient_effects" not in data.cells.uns["synthetic"]


def test_sections_of_one_patient_share_effects_other_patients_differ():
    def effects(seed, patient, dataset_seed=0):
        cfg = SyntheticConfig(seed=seed, dataset_seed=dataset_seed, size_um=SMALL,
                              patient=patient, patient_effects=ALL)
        return draw_patient(cfg)

    a1, a2, b = effects(11, "P1"), effects(12, "P1"), effects(11, "P2")
    for name in ("stains", "intensity", "level", "composition"):
        np.testing.assert_array_equal(getattr(a1, name), getattr(a2, name))
        assert not np.allclose(getattr(a1, name), getattr(b, name)), name
    # another dataset seed draws another cohort; an integer patient is its string form
    assert not np.allclose(effects(11, "P1", dataset_seed=1).level, a1.level)
    np.testing.assert_array_equal(effects(11, 7).level, effects(12, "7").level)
    # unit stain vectors near the reference ones, sizes as configured
    np.testing.assert_allclose(np.linalg.norm(a1.stains, axis=1), 1.0)
    assert np.all(np.sum(a1.stains * reference_stains()[:2], axis=1) > 0.98)   # cosines
    assert a1.level.shape == (60,) and a1.composition.shape == (len(CELL_TYPES),)

    one = simulate(SyntheticConfig(seed=11, dataset_seed=0, size_um=SMALL, patient="P1",
                                   patient_effects=ALL))
    two = simulate(SyntheticConfig(seed=12, dataset_seed=0, size_um=SMALL, patient="P1",
                                   patient_effects=ALL))
    assert one.meta["patient_effects"] == two.meta["patient_effects"]
    assert one.meta["patient"] == "P1"
    assert one.meta["section"] != two.meta["section"]          # the sections still differ
    assert not np.array_equal(one.image, two.image)


def test_stain_shift_is_visible_in_the_image():
    """Same section (seed) restained by four patients: the mean optical density of the tissue
    pixels per channel moves as the patient's recorded OD transform predicts, and across the
    patients by about the configured intensity sd."""
    stain = {"stain_sd": 0.1, "intensity_sd": 0.2}
    base = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=MEDIUM))
    tissue = base.image.mean(axis=2) < 225
    od_base = _od(base.image)[tissue]
    shifts = []
    for patient in ("P1", "P2", "P3", "P4"):
        data = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=MEDIUM, patient=patient,
                                        patient_effects=stain))
        transform = np.asarray(data.meta["patient_effects"]["od_transform"])
        predicted = (od_base @ transform).mean(axis=0) / od_base.mean(axis=0) - 1
        observed = _od(data.image)[tissue].mean(axis=0) / od_base.mean(axis=0) - 1
        # blur, noise, the section's own stain scale and clipping come after the patient's
        np.testing.assert_allclose(observed, predicted, atol=0.08)
        clear = np.abs(predicted) > 0.05
        assert np.all(np.sign(observed[clear]) == np.sign(predicted[clear]))
        shifts.append(np.log1p(observed))
        # the layout and the counts are the section's: only the stain changed
        assert (data.cells.X != base.cells.X).nnz == 0
    spread = np.std(shifts, axis=0).max()
    assert spread > stain["intensity_sd"] / 2, f"patients' OD spread {spread:.3f}"


def test_expression_level_shift_multiplies_each_gene_rate(tmp_path):
    base = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=SMALL))
    data = simulate(SyntheticConfig(seed=3, dataset_seed=0, size_um=SMALL, patient="P5",
                                    patient_effects={"level_sd": 0.3}))
    level = data.meta["patient_effects"]["level_shift_log"]
    assert list(level) == list(data.cells.var_names)
    factor = np.exp(np.array(list(level.values())))
    np.testing.assert_allclose(data.cells.layers["rate"], base.cells.layers["rate"] * factor,
                               rtol=1e-5)
    np.testing.assert_array_equal(data.image, base.image)   # image untouched by expression
    assert 0.15 < np.std(np.log(factor)) < 0.45
    # stored with the cells; no OD transform recorded for an unchanged staining
    assert "od_transform" not in data.meta["patient_effects"]
    data.cells.write_h5ad(tmp_path / "cells.h5ad")
    stored = ad.read_h5ad(tmp_path / "cells.h5ad").uns["synthetic"]
    assert stored["patient"] == "P5"
    assert stored["patient_effects"]["level_shift_log"] == pytest.approx(level)


def test_composition_shift_moves_type_fractions_its_way():
    """Per patient and cell type: the log change of the type's cell count against the same
    section without patient effects follows the type's (centred) region-bias shift."""
    shifts, changes = [], []
    bases = {seed: simulate(SyntheticConfig(seed=seed, dataset_seed=0, size_um=MEDIUM))
             for seed in (3, 4)}
    for patient in ("P1", "P2", "P3", "P4", "P5", "P6"):
        for seed, base in bases.items():
            data = simulate(SyntheticConfig(seed=seed, dataset_seed=0, size_um=MEDIUM,
                                            patient=patient,
                                            patient_effects={"composition_sd": 0.5}))
            counts = [d.cells.obs["cell_type"].value_counts().reindex(CELL_TYPES).to_numpy()
                      for d in (base, data)]
            shift = np.array(list(data.meta["patient_effects"]["composition_shift"].values()))
            shifts += list(shift - shift.mean())   # the argmax of the regions ignores a common
            changes += list(np.log((counts[1] + 5) / (counts[0] + 5)))
    r = np.corrcoef(shifts, changes)[0, 1]
    assert r > 0.4, f"composition shift and type-count change correlate only {r:.2f}"
    shifts, changes = np.array(shifts), np.array(changes)
    big = np.abs(shifts) > 0.3
    assert np.mean(np.sign(shifts[big]) == np.sign(changes[big])) > 0.7


def test_apply_stain_identity_and_darkening():
    rng = np.random.default_rng(0)
    canvas = rng.uniform(30, 250, (20, 30, 3)).astype(np.float32)
    np.testing.assert_allclose(apply_stain(canvas, np.eye(3)), canvas, rtol=1e-5)
    darker = apply_stain(canvas, 1.5 * np.eye(3))
    np.testing.assert_allclose(_od(darker), 1.5 * _od(canvas), rtol=1e-4)


@pytest.mark.parametrize("kwargs,key", [
    ({"patient": "P1", "patient_effects": {"level_sd": -0.1}}, "patient_effects.level_sd"),
    ({"patient": "P1", "patient_effects": {"stain_sd": float("nan")}},
     "patient_effects.stain_sd"),
    ({"patient": "P1", "patient_effects": {"intensity_sd": "high"}},
     "patient_effects.intensity_sd"),
    ({"patient": "P1", "patient_effects": {"hue_sd": 0.1}}, "hue_sd"),
    ({"patient": "P1", "patient_effects": [0.1]}, "synthetic.patient_effects"),
    ({"patient_effects": {"composition_sd": 0.2}}, "patient"),
    ({"patient": "", "patient_effects": ALL}, "patient"),
    ({"patient": True}, "patient"),
])
def test_bad_patient_settings_name_the_key(kwargs, key):
    with pytest.raises(InputError, match=key):
        SyntheticConfig(seed=1, size_um=SMALL, **kwargs)


def test_the_sheet_patient_reaches_the_generator(tmp_path):
    """The workflow's simulate_sample gets the sheet's patient (in params.synthetic) when the
    config has patient_effects, and exactly the config's block otherwise (the demo's params
    unchanged, so its existing results are not rerun)."""
    from histomap.plan import load_config, validate_config

    defaults = REPO / "config" / "config.yaml"
    demo_config = load_config([defaults])
    demo = validate_config(demo_config, REPO)
    assert demo.sheet.synthetic_params("synA", demo_config["synthetic"]) == demo_config["synthetic"]

    config = load_config([REPO / "config" / "cohort_synthetic.yaml"], defaults=defaults)
    plan = validate_config(config, REPO)
    patients = plan.sheet.table.groupby("patient")["sample"].apply(list)
    assert len(patients) >= 6 and all(len(s) >= 2 for s in patients)
    assert set(plan.folds.kinds.values()) == {"cross_patient"}
    params = plan.sheet.synthetic_params("P2b", config["synthetic"])
    assert params["patient"] == "P2" and params["patient_effects"]["level_sd"] > 0

    params["size_um"] = [SMALL[0], SMALL[1]]
    for seed, sample in enumerate(("P2a", "P2b")):
        simulate_sample(tmp_path / sample, seed=21 + seed, dataset_seed=0, **params)
    metas = [json.loads((tmp_path / s / "meta.json").read_text()) for s in ("P2a", "P2b")]
    assert metas[0]["patient"] == metas[1]["patient"] == "P2"
    assert metas[0]["patient_effects"] == metas[1]["patient_effects"]
    cells = ad.read_h5ad(tmp_path / "P2a" / "cells.h5ad")
    stored = cells.uns["synthetic"]["patient_effects"]
    np.testing.assert_allclose(stored["stain_intensity"]["H"],
                               metas[0]["patient_effects"]["stain_intensity"]["H"])


@pytest.mark.parametrize("effects,key", [({"level_sd": -1}, "level_sd"),
                                         ({"hue_sd": 0.1}, "hue_sd")])
def test_the_config_schema_refuses_bad_patient_effects(effects, key):
    from histomap.plan import load_config, validate_config

    config = load_config([REPO / "config" / "cohort_synthetic.yaml"],
                         defaults=REPO / "config" / "config.yaml")
    config["synthetic"]["patient_effects"] = effects
    with pytest.raises(Exception, match=key) as err:
        validate_config(config, REPO)
    assert "patient_effects" in str(err.value)
