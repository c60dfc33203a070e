"""Patient effects of a synthetic cohort (simulate_sample): what every section of one patient
shares and sections of other patients do not, on top of each section's own variation.

Off by default (:class:`~histomap.data.synthetic_config.PatientEffects`, every sd 0): the
generator then makes no draw from here and its output is the same as without a patient. With
an sd above 0, :func:`draw_patient` draws the patient's effects from a generator seeded by
(dataset seed, patient) alone, so every section of the patient gets the same ones whatever its
own seed:

* staining: the H and E stain vectors (unit optical-density vectors) each times a log-normal
  factor per RGB component (``stain_sd``), renormalised, and the amount of each stain times a
  log-normal factor (``intensity_sd``). The rendered image is unmixed into H, E and a residual
  with the reference vectors and mixed back with the patient's (:func:`apply_stain`), a linear
  map of the optical density (:meth:`Patient.od_transform`);
* expression level: every cell's rate of gene ``g`` times ``exp(level[g])``,
  ``level ~ N(0, level_sd)`` per gene (Poisson counts from the shifted rates);
* composition: ``N(0, composition_sd)`` per cell type added to the region biases, which shifts
  the cell-type fractions of every section of the patient the same way on average.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from histomap.data.synthetic_config import CELL_TYPES, PatientEffects, SyntheticConfig

# Ruifrok & Johnston's haematoxylin and eosin optical-density vectors (R, G, B).
STAIN_H = (0.650, 0.704, 0.286)
STAIN_E = (0.072, 0.990, 0.105)
PATIENT_SPAWN_KEY = 202   # patient draws: SeedSequence(dataset seed, spawn_key=(202, patient hash))


def reference_stains() -> np.ndarray:
    """(3, 3) unit rows: the H and E vectors and the residual orthogonal to both."""
    h = np.asarray(STAIN_H) / np.linalg.norm(STAIN_H)
    e = np.asarray(STAIN_E) / np.linalg.norm(STAIN_E)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


def patient_hash(patient: str | int) -> int:
    """A stable 32-bit key of a patient identity (its string form: 7 and "7" are one)."""
    return zlib.crc32(str(patient).encode())


@dataclass
class Patient:
    """One patient's effects: ``stains`` (2, 3) unit H and E vectors, ``intensity`` (2,) H and E
    amount factors, ``level`` (n_genes,) log-expression shifts, ``composition`` (n_types,)
    region-bias shifts. An effect whose sds are 0 (``effects``) is not applied at all, so each
    is exactly off on its own."""
    patient: str
    effects: PatientEffects
    stains: np.ndarray
    intensity: np.ndarray
    level: np.ndarray
    composition: np.ndarray

    @property
    def stained(self) -> bool:
        return self.effects.stain_sd > 0 or self.effects.intensity_sd > 0

    def stain_transform(self) -> np.ndarray | None:
        """The OD transform to render with (None: the staining is not the patient's)."""
        return self.od_transform() if self.stained else None

    def level_factor(self) -> np.ndarray | None:
        """(n_genes,) rate factors ``exp(level)`` (None: ``level_sd`` 0)."""
        return np.exp(self.level) if self.effects.level_sd > 0 else None

    def od_transform(self) -> np.ndarray:
        """(3, 3) ``T`` with ``od_patient = od @ T`` (row vectors of optical density): unmix with
        the reference vectors, scale H and E by their intensity, mix with the patient's."""
        ref = reference_stains()
        mixed = np.vstack([self.stains * self.intensity[:, None], ref[2:]])
        return np.linalg.inv(ref) @ mixed

    def region_bias(self, bias: dict[str, float]) -> dict[str, float]:
        """The section's region biases shifted by the patient's composition."""
        if self.effects.composition_sd <= 0:
            return bias
        return {t: float(bias[t] + d) for t, d in zip(CELL_TYPES, self.composition)}

    def record(self, genes: list[str]) -> dict:
        """JSON-able effects for meta.json and ``cells.uns["synthetic"]["patient_effects"]``
        (``od_transform`` only when the staining is the patient's: h5ad stores no None)."""
        record = {"patient": self.patient,
                  "stain_vectors": {"H": [float(v) for v in self.stains[0]],
                                    "E": [float(v) for v in self.stains[1]]},
                  "stain_intensity": {"H": float(self.intensity[0]),
                                      "E": float(self.intensity[1])},
                  "composition_shift": {t: float(d)
                                        for t, d in zip(CELL_TYPES, self.composition)},
                  "level_shift_log": {g: float(v) for g, v in zip(genes, self.level)}}
        if self.stained:
            record["od_transform"] = [[float(v) for v in row] for row in self.od_transform()]
        return record


def draw_patient(cfg: SyntheticConfig) -> Patient | None:
    """The effects of ``cfg.patient`` (None when ``cfg.patient_effects`` is off), from
    (dataset seed, patient) alone: the same for every section of the patient."""
    effects = cfg.patient_effects
    if not effects.active:
        return None
    dataset_seed = int(cfg.seed if cfg.dataset_seed is None else cfg.dataset_seed)
    seq = np.random.SeedSequence(dataset_seed,
                                 spawn_key=(PATIENT_SPAWN_KEY, patient_hash(cfg.patient)))
    stain_rng, level_rng, composition_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    stains = reference_stains()[:2] * np.exp(stain_rng.normal(0, effects.stain_sd, (2, 3)))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    intensity = np.exp(stain_rng.normal(0, effects.intensity_sd, 2))
    level = level_rng.normal(0, effects.level_sd, cfg.n_genes)
    composition = composition_rng.normal(0, effects.composition_sd, len(CELL_TYPES))
    return Patient(str(cfg.patient), effects, stains, intensity, level, composition)


def apply_stain(canvas: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """An RGB float image (0-255 scale) restained: optical density ``-log(I / 255)`` (I at
    least 1) times ``transform`` (:meth:`Patient.od_transform`), back to intensities."""
    log_i = np.log(np.maximum(canvas, 1.0, dtype=np.float32) * np.float32(1 / 255))  # -od
    out = np.einsum("hwc,cd->hwd", log_i, transform.astype(np.float32))           # -od @ T
    np.exp(out, out=out)
    out *= np.float32(255)
    return out
