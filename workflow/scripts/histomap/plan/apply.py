"""Train once, apply anywhere (arrow: model -> applied to H&E-only slides -> maps, tables,
figures for the user).

:class:`ApplyPlan`: bundles (one train_final bundle per `apply.models` entry, or `apply.bundle`
made elsewhere, read with :func:`histomap.tasks.bundle.read_bundle`) applied to `apply.samples`
(default: the sheet's H&E-only samples): per bundle and sample the dense map (dense models),
pseudo-spot and bin tables and a figure; per sample one SpatialData.

:class:`ApplySuperRes` (`apply.superres`): an SR bundle per method trained on fold `final`
(every ST sample with the factor in superres.scales for its platform), applied to each sample's
measured spots as the LR map: results/apply/superres/{method}/x{factor}/{sample}/.
"""
from __future__ import annotations

from pathlib import Path

from histomap.models import DENSE_MODELS
from histomap.plan.crossscale import scale_label
from histomap.plan.folds import FINAL_FOLD
from histomap.plan.models import ModelSet, alternation
from histomap.plan.samples import IMAGE_ONLY_PLATFORMS, SampleSheet
from histomap.plan.superres import SuperRes

APPLY_DEFAULTS = {"models": [], "bundle": None, "samples": None, "spot_diameters_um": [55],
                  "spot_spacing_um": None, "bin_um": [], "figure_genes": 4}
APPLY_SR_DEFAULTS = {"methods": [], "factor": None, "samples": None, "figure_patches": 2}


def apply_settings(config: dict) -> dict:
    """The `apply` block over its defaults."""
    return {**APPLY_DEFAULTS, **(config.get("apply") or {})}


def apply_sr_settings(config: dict) -> dict:
    """The `apply.superres` block over its defaults (no methods: off)."""
    return {**APPLY_SR_DEFAULTS, **(apply_settings(config).get("superres") or {})}


def read_bundle_architecture(folder: str | Path) -> tuple[str, str, bool]:
    """(name, architecture, stain-normalised) recorded in a bundle made elsewhere (its
    bundle.json; the weights are checked by the apply jobs)."""
    from histomap.errors import InputError
    from histomap.tasks.bundle import read_bundle

    try:
        bundle = read_bundle(folder, check_weights=False)
        stained = bundle.stain is not None
    except InputError as exc:
        raise ValueError(f"config apply.bundle: {exc}") from exc
    return bundle.name, bundle.architecture, stained


class ApplyPlan:
    """``bundles``: {bundle name: (bundle folder, architecture)}; ``samples``: applied to."""

    def __init__(self, config: dict, sheet: SampleSheet, models: ModelSet, final_seed: int):
        self.settings = apply_settings(config)
        self.sheet, self.final_seed = sheet, final_seed
        self.bundles = self._bundles(models)
        samples = self.settings["samples"]
        self.samples = list(samples) if samples is not None else sheet.image_only_samples
        for s in self.samples:
            if s not in sheet:
                raise ValueError(f"config: apply.samples names {s!r}, which is not in "
                                 f"{sheet.path}")
        self.spot_labels = [scale_label(um) for um in self.settings["spot_diameters_um"]]
        self.bin_labels = [scale_label(um) for um in self.settings["bin_um"]]
        spot_bundles = [b for b in self.bundles if not self.is_dense(b)]
        if spot_bundles and self.samples and not self.spot_labels:
            raise ValueError(
                f"config apply.spot_diameters_um is empty, but spot models {spot_bundles} "
                "predict pseudo-spots only (bins need a dense model)"
            )

    def bundle_dir(self, model: str) -> str:
        """train_final's bundle folder of a configured model."""
        return f"results/bundles/{model}/seed{self.final_seed}"

    def _bundles(self, models: ModelSet) -> dict[str, tuple[str, str, bool]]:
        """`apply.bundle` (made elsewhere, read now) or one train_final bundle per
        `apply.models` entry: (folder, architecture, whether its slides are stain-normalised)."""
        from histomap.plan.stain import stain_method

        if self.settings["bundle"]:
            folder = self.sheet.on_disk(self.settings["bundle"])
            name, architecture, stained = read_bundle_architecture(folder)
            return {name: (str(Path(self.settings["bundle"])), architecture, stained)}
        unknown = [m for m in self.settings["models"] if m not in models.names]
        if unknown:
            raise ValueError(f"config: apply.models {unknown} are not in `models` "
                             f"{models.names}")
        return {m: (self.bundle_dir(m), models.family(m),
                    stain_method(models.block(m)) is not None)
                for m in self.settings["models"]}

    def slide(self, name: str, sample: str) -> str:
        """The slide a bundle reads for ``sample``: as ingested, or normalised to the bundle's
        stain reference (apply_stain_slide)."""
        if self.bundles[name][2]:
            return f"results/apply/{name}/{sample}/slide_stain_normalised.tif"
        return f"results/ingest/{sample}/slide.tif"

    def bundle(self, name: str) -> str:
        return self.bundles[name][0]

    def is_dense(self, name: str) -> bool:
        return self.bundles[name][1] in DENSE_MODELS

    @property
    def figure_runs(self) -> str:
        """Wildcard regex of every applied bundle (apply_figure: never results/apply/superres/)."""
        return alternation(list(self.bundles))

    def runs(self, dense: bool) -> str:
        """Wildcard regex of the applied bundles that are (not) dense models."""
        return alternation([b for b in self.bundles if self.is_dense(b) == dense])

    def tables(self, name: str, sample: str) -> list[str]:
        folder = f"results/apply/{name}/{sample}"
        spots = [f"{folder}/spots_{um}um.h5ad" for um in self.spot_labels]
        bins = ([f"{folder}/bins_{um}um.h5ad" for um in self.bin_labels]
                if self.is_dense(name) else [])
        return spots + bins

    @staticmethod
    def spatialdata_file(sample: str) -> str:
        """One SpatialData per applied sample, every applied bundle in it."""
        return f"results/spatialdata/apply/{sample}.zarr"

    def sample_dense(self, sample: str) -> dict[str, str]:
        """{bundle name: dense.zarr} of the dense bundles applied to ``sample``."""
        return {name: f"results/apply/{name}/{sample}/dense.zarr"
                for name in self.bundles if self.is_dense(name)}

    def sample_tables(self, sample: str) -> dict[str, str]:
        """{SpatialData element name: table} of every applied bundle's pseudo-spots and bins of
        ``sample`` (e.g. pixnet_spots_55um)."""
        return {f"{name}_{Path(path).stem}": path
                for name in self.bundles for path in self.tables(name, sample)}

    def targets(self) -> list[str]:
        """Bundles of `apply.models`, and per applied bundle and sample: the dense map (dense
        models), the pseudo-spot and bin tables and the figure; per applied sample its
        SpatialData."""
        bundles = ([f"{self.bundle_dir(m)}/bundle.json" for m in self.settings["models"]]
                   if not self.settings["bundle"] else [])
        outputs = []
        for name in self.bundles:
            for s in self.samples:
                folder = f"results/apply/{name}/{s}"
                outputs += self.tables(name, s) + [f"{folder}/map.png"]
                if self.is_dense(name):
                    outputs.append(f"{folder}/dense.zarr")
        sdata = [self.spatialdata_file(s) for s in self.samples] if self.bundles else []
        return bundles + outputs + sdata


class ApplySuperRes:
    """`apply.superres`: SR bundles trained on fold `final`, applied to measured spots."""

    def __init__(self, config: dict, sheet: SampleSheet, sr: SuperRes):
        self.settings = apply_sr_settings(config)
        self.sheet, self.sr = sheet, sr
        if not self.settings["methods"]:
            return
        if self.settings["factor"] is None:
            raise ValueError("config: apply.superres.methods is set, but apply.superres.factor "
                             "is not")
        for method in self.settings["methods"]:
            sr.method(method)  # known method or configured superres.models entry
        self.train_samples()
        self.samples()

    @property
    def factor(self) -> int:
        return int(self.settings["factor"])

    def train_samples(self) -> list[str]:
        """The ST samples an SR bundle trains on: those with the factor for their platform."""
        train = [s for s in self.sheet.st_samples if self.factor in self.sr.sample_scales(s)]
        if not train:
            raise ValueError(
                f"config apply.superres.factor {self.factor}: no ST sample of {self.sheet.path} "
                "has it in superres.scales for its platform, so no SR bundle can be trained"
            )
        return train

    def samples(self) -> list[str]:
        """Samples super-resolved from their measured spots (null: every ST sample)."""
        chosen = self.settings["samples"]
        names = list(chosen) if chosen is not None else self.sheet.st_samples
        for s in names:
            if s not in self.sheet:
                raise ValueError(f"config: apply.superres.samples names {s!r}, which is not in "
                                 f"{self.sheet.path}")
            if self.sheet.platform(s) in IMAGE_ONLY_PLATFORMS:
                raise ValueError(
                    f"config: apply.superres.samples names {s!r}, an H&E-only sample: "
                    "super-resolution needs measured spots as its LR map"
                )
        return names

    def sample_dir(self, method: str, sample: str) -> str:
        return f"results/apply/superres/{method}/x{self.factor}/{sample}"

    def targets(self) -> list[str]:
        """Per method: its SR bundle and, per sample, the LR-only inputs' predicted HR maps
        (maps.zarr, bins.h5ad) and the figure."""
        if not self.settings["methods"]:
            return []
        return [
            path
            for m in self.settings["methods"]
            for path in [
                f"results/sr/models/{m}/x{self.factor}/{FINAL_FOLD}/model.pt",
                *[f"{self.sample_dir(m, s)}/{name}" for s in self.samples()
                  for name in ("maps.zarr", "bins.h5ad", "map.png")],
            ]
        ]
