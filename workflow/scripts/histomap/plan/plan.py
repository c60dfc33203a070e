"""The workflow's plan: config + sample sheet -> samples, folds, models, cross-scale settings,
super-resolution runs, applications and the files of every rule (the whole picture of
DESIGN.md, planned once at start-up).

``Plan.from_config(config)`` builds it from a schema-validated config (schema defaults filled
in; :func:`histomap.plan.validate_config` does both) and runs every start-up check, so a bad
config fails in the first second with a message naming the key or the sheet. The rule files
call its parts through the thin wrappers of ``workflow/rules/common.smk``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from histomap.plan.apply import ApplyPlan, ApplySuperRes, apply_sr_settings
from histomap.plan.crossscale import CrossScale
from histomap.plan.encoders import check_encoders
from histomap.plan.folds import Folds
from histomap.plan.models import ModelSet
from histomap.plan.nested import NestedPlan
from histomap.plan.samples import SampleSheet
from histomap.plan.stain import check_stain
from histomap.plan.superres import SuperRes
from histomap.plan.targets import BenchmarkFiles


@dataclass
class Plan:
    """Every part of the plan; ``files`` lists the benchmark's files."""

    config: dict
    sheet: SampleSheet
    folds: Folds
    models: ModelSet
    cross_scale: CrossScale
    sr: SuperRes
    apply: ApplyPlan
    apply_sr: ApplySuperRes
    benchmark: bool
    train_seeds: list[int]
    gene_panel: str
    nested: NestedPlan

    @classmethod
    def from_config(cls, config: dict, workdir: str | Path | None = None) -> Plan:
        """The plan of a validated config; relative paths (the sheet, data_dir) start at
        ``workdir`` (None: the current directory, as Snakemake reads them)."""
        sheet = SampleSheet.from_config(config, workdir)
        # `benchmark: false`: no folds, metrics or tables (e.g. one ST sample): only train_final
        # bundles and `apply`. Image-only samples (`he`) have no spots: never in folds or panels.
        benchmark = bool(config.get("benchmark", True))
        folds = Folds.from_config(config, sheet)
        models = ModelSet(config)
        train_seeds = [int(s) for s in config.get("train_seeds", [config["seed"]])]
        nested = NestedPlan(config, sheet, folds, models, train_seeds)  # adds the inner folds
        cross_scale = CrossScale(config, sheet, folds, models)
        sheet.check_distinct()
        cross_scale.check_train_diameters()
        folds.check_final_name(sheet.path)
        apply = ApplyPlan(config, sheet, models, final_seed=train_seeds[0])
        sr = SuperRes(config, sheet, folds, benchmark=benchmark,
                      apply_methods=apply_sr_settings(config)["methods"])
        apply_sr = ApplySuperRes(config, sheet, sr)
        sr.check_methods()
        check_encoders(config, models, sr, workdir)
        check_stain(models)
        return cls(config, sheet, folds, models, cross_scale, sr, apply, apply_sr, benchmark,
                   train_seeds, config["genes"]["name"], nested)

    @cached_property
    def files(self) -> BenchmarkFiles:
        return BenchmarkFiles(self)

    @property
    def keep_dense_maps(self) -> bool:
        """``predict.keep_dense_maps`` (default true): false makes a benchmark run's dense maps
        temporary (deleted after scoring) and leaves them out of the SpatialData."""
        return bool(self.config.get("predict", {}).get("keep_dense_maps", True))

    @property
    def final_seed(self) -> int:
        """The training seed of train_final's bundles: the first of train_seeds."""
        return self.train_seeds[0]

    @staticmethod
    def tile_files(write_tiles: bool) -> dict[str, str]:
        """tile_slide's files: the index always, the tile images only with tiling.write_tiles."""
        out = {"index": "results/tiles/{sample}.parquet"}
        if write_tiles:
            out["zarr"] = "results/tiles/{sample}.zarr"
        return out

    def report_metric_files(self) -> list[str]:
        """benchmark_tables' inputs: every run's metrics and the nested rows'."""
        return [*self.files.metric_files(), *self.nested.metric_files()]

    def apply_targets(self) -> list[str]:
        """The bundles, their applications and the super-resolution applications."""
        return self.apply.targets() + self.apply_sr.targets()

    def all_targets(self) -> list[str]:
        """`rule all`: the benchmark (unless `benchmark: false`), every sample's tiles and the
        applications."""
        tiles = self.tile_files(self.config["tiling"].get("write_tiles", False))
        return [
            *(self.files.benchmark_targets() if self.benchmark else []),
            *(self.nested.report_files() if self.benchmark else []),
            *[pattern.format(sample=s) for pattern in tiles.values() for s in self.sheet.names],
            *self.apply_targets(),
        ]

    def describe(self) -> str:
        """A few lines on what the config plans (``histomap validate`` prints them)."""
        sheet, sr_runs = self.sheet, self.sr.runs()
        lines = [
            f"sample sheet {sheet.path}: {len(sheet.names)} samples "
            f"({len(sheet.st_samples)} with spots)",
            f"folds: {', '.join(self.folds.names) or 'none (benchmark: false)'}",
            f"models: {', '.join(self.models.names)}; training seeds "
            f"{', '.join(map(str, self.train_seeds))}",
            f"cross-scale: {', '.join(self.cross_scale.models()) or 'off'}",
            *self.nested.describe(),
            f"super-resolution: {len(sr_runs)} runs ({', '.join(self.sr.method_names())})"
            if sr_runs else "super-resolution: off",
            f"apply: {', '.join(self.apply.bundles) or 'nothing'}",
            f"{len(self.all_targets())} target files",
        ]
        return "\n".join(lines)
