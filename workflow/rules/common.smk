# Sample sheet, folds and target functions. No heavy logic: the package does the work.
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate


from histomap.data.sheet import check_distinct_samples, validate_sample_sheet  # noqa: E402
from histomap.evaluation.folds import fold_kinds, make_folds  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml")

SAMPLE_SHEET = config["samples"]
samples = pd.read_csv(SAMPLE_SHEET, sep="\t", dtype=str, comment="#").fillna("")
# errors name the sheet and the sample (and duplicate names)
validate_sample_sheet(
    samples, Path(workflow.basedir) / "workflow" / "schemas" / "samples.schema.yaml", SAMPLE_SHEET
)
samples = samples.set_index("sample", drop=False)

DATA_DIR = config.get("data_dir", "")
# `benchmark: false`: no folds, metrics or tables (e.g. one ST sample): only train_final bundles
# and `apply`. Samples of an image-only platform (`he`) have no spots: never in folds or panels.
BENCHMARK = bool(config.get("benchmark", True))
FINAL_FOLD = "final"  # results/models/{model}/final/...: train_final's checkpoints
IMAGE_ONLY_PLATFORMS = ("he",)
ST_SAMPLES = [
    s for s in samples["sample"] if samples.loc[s, "platform"] not in IMAGE_ONLY_PLATFORMS
]
DEFAULT_SPOT_DIAMETER_UM = {
    "legacy_st": 100.0,
    "visium": 55.0,
    "xenium": 55.0,  # spots a Xenium sample is binned into
    "visium_hd": 16.0,  # the bins trained on (or pseudo-spots: sheet spot_shape disc)
    "hest": 55.0,  # when the sample's metadata has no spot_diameter
    "synthetic": float(config["synthetic"]["spot_diameter_um"]),
}
# `image` keywords: the Visium hires/lowres PNG of spatial/, an explicit opt-in (not a file)
IMAGE_KEYWORDS = ("hires", "lowres")

FOLDS = (
    make_folds(
        samples.loc[ST_SAMPLES].reset_index(drop=True),
        config["folds"]["strategy"],
        config["folds"].get("explicit"),
        sheet=SAMPLE_SHEET,
    )
    if BENCHMARK
    else {}
)
# cross_patient / within_patient / mixed per fold: reported as separate rows, never averaged
FOLD_KINDS = fold_kinds(samples.reset_index(drop=True), FOLDS)
MODELS = list(config["models"])


def tile_files():
    """tile_slide's files: the index always, the tile images only with tiling.write_tiles."""
    out = {"index": "results/tiles/{sample}.parquet"}
    if config["tiling"].get("write_tiles", False):
        out["zarr"] = "results/tiles/{sample}.zarr"
    return out


def tile_outputs():
    return {k: directory(v) if k == "zarr" else v for k, v in tile_files().items()}


SPOT_MODELS = ("stnet", "histogene", "probe")  # one image crop per spot
DENSE_MODELS = ("istar", "pixnet")  # a dense map, spots read out of it at any diameter
BASELINE_MODELS = ("mean",)  # the training spots' per-gene mean, constant over space
# Variants (ablations): a new model name = a base model's block with some keys overridden.
VARIANTS = config.get("variants", {})


def base_model(model):
    return VARIANTS[model]["base"] if model in VARIANTS else model


def model_block(model):
    """The config block of a model or variant (variant keys override the base block)."""
    base = base_model(model)
    if base in BASELINE_MODELS and base not in config:
        return {}  # nothing to configure
    if base not in config:
        raise ValueError(f"config: model {model!r} needs a `{base}:` block")
    block = dict(config[base])
    overrides = {k: v for k, v in VARIANTS.get(model, {}).items() if k != "base"}
    if "train" in overrides:
        overrides["train"] = {**block.get("train", {}), **overrides["train"]}
    return {**block, **overrides}


for _model in MODELS:
    if base_model(_model) not in SPOT_MODELS + DENSE_MODELS + BASELINE_MODELS:
        raise ValueError(
            f"config: `models` entry {_model!r} is neither a model "
            f"{SPOT_MODELS + DENSE_MODELS + BASELINE_MODELS} nor a `variants` entry"
        )
    model_block(_model)


def _alternation(names):
    """Wildcard regex matching exactly these names (none: matches nothing)."""
    return "|".join(names) if names else "(?!x)x"


def model_runs(base):
    """Wildcard regex of the configured models (and variants) built on ``base``."""
    return _alternation([m for m in MODELS if base_model(m) == base])


DENSE_RUNS = _alternation([m for m in MODELS if base_model(m) in DENSE_MODELS])
TRAIN_SEEDS = [int(s) for s in config.get("train_seeds", [config["seed"]])]
GENE_PANEL = config["genes"]["name"]
HIGHRES_PLATFORMS = ("synthetic", "xenium", "visium_hd")  # ground truth at other scales
CROSS_SCALE = config.get(
    "cross_scale", {"enabled": False, "models": [], "diameters_um": [100.0], "min_spacing_um": 10}
)
CROSS_SCALE_PREPROCESS = {
    **config["preprocess"],
    **{k: CROSS_SCALE[k] for k in ("min_counts", "min_genes") if k in CROSS_SCALE},
}


wildcard_constraints:
    sample="|".join(samples["sample"]),
    fold="|".join([*FOLDS, FINAL_FOLD]),
    model="|".join(MODELS),
    tseed=r"\d+",


def sample_value(sample, column):
    value = samples.loc[sample, column] if column in samples.columns else ""
    return value if value != "" else None


def sample_path(sample):
    """Source folder of a sample: generated for `synthetic`, else the sheet path under data_dir."""
    if samples.loc[sample, "platform"] == "synthetic":
        return f"results/synthetic/{sample}"
    return str(Path(DATA_DIR) / samples.loc[sample, "path"])


def sample_image(sample):
    image = sample_value(sample, "image")
    if image in IMAGE_KEYWORDS:
        return None
    return str(Path(DATA_DIR) / image) if image else None


def image_keyword(sample):
    """`hires`/`lowres` when the sheet opts in to a Visium downsampled PNG, else None."""
    image = sample_value(sample, "image")
    return image if image in IMAGE_KEYWORDS else None


def spot_diameter_um(sample):
    """The sheet's value, else the platform's default (None for image-only platforms)."""
    value = sample_value(sample, "spot_diameter_um")
    if value:
        return float(value)
    if samples.loc[sample, "platform"] == "hest":  # the sample's own metadata (a small JSON)
        from histomap.data.io.hest import metadata_spot_diameter

        recorded = metadata_spot_diameter(sample_path(sample), hest_id(sample))
        if recorded:
            return recorded
    return DEFAULT_SPOT_DIAMETER_UM.get(samples.loc[sample, "platform"])


def hest_id(sample):
    return sample_value(sample, "hest_id") or sample


# the same section under two names (identical counts or image) would test a fold on itself
check_distinct_samples(
    [(s, samples.loc[s, "platform"], sample_path(s), sample_image(s)) for s in samples.index],
    SAMPLE_SHEET,
)


def scale_label(um):
    return f"{float(um):g}"


CROSS_SCALE_LABELS = [scale_label(um) for um in CROSS_SCALE["diameters_um"]]


def ingest_inputs(wildcards):
    inputs = {"source": sample_path(wildcards.sample)}
    image = sample_image(wildcards.sample)
    if image:
        inputs["image"] = image
    return inputs


def fold_samples(fold, part):
    """Samples of a fold's part; the fold `final` (train_final's bundles) trains on every ST
    sample and tests none."""
    if fold == FINAL_FOLD:
        return list(ST_SAMPLES) if part == "train" else []
    return FOLDS[fold][part]


def genes_for_fold(fold):
    """The gene panel of a fold, chosen from that fold's training samples only (select_genes);
    every model, the cross-scale task and the super-resolution pairs of the fold use it."""
    return f"results/genes/{GENE_PANEL}/{fold}.tsv"


def model_params(model):
    """A model's config block without the pipeline-only keys (train overrides, scales)."""
    block = model_block(model)
    block.pop("train", None)
    block.pop("predict_spot_diameters_um", None)
    block.pop("train_diameters_um", None)
    block.pop("feature_cache", None)
    return block


def model_train(model):
    """The `train` settings with the model's own `train:` overrides."""
    return {**config["train"], **model_block(model).get("train", {})}


def run_dir(kind, model, fold, tseed):
    return f"results/{kind}/{model}/{fold}/seed{tseed}"


def native_prediction(model, fold, tseed, sample):
    um = scale_label(spot_diameter_um(sample))
    return f"{run_dir('predictions', model, fold, tseed)}/{sample}/spots_{um}um.h5ad"


def prediction_files(model, fold, tseed):
    return [native_prediction(model, fold, tseed, s) for s in fold_samples(fold, "test")]


def extra_scale_files():
    """Spot tables of the dense models at `predict_spot_diameters_um` (native centres)."""
    return [
        f"{run_dir('predictions', m, f, t)}/{s}/spots_{scale_label(um)}um.h5ad"
        for m in MODELS
        if base_model(m) in DENSE_MODELS
        for um in model_block(m).get("predict_spot_diameters_um", [])
        for f in FOLDS
        for t in TRAIN_SEEDS
        for s in fold_samples(f, "test")
    ]


def has_highres(sample):
    """Whether a sample has ground truth at other scales (HEST: Xenium samples shipping their
    transcripts)."""
    if samples.loc[sample, "platform"] == "hest":
        from histomap.data.io.hest import has_transcripts

        return has_transcripts(sample_path(sample), hest_id(sample))
    return samples.loc[sample, "platform"] in HIGHRES_PLATFORMS


def cross_scale_models():
    if not CROSS_SCALE["enabled"]:
        return []
    return [
        m
        for m in MODELS
        if m in CROSS_SCALE["models"] and base_model(m) in DENSE_MODELS + BASELINE_MODELS
    ]


def cross_scale_folds():
    """Folds whose test samples all have high-resolution ground truth."""
    return [f for f in FOLDS if all(has_highres(s) for s in fold_samples(f, "test"))]


def cross_scale_pairs(fold):
    """(sample, diameter label) of a fold's cross-scale evaluation, in a fixed order."""
    return [
        (s, scale_label(um))
        for s in fold_samples(fold, "test")
        for um in CROSS_SCALE["diameters_um"]
    ]


def cross_scale_diameters(model, fold):
    """Cross-scale diameters a dense map of this model and fold is scored at ([]: none)."""
    if model in cross_scale_models() and fold in cross_scale_folds():
        return list(CROSS_SCALE["diameters_um"])
    return []


def cross_scale_truth(model, fold, sample):
    """The cross-scale ground-truth files whose discs a dense map must cover."""
    return [
        f"results/scales/{sample}/truth_{scale_label(um)}um.h5ad"
        for um in cross_scale_diameters(model, fold)
    ]


def metric_files():
    spot = [
        f"results/metrics/spot/{m}/{f}/seed{t}.parquet"
        for m in MODELS
        for f in FOLDS
        for t in TRAIN_SEEDS
    ]
    scales = [
        f"results/metrics/cross_scale/{m}/{f}/seed{t}.parquet"
        for m in cross_scale_models()
        for f in cross_scale_folds()
        for t in TRAIN_SEEDS
    ]
    return spot + scales


def extra_train_spots(model, fold):
    """Per training sample of a fold, the extra spot tables a dense model trains on besides the
    sample's own spots (`train_diameters_um`: the high-resolution data re-measured with discs of
    those sizes by truth_at_scale, the discs that pass the spot QC; samples without
    high-resolution data have none)."""
    return extra_spots_of(model, fold_samples(fold, "train"))


def extra_spots_of(model, train):
    diameters = model_block(model).get("train_diameters_um", [])
    return [
        (
            [f"results/scales/{s}/qc_{scale_label(um)}um.h5ad" for um in diameters]
            if has_highres(s)
            else []
        )
        for s in train
    ]


for _model in MODELS:
    for _um in model_block(_model).get("train_diameters_um", []):
        if scale_label(_um) not in CROSS_SCALE_LABELS:
            raise ValueError(
                f"config: {_model}.train_diameters_um has {_um}, which is not one of "
                f"cross_scale.diameters_um {CROSS_SCALE['diameters_um']} (the sizes re-measured "
                "from high-resolution data)"
            )


def feature_cache_files(model, fold):
    """The training samples' encode_slide caches a model trains from (`feature_cache: true` in
    its block; the probe always): results/features/{encoder}/{mpp}/{sample}.zarr."""
    block = model_block(model)
    if not (base_model(model) == "probe" or block.get("feature_cache")):
        return []
    encoder = block.get("encoder") or block.get("backbone")
    mpp = scale_label(block["input_mpp"])
    return [f"results/features/{encoder}/{mpp}/{s}.zarr" for s in fold_samples(fold, "train")]


def train_inputs(wildcards):
    train = fold_samples(wildcards.fold, "train")
    extra = extra_train_spots(wildcards.model, wildcards.fold)
    return {
        "st": [f"results/st/{s}.h5ad" for s in train],
        "slides": [f"results/ingest/{s}/slide.tif" for s in train],
        "genes": genes_for_fold(wildcards.fold),
        "extra": [path for paths in extra for path in paths],
        "features": feature_cache_files(wildcards.model, wildcards.fold),
    }


def figure_files():
    """Expression maps of the first training seed."""
    return [
        f"results/report/figures/{model}/{fold}_{s}.png"
        for model in MODELS
        for fold in FOLDS
        for s in fold_samples(fold, "test")
    ]


def sample_runs(sample):
    """(model, fold, training seed, run name) of every run that holds ``sample`` out."""
    return [
        (m, f, t, f"{m}_{f}_seed{t}")
        for m in MODELS
        for f in FOLDS
        if sample in fold_samples(f, "test")
        for t in TRAIN_SEEDS
    ]


def sample_dense_maps(sample):
    """{run name: dense.zarr} of the dense models' runs that hold ``sample`` out."""
    return {
        name: f"{run_dir('predictions', m, f, t)}/{sample}/dense.zarr"
        for m, f, t, name in sample_runs(sample)
        if base_model(m) in DENSE_MODELS
    }


def sample_predictions(sample):
    """{run name: native-scale spot predictions} of every run that holds ``sample`` out."""
    return {name: native_prediction(m, f, t, sample) for m, f, t, name in sample_runs(sample)}


def spatialdata_files():
    """One SpatialData per sample with ST (H&E, spots, tables, predicted dense maps)."""
    return [f"results/spatialdata/{s}.zarr" for s in samples["sample"] if sample_runs(s)]


def dense_figure_files():
    """Dense maps over the H&E of the first training seed, every dense model and fold."""
    return [
        f"results/report/figures/dense/{model}/{fold}_{s}.png"
        for model in MODELS
        if base_model(model) in DENSE_MODELS
        for fold in FOLDS
        for s in fold_samples(fold, "test")
    ]


def training_logs():
    """(label, train_log.csv) of the first training seed of every trained model and fold (the
    `mean` baseline has no training), and of every super-resolution run."""
    spot = [
        (f"{m}/{f}", f"{run_dir('models', m, f, TRAIN_SEEDS[0])}/train_log.csv")
        for m in MODELS
        if base_model(m) not in BASELINE_MODELS
        for f in FOLDS
    ]
    sr = [
        (f"SR {m} x{sc}/{f}", f"results/sr/models/{m}/x{sc}/{f}/train_log.csv")
        for m, sc, f in sr_runs()
    ]
    return spot + sr


def report_figure_files():
    """The report's figures besides the spot maps: dense maps, training curves, the
    cross-scale plot (when scored) and the super-resolution panels."""
    cross = (
        ["results/report/figures/cross_scale.png"]
        if cross_scale_models() and cross_scale_folds()
        else []
    )
    return [
        *dense_figure_files(),
        "results/report/figures/training_curves.png",
        *cross,
        *sr_figure_files(),
    ]


def all_targets():
    benchmark = [
        "results/report/benchmark.csv",
        "results/report/benchmark.md",
        "results/report/benchmark.html",
        "results/report/figures/pcc_distribution.png",
        *figure_files(),
        *report_figure_files(),
        *spatialdata_files(),
        *extra_scale_files(),
        *superres_targets(),
    ]
    return [
        *(benchmark if BENCHMARK else []),
        *expand(list(tile_files().values()), sample=samples["sample"]),
        *apply_targets(),
    ]


# ---- train once, apply anywhere (rules train_final, apply_* in models.smk) -------------------
APPLY = {
    "models": [],
    "bundle": None,
    "samples": None,
    "spot_diameters_um": [55],
    "spot_spacing_um": None,
    "bin_um": [],
    "figure_genes": 4,
    **(config.get("apply") or {}),
}
FINAL_SEED = TRAIN_SEEDS[0]
if FINAL_FOLD in FOLDS:
    raise ValueError(f"{SAMPLE_SHEET}: a fold may not be named {FINAL_FOLD!r} (train_final's)")


def final_train_samples():
    """Every ST sample of the sheet: what train_final trains a bundle on."""
    if not ST_SAMPLES:
        raise ValueError(
            f"{SAMPLE_SHEET}: train_final needs ST samples; the sheet has only "
            f"H&E-only ({', '.join(IMAGE_ONLY_PLATFORMS)}) samples. Point "
            "`apply.bundle` at a bundle trained elsewhere instead"
        )
    return ST_SAMPLES


def bundle_dir(model):
    return f"results/bundles/{model}/seed{FINAL_SEED}"


def final_inputs(wildcards):
    train = final_train_samples()
    extra = extra_spots_of(wildcards.model, train)
    return {
        "st": [f"results/st/{s}.h5ad" for s in train],
        "slides": [f"results/ingest/{s}/slide.tif" for s in train],
        "genes": genes_for_fold(FINAL_FOLD),
        "extra": [path for paths in extra for path in paths],
    }


def _apply_bundles():
    """{bundle name: (bundle folder, architecture)}: `apply.bundle` (made elsewhere, read now)
    or one train_final bundle per `apply.models` entry."""
    # read bundle.json alone (no torch at start-up); apply_* check the rest
    if APPLY["bundle"]:
        import json

        folder = Path(APPLY["bundle"])
        meta_path, model_path = folder / "bundle.json", folder / "model.pt"
        if not (meta_path.is_file() and model_path.is_file()):
            raise ValueError(
                f"config apply.bundle: {folder} is not a bundle folder (needs "
                "bundle.json and model.pt, as train_final writes them)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "histomap.bundle/1" or "name" not in meta:
            raise ValueError(f"config apply.bundle: {meta_path} is not a histomap bundle")
        return {meta["name"]: (str(folder), meta["architecture"])}
    unknown = [m for m in APPLY["models"] if m not in MODELS]
    if unknown:
        raise ValueError(f"config: apply.models {unknown} are not in `models` {MODELS}")
    return {m: (bundle_dir(m), base_model(m)) for m in APPLY["models"]}


APPLY_BUNDLES = _apply_bundles()
APPLY_SAMPLES = (
    list(APPLY["samples"])
    if APPLY["samples"] is not None
    else [s for s in samples["sample"] if samples.loc[s, "platform"] in IMAGE_ONLY_PLATFORMS]
)
for _s in APPLY_SAMPLES:
    if _s not in samples.index:
        raise ValueError(f"config: apply.samples names {_s!r}, which is not in {SAMPLE_SHEET}")
APPLY_SPOT_LABELS = [scale_label(um) for um in APPLY["spot_diameters_um"]]
APPLY_BIN_LABELS = [scale_label(um) for um in APPLY["bin_um"]]


def apply_bundle(name):
    return APPLY_BUNDLES[name][0]


def apply_is_dense(name):
    return APPLY_BUNDLES[name][1] in DENSE_MODELS


APPLY_RUNS = _alternation(list(APPLY_BUNDLES))  # apply_figure: never results/apply/superres/


def apply_runs(dense):
    """Wildcard regex of the applied bundles that are (not) dense models."""
    return _alternation([b for b in APPLY_BUNDLES if apply_is_dense(b) == dense])


def apply_tables(name, sample):
    folder = f"results/apply/{name}/{sample}"
    spots = [f"{folder}/spots_{um}um.h5ad" for um in APPLY_SPOT_LABELS]
    bins = [f"{folder}/bins_{um}um.h5ad" for um in APPLY_BIN_LABELS] if apply_is_dense(name) else []
    return spots + bins


_spot_bundles = [b for b in APPLY_BUNDLES if not apply_is_dense(b)]
if _spot_bundles and APPLY_SAMPLES and not APPLY_SPOT_LABELS:
    raise ValueError(
        f"config apply.spot_diameters_um is empty, but spot models {_spot_bundles} predict "
        "pseudo-spots only (bins need a dense model)"
    )


def apply_spatialdata_file(sample):
    """One SpatialData per applied sample, every applied bundle in it (rule apply_spatialdata)."""
    return f"results/spatialdata/apply/{sample}.zarr"


def apply_sample_dense(sample):
    """{bundle name: dense.zarr} of the dense bundles applied to ``sample``."""
    return {
        name: f"results/apply/{name}/{sample}/dense.zarr"
        for name in APPLY_BUNDLES
        if apply_is_dense(name)
    }


def apply_sample_tables(sample):
    """{SpatialData element name: table} of every applied bundle's pseudo-spots and bins of
    ``sample`` (e.g. pixnet_spots_55um)."""
    return {
        f"{name}_{Path(path).stem}": path
        for name in APPLY_BUNDLES
        for path in apply_tables(name, sample)
    }


def apply_targets():
    """Bundles of `apply.models`, and per applied bundle and sample: the dense map (dense
    models), the pseudo-spot and bin tables and the figure; per applied sample its SpatialData;
    the super-resolution applications (apply.superres)."""
    bundles = (
        [f"{bundle_dir(m)}/bundle.json" for m in APPLY["models"]] if not APPLY["bundle"] else []
    )
    outputs = []
    for name in APPLY_BUNDLES:
        for s in APPLY_SAMPLES:
            folder = f"results/apply/{name}/{s}"
            outputs += apply_tables(name, s) + [f"{folder}/map.png"]
            if apply_is_dense(name):
                outputs.append(f"{folder}/dense.zarr")
    sdata = [apply_spatialdata_file(s) for s in APPLY_SAMPLES] if APPLY_BUNDLES else []
    return bundles + outputs + sdata + apply_sr_targets()


# ---- super-resolution (Diff-ST benchmark; rules in superres.smk) ----------------------------
SR_SPOT_GRID_PLATFORMS = ("legacy_st", "visium")  # LR = pooled neighbouring spots
SR_ARCHITECTURES = (
    "diffst",
    "guided",
    "bicubic",
    "unet",
    "unetpp",
    "attention_unet",
    "histogene_sr",
    "tesla",
)
SR_PAIR_KEYS = (
    "normalisation",
    "patch_um",
    "lr_um",
    "stride_um",
    "edge",
    "min_tissue",
    "image_mpp",
    "mask_mpp",
    "spot_grid",
)


def sr_config():
    return config.get("superres") or {"enabled": False}


def sr_method_names():
    """Configured SR methods: the Table-1 rows, then the ablation variants."""
    sr = sr_config()
    return list(dict.fromkeys([*sr.get("methods", []), *sr.get("ablations", [])]))


def sr_method(name):
    """(architecture, settings) of a configured SR method, `based_on` chains resolved."""
    models = sr_config().get("models", {})
    chain, entry = [name], dict(models.get(name, {}))
    while "based_on" in entry:
        base = entry.pop("based_on")
        if base in chain or base not in models:
            raise ValueError(
                f"config superres.models.{chain[-1]}: based_on {base!r} is "
                + ("a cycle" if base in chain else "not configured")
            )
        chain.append(base)
        entry = {**models[base], **entry}
    arch = entry.pop("method", name)
    if arch not in SR_ARCHITECTURES:
        raise ValueError(
            f"config superres: method {name!r} is neither configured under superres.models "
            f"nor one of {', '.join(SR_ARCHITECTURES)}"
        )
    return arch, entry


def sr_all_method_names():
    """SR methods of the benchmark and of `apply.superres` (trained on fold `final`)."""
    return list(dict.fromkeys([*sr_method_names(), *APPLY_SR["methods"]]))


def sr_methods_of(kind):
    """Wildcard regex of the configured SR methods (benchmark and apply) built on Diff-ST
    (``kind="diffst"``: Diff-ST and its ablations) or on anything else (``"baseline"``)."""
    names = [
        m for m in sr_all_method_names() if (sr_method(m)[0] == "diffst") == (kind == "diffst")
    ]
    return _alternation(names)


def sr_model_config(name):
    """Network settings and task options of an SR method (its `train:` and `diffusion:`
    overrides removed)."""
    entry = sr_method(name)[1]
    entry.pop("train", None)
    entry.pop("diffusion", None)
    return entry


def sr_train_config(name):
    """`train`, then `superres.train`, then the method's own `train:` overrides."""
    entry = sr_method(name)[1]
    return {**config["train"], **sr_config().get("train", {}), **entry.get("train", {})}


def sr_diffusion_config(name):
    """`superres.diffusion` with the method's own `diffusion:` overrides."""
    return {**sr_config().get("diffusion", {}), **sr_method(name)[1].get("diffusion", {})}


def sr_validation():
    return {**config["validation"], **sr_config().get("validation", {})}


def sr_pair_settings():
    return {k: sr_config()[k] for k in SR_PAIR_KEYS if k in sr_config()}


def sr_sample_scales(sample):
    platform = samples.loc[sample, "platform"]
    return [int(s) for s in sr_config().get("scales", {}).get(platform, [])]


def sr_fold_samples(fold, part, scale):
    return [s for s in fold_samples(fold, part) if int(scale) in sr_sample_scales(s)]


def sr_runs():
    """(method, scale, fold) of the benchmark: folds with training and test samples at a scale."""
    if not sr_config().get("enabled", False) or not BENCHMARK:
        return []
    scales = sorted({sc for s in samples["sample"] for sc in sr_sample_scales(s)})
    runs = [
        (m, sc, f)
        for m in sr_method_names()
        for sc in scales
        for f in FOLDS
        if sr_fold_samples(f, "train", sc) and sr_fold_samples(f, "test", sc)
    ]
    if not runs:
        raise ValueError(
            "config superres: enabled, but no fold has training and test samples at a scale "
            "configured for their platform (superres.scales)"
        )
    return runs


def sr_pairs_file(fold, sample, scale):
    """SR pairs of a sample for one fold: the channels are the fold's gene panel
    (genes_for_fold), chosen from its training samples only."""
    return f"results/sr/pairs/{fold}/{sample}_x{scale}.zarr"


def sr_pairs_inputs(wildcards):
    platform = samples.loc[wildcards.sample, "platform"]
    counts = "spots" if platform in SR_SPOT_GRID_PLATFORMS else "highres"
    return {
        "slide": f"results/ingest/{wildcards.sample}/slide.tif",
        "counts": f"results/ingest/{wildcards.sample}/{counts}.h5ad",
        "genes": genes_for_fold(wildcards.fold),
    }


def sr_train_inputs(wildcards):
    train = sr_fold_samples(wildcards.fold, "train", wildcards.sr_scale)
    return [sr_pairs_file(wildcards.fold, s, wildcards.sr_scale) for s in train]


def sr_test_runs(wildcards):
    """(fold, test sample) scored for a method and factor, every fold of the benchmark."""
    return [
        (f, s)
        for m, sc, f in sr_runs()
        if m == wildcards.sr_method and sc == int(wildcards.sr_scale)
        for s in sr_fold_samples(f, "test", sc)
    ]


def sr_evaluate_inputs(wildcards):
    method, scale = wildcards.sr_method, wildcards.sr_scale
    runs = sr_test_runs(wildcards)
    return {
        "pairs": [sr_pairs_file(f, s, scale) for f, s in runs],
        "maps": [f"results/sr/predictions/{method}/x{scale}/{f}/{s}/maps.zarr" for f, s in runs],
    }


def sr_metric_files():
    runs = dict.fromkeys((m, sc) for m, sc, _ in sr_runs())
    return [f"results/sr/metrics/{m}/x{sc}.parquet" for m, sc in runs]


def superres_targets():
    if not sr_runs():
        return []
    return [
        "results/report/superres.csv",
        "results/report/superres.md",
        "results/report/superres.html",
    ]


def sr_figure_files():
    """SR panels of every Table-1 method and factor (first fold, first held-out sample)."""
    methods = set(sr_config().get("methods", []))
    runs = dict.fromkeys((m, sc) for m, sc, _ in sr_runs() if m in methods)
    return [f"results/report/figures/superres/{m}_x{sc}.png" for m, sc in runs]


def sr_figure_inputs(wildcards):
    fold, sample = sr_test_runs(wildcards)[0]
    method, scale = wildcards.sr_method, wildcards.sr_scale
    return {
        "pairs": sr_pairs_file(fold, sample, scale),
        "maps": f"results/sr/predictions/{method}/x{scale}/{fold}/{sample}/maps.zarr",
    }


# ---- super-resolution applied to samples with LR ST and H&E but no HR truth (apply.superres) --
# An SR bundle per method: trained by train_diffst / train_sr_baseline on fold `final` (every
# ST sample with `factor` in superres.scales for its platform; validation patches from those),
# results/sr/models/{method}/x{factor}/final/model.pt (weights, genes of the `final` panel,
# normalisation and the training pairs' target sum, factor, patch shapes). Applied to each
# sample's measured spots as the LR map: results/apply/superres/{method}/x{factor}/{sample}/.
APPLY_SR = {
    "methods": [],
    "factor": None,
    "samples": None,
    "figure_patches": 2,
    **(APPLY.get("superres") or {}),
}


def apply_sr_train_samples():
    factor = int(APPLY_SR["factor"])
    train = [s for s in ST_SAMPLES if factor in sr_sample_scales(s)]
    if not train:
        raise ValueError(
            f"config apply.superres.factor {factor}: no ST sample of {SAMPLE_SHEET} has it in "
            "superres.scales for its platform, so no SR bundle can be trained"
        )
    return train


def apply_sr_samples():
    """Samples super-resolved from their measured spots (null: every ST sample)."""
    names = list(APPLY_SR["samples"]) if APPLY_SR["samples"] is not None else list(ST_SAMPLES)
    for s in names:
        if s not in samples.index:
            raise ValueError(
                f"config: apply.superres.samples names {s!r}, which is not in {SAMPLE_SHEET}"
            )
        if samples.loc[s, "platform"] in IMAGE_ONLY_PLATFORMS:
            raise ValueError(
                f"config: apply.superres.samples names {s!r}, an H&E-only sample: "
                "super-resolution needs measured spots as its LR map"
            )
    return names


if APPLY_SR["methods"]:
    if APPLY_SR["factor"] is None:
        raise ValueError("config: apply.superres.methods is set, but apply.superres.factor is not")
    for _m in APPLY_SR["methods"]:
        sr_method(_m)  # known method or configured superres.models entry
    apply_sr_train_samples()
    apply_sr_samples()


def apply_sr_dir(method, sample):
    return f"results/apply/superres/{method}/x{int(APPLY_SR['factor'])}/{sample}"


def apply_sr_targets():
    """Per apply.superres method: its SR bundle and, per sample, the LR-only inputs' predicted
    HR maps (maps.zarr, bins.h5ad) and the figure."""
    if not APPLY_SR["methods"]:
        return []
    factor = int(APPLY_SR["factor"])
    return [
        path
        for m in APPLY_SR["methods"]
        for path in [
            f"results/sr/models/{m}/x{factor}/{FINAL_FOLD}/model.pt",
            *[
                f"{apply_sr_dir(m, s)}/{name}"
                for s in apply_sr_samples()
                for name in ("maps.zarr", "bins.h5ad", "map.png")
            ],
        ]
    ]


def reader_options(sample):
    """Platform reader options from the sample sheet (Xenium: min_qv, origin_um "x,y",
    alignment; Visium HD: spot_shape, spot_pitch_um; HEST: hest_id)."""
    platform = samples.loc[sample, "platform"]
    if platform == "visium_hd":
        options = {"spot_shape": sample_value(sample, "spot_shape")}
        if sample_value(sample, "spot_pitch_um"):
            options["spot_pitch_um"] = float(sample_value(sample, "spot_pitch_um"))
        return options
    if platform == "hest":
        return {"hest_id": hest_id(sample)}
    if platform != "xenium":
        return {}
    options = {}
    if sample_value(sample, "alignment"):
        options["alignment"] = str(Path(DATA_DIR) / sample_value(sample, "alignment"))
    if sample_value(sample, "min_qv"):
        options["min_qv"] = float(sample_value(sample, "min_qv"))
    if sample_value(sample, "origin_um"):
        x, y = sample_value(sample, "origin_um").replace(";", ",").split(",")
        options["origin_um"] = [float(x), float(y)]
    return options
