"""The super-resolution task's plan (Diff-ST's table; arrow: spots -> SR pairs -> model ->
HR maps -> metrics).

Per fold, sample and SR factor: aligned LR/HR/H&E pairs of the fold's gene panel. Per method,
factor and fold: train on the fold's training samples' pairs, predict its test samples; per
method and factor: score every fold's test samples. Methods are the `superres.models` entries
(``base`` chains resolved by :func:`histomap.plan.inherit.resolve_base`) or bare architecture
names; the architectures are the diffusion methods of :mod:`histomap.tasks.superres` and the
baselines of :data:`histomap.models.srnets.SR_BASELINES` (they import torch: a name is first
looked up in the schema's list of `method` values, which a test keeps equal to the registries).
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from histomap.plan.folds import Folds
from histomap.plan.inherit import resolve_base
from histomap.plan.models import alternation
from histomap.plan.samples import SampleSheet

SR_SPOT_GRID_PLATFORMS = ("legacy_st", "visium")  # LR = pooled neighbouring spots
# settings of build_sr_pairs (the rest of the block configures methods and the report)
SR_PAIR_KEYS = ("normalisation", "patch_um", "lr_um", "stride_um", "edge", "min_tissue",
                "image_mpp", "mask_mpp", "spot_grid")


SCHEMA = Path(__file__).parent / "schemas" / "superres.schema.yaml"


@functools.cache
def sr_architectures() -> tuple[str, ...]:
    """Every SR architecture: the diffusion methods, then the baselines (their registries;
    importing them imports torch)."""
    from histomap.models.srnets import SR_BASELINES
    from histomap.tasks.superres import DIFFUSION_METHODS

    return (*DIFFUSION_METHODS, *SR_BASELINES)


@functools.cache
def _schema_architectures() -> frozenset[str]:
    """The `method` values superres.schema.yaml accepts: the registries' names (test_plan keeps
    them equal), read without importing torch, so planning at start-up stays quick."""
    schema = yaml.safe_load(SCHEMA.read_text())
    models = schema["properties"]["models"]["additionalProperties"]
    return frozenset(models["properties"]["method"]["enum"])


def is_sr_architecture(name: str) -> bool:
    """Whether ``name`` is an SR architecture (the registries are imported only for a name the
    schema does not list)."""
    return name in _schema_architectures() or name in sr_architectures()


class SuperRes:
    """The `superres` block over the sheet's samples and the benchmark's folds.
    ``apply_methods``: the methods of `apply.superres` (trained on fold `final`)."""

    def __init__(self, config: dict, sheet: SampleSheet, folds: Folds, *, benchmark: bool,
                 apply_methods: list[str] | None = None):
        self.config, self.sheet, self.folds = config, sheet, folds
        self.settings = config.get("superres") or {"enabled": False}
        self.benchmark = benchmark
        self.apply_methods = list(apply_methods or [])
        for name, entry in (self.settings.get("models") or {}).items():
            if "based_on" in (entry or {}):  # the key's old name: not a network setting
                raise ValueError(f"config superres.models.{name}: `based_on` is now `base` "
                                 "(the key model variants use too); rename it")

    # ------------------------------------------------------------------ methods
    def method_names(self) -> list[str]:
        """Configured SR methods of the benchmark: the Table-1 rows, then the ablations."""
        sr = self.settings
        return list(dict.fromkeys([*sr.get("methods", []), *sr.get("ablations", [])]))

    def all_method_names(self) -> list[str]:
        """SR methods of the benchmark and of `apply.superres` (trained on fold `final`)."""
        return list(dict.fromkeys([*self.method_names(), *self.apply_methods]))

    def check_methods(self) -> None:
        """Every configured method (benchmark and apply) resolves to a known architecture."""
        for name in self.all_method_names():
            self.method(name)

    def method(self, name: str) -> tuple[str, dict]:
        """(architecture, settings) of a configured SR method, `base` chains resolved."""
        resolved = resolve_base(name, self.settings.get("models", {}), where="superres.models")
        entry = resolved.settings
        arch = entry.pop("method", resolved.root)  # a `base` chain ending at an architecture
        if not is_sr_architecture(arch):
            raise ValueError(
                f"config superres: method {name!r} is neither configured under superres.models "
                f"nor one of {', '.join(sr_architectures())}"
            )
        return arch, entry

    def methods_of(self, kind: str) -> str:
        """Wildcard regex of the configured SR methods (benchmark and apply) built on Diff-ST
        (``kind="diffst"``: Diff-ST and its ablations) or on anything else (``"baseline"``)."""
        return alternation([m for m in self.all_method_names()
                            if (self.method(m)[0] == "diffst") == (kind == "diffst")])

    def model_config(self, name: str) -> dict:
        """Network settings and task options of an SR method (its `train:` and `diffusion:`
        overrides removed)."""
        entry = self.method(name)[1]
        entry.pop("train", None)
        entry.pop("diffusion", None)
        return entry

    def train_config(self, name: str) -> dict:
        """`train`, then `superres.train`, then the method's own `train:` overrides."""
        entry = self.method(name)[1]
        return {**self.config["train"], **self.settings.get("train", {}),
                **entry.get("train", {})}

    def diffusion_config(self, name: str) -> dict:
        """`superres.diffusion` with the method's own `diffusion:` overrides."""
        return {**self.settings.get("diffusion", {}), **self.method(name)[1].get("diffusion", {})}

    def validation(self) -> dict:
        return {**self.config["validation"], **self.settings.get("validation", {})}

    def pair_settings(self, fold: str | None = None, sample: str | None = None) -> dict:
        """build_sr_pairs' settings for ``sample`` in ``fold``: a training sample's spot-grid
        patches are laid at ``spot_grid.train_stride_spots`` when it is set (overlapping
        training patches), a test sample's always at ``stride_spots`` (side by side)."""
        settings = {k: self.settings[k] for k in SR_PAIR_KEYS if k in self.settings}
        grid = dict(settings.get("spot_grid") or {})
        train_stride = grid.pop("train_stride_spots", None)
        if "spot_grid" in settings:
            settings["spot_grid"] = grid
        if (train_stride is not None and fold is not None
                and sample in self.folds.samples(fold, "train")):
            grid["stride_spots"] = int(train_stride)
        return settings

    # ------------------------------------------------------------------ samples and runs
    def sample_scales(self, sample: str) -> list[int]:
        """SR factors of a sample: `superres.scales` of its platform."""
        return [int(s) for s in self.settings.get("scales", {}).get(self.sheet.platform(sample),
                                                                    [])]

    def fold_samples(self, fold: str, part: str, scale) -> list[str]:
        return [s for s in self.folds.samples(fold, part) if int(scale) in self.sample_scales(s)]

    def runs(self) -> list[tuple[str, int, str]]:
        """(method, scale, fold) of the benchmark: folds with training and test samples at a
        scale."""
        if not self.settings.get("enabled", False) or not self.benchmark:
            return []
        scales = sorted({sc for s in self.sheet.names for sc in self.sample_scales(s)})
        runs = [(m, sc, f) for m in self.method_names() for sc in scales for f in self.folds.names
                if self.fold_samples(f, "train", sc) and self.fold_samples(f, "test", sc)]
        if not runs:
            raise ValueError(
                "config superres: enabled, but no fold has training and test samples at a scale "
                "configured for their platform (superres.scales)"
            )
        return runs

    def test_runs(self, method: str, scale) -> list[tuple[str, str]]:
        """(fold, test sample) scored for a method and factor, every fold of the benchmark."""
        return [(f, s) for m, sc, f in self.runs() if m == method and sc == int(scale)
                for s in self.fold_samples(f, "test", sc)]

    # ------------------------------------------------------------------ files
    @staticmethod
    def pairs_file(fold: str, sample: str, scale) -> str:
        """SR pairs of a sample for one fold: the channels are the fold's gene panel, chosen
        from its training samples only."""
        return f"results/sr/pairs/{fold}/{sample}_x{scale}.zarr"

    @staticmethod
    def maps_file(method: str, scale, fold: str, sample: str) -> str:
        return f"results/sr/predictions/{method}/x{scale}/{fold}/{sample}/maps.zarr"

    def pairs_inputs(self, fold: str, sample: str, genes: str) -> dict[str, str]:
        """build_sr_pairs' inputs: spot grids pool measured spots, the others bin high-res data."""
        counts = "spots" if self.sheet.platform(sample) in SR_SPOT_GRID_PLATFORMS else "highres"
        return {"slide": f"results/ingest/{sample}/slide.tif",
                "counts": f"results/ingest/{sample}/{counts}.h5ad", "genes": genes}

    def train_inputs(self, fold: str, scale) -> list[str]:
        return [self.pairs_file(fold, s, scale) for s in self.fold_samples(fold, "train", scale)]

    def evaluate_inputs(self, method: str, scale) -> dict[str, list[str]]:
        runs = self.test_runs(method, scale)
        return {"pairs": [self.pairs_file(f, s, scale) for f, s in runs],
                "maps": [self.maps_file(method, scale, f, s) for f, s in runs]}

    def metric_files(self) -> list[str]:
        runs = dict.fromkeys((m, sc) for m, sc, _ in self.runs())
        return [f"results/sr/metrics/{m}/x{sc}.parquet" for m, sc in runs]

    def calibration_files(self) -> list[str]:
        """Error by std decile of every method and factor (evaluate_sr; empty tables for methods
        without samples' std)."""
        return [p.replace(".parquet", "_calibration.csv") for p in self.metric_files()]

    def report_files(self) -> list[str]:
        """The SR tables (none without SR runs)."""
        if not self.runs():
            return []
        return [f"results/report/superres.{ext}" for ext in ("csv", "md", "html")]

    def figure_files(self) -> list[str]:
        """SR panels of every Table-1 method and factor (first fold, first held-out sample)."""
        methods = set(self.settings.get("methods", []))
        runs = dict.fromkeys((m, sc) for m, sc, _ in self.runs() if m in methods)
        return [f"results/report/figures/superres/{m}_x{sc}.png" for m, sc in runs]

    def figure_inputs(self, method: str, scale) -> dict[str, str]:
        fold, sample = self.test_runs(method, scale)[0]
        return {"pairs": self.pairs_file(fold, sample, scale),
                "maps": self.maps_file(method, scale, fold, sample)}

    def training_logs(self) -> list[tuple[str, str]]:
        """(label, train_log.csv) of every super-resolution run."""
        return [(f"SR {m} x{sc}/{f}", f"results/sr/models/{m}/x{sc}/{f}/train_log.csv")
                for m, sc, f in self.runs()]
