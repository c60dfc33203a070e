"""What a synthetic sample is made of (simulate_sample, the embedded demo's first step): the cell
types, the named gene programmes and how the neighbourhood induces them, and every parameter of
a sample (:class:`SyntheticConfig`).
"""
from __future__ import annotations

import math
from numbers import Integral
from dataclasses import dataclass, field, fields

from histomap.errors import InputError

CELL_TYPES = ("tumour", "stroma", "lymphocyte", "adipocyte", "normal_duct")
TUMOUR, STROMA, LYMPHOCYTE, ADIPOCYTE, DUCT = range(len(CELL_TYPES))
GLASS = -1

# Named gene programmes (the rest of the panel are background genes GENE###).
GENE_PROGRAMMES: dict[str, tuple[str, ...]] = {
    "housekeeping": ("ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1"),
    "tumour": ("ERBB2", "GRB7", "MKI67", "TOP2A", "CCND1", "MUC1"),
    "epithelial": ("KRT8", "KRT18", "KRT19", "EPCAM"),
    "normal_duct": ("KRT5", "KRT14", "PIP", "SCGB2A2"),
    "stroma": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"),
    "lymphocyte": ("PTPRC", "CD3E", "CD2", "MS4A1", "CD79A"),
    "adipocyte": ("ADIPOQ", "PLIN1", "FABP4", "LEP"),
    "induced_by_lymphocyte": ("CXCL9", "CXCL10", "IDO1"),
    "induced_by_tumour": ("POSTN", "MMP11"),
}
# Programme -> cell types expressing it highly.
PROGRAMME_TYPES: dict[str, tuple[int, ...]] = {
    "tumour": (TUMOUR,),
    "epithelial": (TUMOUR, DUCT),
    "normal_duct": (DUCT,),
    "stroma": (STROMA,),
    "lymphocyte": (LYMPHOCYTE,),
    "adipocyte": (ADIPOCYTE,),
}
# Induced programme -> (source type whose neighbour fraction induces it, responding types).
INDUCTIONS: dict[str, tuple[int, tuple[int, ...]]] = {
    "induced_by_lymphocyte": (LYMPHOCYTE, (TUMOUR, STROMA, ADIPOCYTE, DUCT)),
    "induced_by_tumour": (TUMOUR, (STROMA,)),
}
N_NAMED_GENES = sum(len(g) for g in GENE_PROGRAMMES.values())


def _default_region_bias() -> dict[str, float]:
    return {"tumour": 0.5, "stroma": 0.45, "lymphocyte": -0.3, "adipocyte": -0.1,
            "normal_duct": 0.25}


def _default_cell_spacing() -> dict[str, float]:
    return {"tumour": 8.5, "stroma": 13.0, "lymphocyte": 5.5, "adipocyte": 46.0}


def _default_library_size() -> dict[str, float]:
    return {"tumour": 110.0, "stroma": 70.0, "lymphocyte": 40.0, "adipocyte": 220.0,
            "normal_duct": 90.0}


@dataclass
class PatientEffects:
    """How the patients of a cohort differ (config ``synthetic.patient_effects``); every sd 0
    (the default): no patient effects, the generator's output is the same as without a patient.

    Drawn once per (dataset seed, patient) by :func:`histomap.data.synthetic_patient.draw_patient`
    and shared by every section of that patient, on top of the per-section variation:

    ``stain_sd``: the H and E stain vectors (unit optical-density vectors, Ruifrok & Johnston's)
    each times a log-normal factor per RGB component with this sd, renormalised (the stains'
    hue); ``intensity_sd``: the amount of H and of E, each times a log-normal factor with this
    sd (how dark the staining is); ``level_sd``: a per-gene log-expression level shift (every
    cell's rate of a gene times ``exp(N(0, level_sd))``); ``composition_sd``: a shift of the
    cell-type region biases (``N(0, composition_sd)`` per type, added to the section's own).
    """
    stain_sd: float = 0.0
    intensity_sd: float = 0.0
    level_sd: float = 0.0
    composition_sd: float = 0.0

    def __post_init__(self):
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"patient_effects.{f.name} must be a number, got {value!r}")
            elif not math.isfinite(value) or value < 0:
                problems.append(f"patient_effects.{f.name} must be >= 0 and finite, got {value}")
            else:
                setattr(self, f.name, float(value))
        if problems:
            raise InputError("config `synthetic.patient_effects`", "; ".join(problems))

    @classmethod
    def of(cls, value) -> PatientEffects:
        """From a config mapping (None: off); an unknown key is an error naming it."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InputError("config `synthetic.patient_effects`",
                             f"must be a mapping of sds, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InputError("config `synthetic.patient_effects`",
                             f"unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in fields(self))


@dataclass
class SyntheticConfig:
    """Every parameter of a synthetic sample; lengths in um unless named ``_px``.

    ``patient``: the section's patient (a string or an integer, one identity by its string
    form); with ``patient_effects`` (a :class:`PatientEffects` or its mapping; off by default)
    the sections of one patient share its staining, expression levels and composition shift.
    """
    seed: int = 0
    size_um: tuple[float, float] = (1500.0, 1500.0)     # (width, height)
    mpp: float = 0.5                                      # um per level-0 pixel of he.tif
    n_genes: int = 60
    spot_diameter_um: float = 55.0
    spot_spacing_um: float = 100.0                        # centre-to-centre
    spot_grid: str = "hex"                                # "hex" (Visium-like) or "square"
    tissue_margin_um: float = 60.0                        # glass at least this wide at borders
    tissue_roughness: float = 0.18                        # blob outline wobble
    region_scale_um: float = 45.0                         # smoothing sigma of the type fields
    region_bias: dict[str, float] = field(default_factory=_default_region_bias)
    cell_spacing_um: dict[str, float] = field(default_factory=_default_cell_spacing)
    gland_spacing_um: float = 60.0
    lumen_radius_um: tuple[float, float] = (7.0, 14.0)
    gland_epithelium_um: float = 9.0
    lymphocyte_infiltration: float = 0.06                 # fraction of lattice sites in stroma
    library_size: dict[str, float] = field(default_factory=_default_library_size)
    library_log_sd: float = 0.25
    neighbourhood_um: float = 40.0
    induction_strength: float = 0.04                      # fraction of library per gene at 100%
    grid_um: float = 2.0                                  # resolution of the layout fields
    dataset_seed: int | None = None                       # the biology (None: the section seed)
    composition_sd: float = 0.15                          # per-section shift of region biases
    stain_sd: float = 0.05                                # per-section stain (log OD scale) sd
    depth_log_sd: float = 0.2                             # per-section library-size factor sd
    batch_effect_sd: float = 0.0                          # per-section profile noise (log), off
    patient: str | int | None = None                      # the section's patient (sheet column)
    patient_effects: PatientEffects = field(default_factory=PatientEffects)  # off: every sd 0

    def __post_init__(self):
        self.size_um = (float(self.size_um[0]), float(self.size_um[1]))
        self.lumen_radius_um = (float(self.lumen_radius_um[0]), float(self.lumen_radius_um[1]))
        problems = []
        if self.mpp <= 0:
            problems.append(f"mpp must be positive, got {self.mpp}")
        if min(self.size_um) <= 2 * self.tissue_margin_um + 50:
            problems.append(f"size_um {self.size_um} too small for margin "
                            f"{self.tissue_margin_um} um")
        if self.n_genes < N_NAMED_GENES:
            problems.append(f"n_genes must be >= {N_NAMED_GENES} (the named programmes)")
        if self.spot_grid not in ("hex", "square"):
            problems.append(f"spot_grid must be 'hex' or 'square', got {self.spot_grid!r}")
        if self.spot_diameter_um <= 0 or self.spot_spacing_um <= 0:
            problems.append("spot_diameter_um and spot_spacing_um must be positive")
        for name in ("composition_sd", "stain_sd", "depth_log_sd", "batch_effect_sd"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        self.patient_effects = PatientEffects.of(self.patient_effects)
        if self.patient is not None and (isinstance(self.patient, bool)
                                         or not isinstance(self.patient, (str, Integral))
                                         or str(self.patient) == ""):
            problems.append(f"patient must be a non-empty string or an integer, "
                            f"got {self.patient!r}")
        elif isinstance(self.patient, Integral):
            self.patient = int(self.patient)   # numpy integers too (meta.json is JSON)
        elif self.patient is None and self.patient_effects.active:
            problems.append("patient_effects need the section's `patient` (the sample sheet's "
                            "patient column)")
        if problems:  # config `synthetic` (histomap/plan/schemas/config.schema.yaml has the limits)
            raise InputError("config `synthetic`", "; ".join(problems))

    @property
    def shape_px(self) -> tuple[int, int]:
        """(height, width) of the level-0 image in pixels."""
        return (int(round(self.size_um[1] / self.mpp)), int(round(self.size_um[0] / self.mpp)))
