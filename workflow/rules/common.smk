# Wiring only. The plan (sample sheet, folds, models, variants, cross-scale, super-resolution,
# apply, file lists) is histomap.plan, built and checked once here by validate_config (the JSON
# schemas in histomap/plan/schemas/ with their defaults filled in, the sample sheet and every
# start-up check, the same as `histomap validate`); the names below are what the .smk files call.
from pathlib import Path

from histomap.plan import FINAL_FOLD, validate_config
from histomap.plan.targets import run_dir
from histomap.threads import torch_threads_of

PLAN = validate_config(config, Path.cwd())

# ---- samples (ingest.smk) ---------------------------------------------------------------------
SAMPLE_SHEET = PLAN.sheet.path
samples = PLAN.sheet.table
sample_value = PLAN.sheet.value
spot_diameter_um = PLAN.sheet.spot_diameter_um
image_keyword = PLAN.sheet.image_keyword
reader_options = PLAN.sheet.reader_options


def synthetic_params(wildcards):
    return PLAN.sheet.synthetic_params(wildcards.sample, config["synthetic"])


def ingest_inputs(wildcards):
    return PLAN.sheet.ingest_inputs(wildcards.sample)


def tile_files():
    """tile_slide's files: the index always, the tile images only with tiling.write_tiles."""
    return PLAN.tile_files(config["tiling"].get("write_tiles", False))


def tile_outputs():
    return {k: directory(v) if k == "zarr" else v for k, v in tile_files().items()}


# ---- folds, models, variants (preprocess.smk, models.smk) -------------------------------------
FOLDS = PLAN.folds.folds
FOLD_KINDS = PLAN.folds.kinds
fold_samples = PLAN.folds.samples
MODELS = PLAN.models.names
TRAIN_SEEDS = PLAN.train_seeds
FINAL_SEED = PLAN.final_seed
GENE_PANEL = PLAN.gene_panel
base_model = PLAN.models.family
model_block = PLAN.models.block
model_params = PLAN.models.params
model_train = PLAN.models.train
model_runs = PLAN.models.runs
DENSE_RUNS = PLAN.models.dense_runs
SPOT_RUNS = PLAN.models.spot_runs


wildcard_constraints:
    sample="|".join(samples["sample"]),
    fold="|".join([*PLAN.folds.all_names, FINAL_FOLD]),  # with the nested choice's inner folds
    model="|".join(MODELS),
    tseed=r"\d+",


def train_inputs(wildcards):
    return PLAN.files.train_inputs(wildcards.model, wildcards.fold)


def final_inputs(wildcards):
    return PLAN.files.final_inputs(wildcards.model)


genes_for_fold = PLAN.files.genes_for_fold
extra_train_spots = PLAN.files.extra_train_spots
extra_spots_of = PLAN.files.extra_spots_of
final_train_samples = PLAN.files.final_train_samples
native_prediction = PLAN.files.native_prediction
prediction_files = PLAN.files.prediction_files
metric_files = PLAN.report_metric_files  # every run's, then the nested rows'
sample_dense_maps = PLAN.files.sample_dense_maps
model_slide = PLAN.files.stain.slide
stain_reference_slides = PLAN.files.stain.reference_slides


def dense_map_output(path):
    """A benchmark run's dense map: kept, or temporary with `predict.keep_dense_maps: false`."""
    return directory(path) if PLAN.keep_dense_maps else temp(directory(path))


sample_predictions = PLAN.files.sample_predictions
training_logs = PLAN.files.training_logs

# ---- cross-scale (evaluate.smk) ---------------------------------------------------------------
CROSS_SCALE = PLAN.cross_scale.settings
CROSS_SCALE_LABELS = PLAN.cross_scale.labels
CROSS_SCALE_PREPROCESS = PLAN.cross_scale.preprocess
cross_scale_pairs = PLAN.cross_scale.pairs
cross_scale_diameters = PLAN.cross_scale.diameters
cross_scale_truth = PLAN.cross_scale.truth

# ---- train once, apply anywhere (models.smk) --------------------------------------------------
APPLY = PLAN.apply.settings
APPLY_SPOT_LABELS = PLAN.apply.spot_labels
APPLY_BIN_LABELS = PLAN.apply.bin_labels
APPLY_RUNS = PLAN.apply.figure_runs  # apply_figure: never results/apply/superres/
apply_bundle = PLAN.apply.bundle
apply_model_slide = PLAN.apply.slide
apply_is_dense = PLAN.apply.is_dense
apply_tables = PLAN.apply.tables
apply_sample_dense = PLAN.apply.sample_dense
apply_sample_tables = PLAN.apply.sample_tables
apply_targets = PLAN.apply_targets


def apply_runs(dense):
    return PLAN.apply.runs(dense)


# ---- super-resolution (superres.smk) ----------------------------------------------------------
APPLY_SR = PLAN.apply_sr.settings
sr_all_method_names = PLAN.sr.all_method_names
sr_methods_of = PLAN.sr.methods_of
sr_method = PLAN.sr.method
sr_model_config = PLAN.sr.model_config
sr_train_config = PLAN.sr.train_config
sr_diffusion_config = PLAN.sr.diffusion_config
sr_validation = PLAN.sr.validation
sr_pair_settings = PLAN.sr.pair_settings
sr_metric_files = PLAN.sr.metric_files
sr_calibration_files = PLAN.sr.calibration_files


def sr_pairs_inputs(wildcards):
    return PLAN.sr.pairs_inputs(wildcards.fold, wildcards.sample, genes_for_fold(wildcards.fold))


def sr_train_inputs(wildcards):
    return PLAN.sr.train_inputs(wildcards.fold, wildcards.sr_scale)


def sr_test_runs(wildcards):
    """(fold, test sample) scored for a method and factor, every fold of the benchmark."""
    return PLAN.sr.test_runs(wildcards.sr_method, wildcards.sr_scale)


def sr_evaluate_inputs(wildcards):
    return PLAN.sr.evaluate_inputs(wildcards.sr_method, wildcards.sr_scale)


def sr_figure_inputs(wildcards):
    return PLAN.sr.figure_inputs(wildcards.sr_method, wildcards.sr_scale)


# ---- the default target (Snakefile): every output, then the run manifest (evaluate.smk) -------------
MANIFEST = "results/manifest.json"


def all_targets():
    return [*PLAN.all_targets(), MANIFEST]


def manifest_input_files():
    """What the manifest records as the run's inputs: the sample sheet and each sample's files
    (generated synthetic sources are outputs, recorded with them)."""
    files = [str(SAMPLE_SHEET)]
    for sample in PLAN.sheet.names:
        files += [
            str(p)
            for p in PLAN.sheet.ingest_inputs(sample).values()
            if not str(p).startswith("results/")
        ]
    return files


# ---- torch threads: one setting, `train.torch_threads` (histomap.threads) ----------------------
# A model's training and prediction jobs reserve and use its train config's count (with its own
# `train:` overrides); never --cores, so weights and maps do not depend on the cores given.
TORCH_THREADS = torch_threads_of(config["train"])  # encode_slide and apply jobs


def model_threads(wildcards):
    return torch_threads_of(model_train(wildcards.model))


def sr_threads(wildcards):
    return torch_threads_of(sr_train_config(wildcards.sr_method))
