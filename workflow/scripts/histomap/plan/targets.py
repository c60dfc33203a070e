"""File lists of the benchmark (arrows: spots -> model -> dense map -> spots at any scale ->
metrics -> tables and figures): what each training job reads, what each run predicts, and the
targets of `rule all`.

Runs are (model, fold, training seed): ``results/{models,predictions}/{model}/{fold}/seed{t}``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from histomap.models import BASELINE_MODELS
from histomap.plan.crossscale import scale_label
from histomap.plan.folds import FINAL_FOLD
from histomap.plan.stain import StainFiles

if TYPE_CHECKING:
    from histomap.plan.plan import Plan


def run_dir(kind: str, model: str, fold: str, tseed) -> str:
    """results/{kind}/{model}/{fold}/seed{tseed} (kind: models or predictions)."""
    return f"results/{kind}/{model}/{fold}/seed{tseed}"


class BenchmarkFiles:
    """The benchmark's files, from a :class:`~histomap.plan.plan.Plan`."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.stain = StainFiles(plan.models, plan.folds)

    # ------------------------------------------------------------------ training inputs
    def genes_for_fold(self, fold: str) -> str:
        """The gene panel of a fold, chosen from that fold's training samples only
        (select_genes); every model, the cross-scale task and the SR pairs of the fold use it."""
        return f"results/genes/{self.plan.gene_panel}/{fold}.tsv"

    def extra_spots_of(self, model: str, train: list[str]) -> list[list[str]]:
        """Per training sample, the extra spot tables a dense model trains on besides its own
        spots (`train_diameters_um`: the high-resolution data re-measured with discs of those
        sizes by truth_at_scale, the discs that pass the spot QC; samples without
        high-resolution data have none)."""
        diameters = self.plan.models.block(model).get("train_diameters_um", [])
        return [
            ([f"results/scales/{s}/qc_{scale_label(um)}um.h5ad" for um in diameters]
             if self.plan.sheet.has_highres(s) else [])
            for s in train
        ]

    def extra_train_spots(self, model: str, fold: str) -> list[list[str]]:
        return self.extra_spots_of(model, self.plan.folds.samples(fold, "train"))

    def feature_cache_files(self, model: str, fold: str) -> list[str]:
        """The training samples' encode_slide caches a model trains from (`feature_cache: true`
        in its block; the probe always): results/features/{encoder}/{mpp}/{sample}.zarr."""
        block = self.plan.models.block(model)
        if not (self.plan.models.family(model) == "probe" or block.get("feature_cache")):
            return []
        encoder = block.get("encoder") or block.get("backbone")
        folder = self.stain.feature_dir(model, fold, encoder, scale_label(block["input_mpp"]))
        return [f"{folder}/{s}.zarr" for s in self.plan.folds.samples(fold, "train")]

    def train_inputs(self, model: str, fold: str) -> dict:
        """train_{model}'s inputs: the fold's training spots and slides, its gene panel, extra
        spot sizes and cached features."""
        train = self.plan.folds.samples(fold, "train")
        extra = self.extra_train_spots(model, fold)
        return {
            "st": [f"results/st/{s}.h5ad" for s in train],
            "slides": [self.stain.slide(model, fold, s) for s in train],
            "genes": self.genes_for_fold(fold),
            "extra": [path for paths in extra for path in paths],
            "features": self.feature_cache_files(model, fold),
        }

    def final_train_samples(self) -> list[str]:
        """Every ST sample of the sheet: what train_final trains a bundle on."""
        from histomap.plan.samples import IMAGE_ONLY_PLATFORMS

        st = self.plan.sheet.st_samples
        if not st:
            raise ValueError(
                f"{self.plan.sheet.path}: train_final needs ST samples; the sheet has only "
                f"H&E-only ({', '.join(IMAGE_ONLY_PLATFORMS)}) samples. Point "
                "`apply.bundle` at a bundle trained elsewhere instead"
            )
        return st

    def final_inputs(self, model: str) -> dict:
        """train_final's inputs: every ST sample, the `final` gene panel."""
        train = self.final_train_samples()
        extra = self.extra_spots_of(model, train)
        inputs = {
            "st": [f"results/st/{s}.h5ad" for s in train],
            "slides": [self.stain.slide(model, FINAL_FOLD, s) for s in train],
            "genes": self.genes_for_fold(FINAL_FOLD),
            "extra": [path for paths in extra for path in paths],
        }
        if self.stain.method(model):  # recorded in the bundle, applied to every new slide
            inputs["stain_reference"] = self.stain.reference(model, FINAL_FOLD)
        return inputs

    # ------------------------------------------------------------------ predictions, metrics
    def native_prediction(self, model: str, fold: str, tseed, sample: str) -> str:
        """A run's spot table of ``sample`` at its own spot diameter."""
        um = scale_label(self.plan.sheet.spot_diameter_um(sample))
        return f"{run_dir('predictions', model, fold, tseed)}/{sample}/spots_{um}um.h5ad"

    def prediction_files(self, model: str, fold: str, tseed) -> list[str]:
        return [self.native_prediction(model, fold, tseed, s)
                for s in self.plan.folds.samples(fold, "test")]

    def extra_scale_files(self) -> list[str]:
        """Spot tables of the dense models at `predict_spot_diameters_um` (native centres)."""
        plan = self.plan
        return [
            f"{run_dir('predictions', m, f, t)}/{s}/spots_{scale_label(um)}um.h5ad"
            for m in plan.models.names
            if plan.models.is_dense(m)
            for um in plan.models.block(m).get("predict_spot_diameters_um", [])
            for f in plan.folds.names
            for t in plan.train_seeds
            for s in plan.folds.samples(f, "test")
        ]

    def metric_files(self) -> list[str]:
        """Spot metrics of every run; cross-scale metrics of the cross-scale runs."""
        plan, cross = self.plan, self.plan.cross_scale
        spot = [f"results/metrics/spot/{m}/{f}/seed{t}.parquet"
                for m in plan.models.names for f in plan.folds.names for t in plan.train_seeds]
        scales = [f"results/metrics/cross_scale/{m}/{f}/seed{t}.parquet"
                  for m in cross.models() for f in cross.scored(m) for t in plan.train_seeds]
        return spot + scales

    # ------------------------------------------------------------------ per sample
    def sample_runs(self, sample: str) -> list[tuple[str, str, int, str]]:
        """(model, fold, training seed, run name) of every run that holds ``sample`` out."""
        plan = self.plan
        return [(m, f, t, f"{m}_{f}_seed{t}") for m in plan.models.names for f in plan.folds.names
                if sample in plan.folds.samples(f, "test") for t in plan.train_seeds]

    def sample_dense_maps(self, sample: str) -> dict[str, str]:
        """{run name: dense.zarr} of the dense models' runs that hold ``sample`` out; none with
        ``predict.keep_dense_maps: false`` (the maps are deleted after scoring)."""
        if not self.plan.keep_dense_maps:
            return {}
        return {name: f"{run_dir('predictions', m, f, t)}/{sample}/dense.zarr"
                for m, f, t, name in self.sample_runs(sample) if self.plan.models.is_dense(m)}

    def sample_predictions(self, sample: str) -> dict[str, str]:
        """{run name: native-scale spot predictions} of every run that holds ``sample`` out."""
        return {name: self.native_prediction(m, f, t, sample)
                for m, f, t, name in self.sample_runs(sample)}

    def spatialdata_files(self) -> list[str]:
        """One SpatialData per sample with ST (H&E, spots, tables, predicted dense maps)."""
        return [f"results/spatialdata/{s}.zarr" for s in self.plan.sheet.names
                if self.sample_runs(s)]

    # ------------------------------------------------------------------ report
    def figure_files(self) -> list[str]:
        """Expression maps of the first training seed."""
        plan = self.plan
        return [f"results/report/figures/{m}/{f}_{s}.png" for m in plan.models.names
                for f in plan.folds.names for s in plan.folds.samples(f, "test")]

    def dense_figure_files(self) -> list[str]:
        """Dense maps over the H&E of the first training seed, every dense model and fold."""
        plan = self.plan
        return [f"results/report/figures/dense/{m}/{f}_{s}.png" for m in plan.models.names
                if plan.models.is_dense(m)
                for f in plan.folds.names for s in plan.folds.samples(f, "test")]

    def training_logs(self) -> list[tuple[str, str]]:
        """(label, train_log.csv) of the first training seed of every trained model and fold
        (the `mean` baseline has no training), and of every super-resolution run."""
        plan = self.plan
        spot = [(f"{m}/{f}", f"{run_dir('models', m, f, plan.train_seeds[0])}/train_log.csv")
                for m in plan.models.names if plan.models.family(m) not in BASELINE_MODELS
                for f in plan.folds.names]
        return spot + plan.sr.training_logs()

    def report_figure_files(self) -> list[str]:
        """The report's figures besides the spot maps: dense maps, training curves, the
        cross-scale plot (when scored) and the super-resolution panels."""
        cross = self.plan.cross_scale
        scored = cross.models() and cross.fold_names()
        return [
            *self.dense_figure_files(),
            "results/report/figures/training_curves.png",
            *(["results/report/figures/cross_scale.png"] if scored else []),
            *self.plan.sr.figure_files(),
        ]

    def benchmark_targets(self) -> list[str]:
        """Tables, figures, SpatialData and extra scales of the benchmark, and the SR tables."""
        return [
            "results/report/benchmark.csv",
            "results/report/benchmark.md",
            "results/report/benchmark.html",
            "results/report/figures/pcc_distribution.png",
            *self.figure_files(),
            *self.report_figure_files(),
            *self.spatialdata_files(),
            *self.extra_scale_files(),
            *self.plan.sr.report_files(),
        ]
