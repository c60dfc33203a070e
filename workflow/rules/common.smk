# Sample sheet, folds and target functions. No heavy logic: the package does the work.
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
from histomap.evaluation.folds import make_folds  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml")

SAMPLE_SHEET = config["samples"]
samples = pd.read_csv(SAMPLE_SHEET, sep="\t", dtype=str, comment="#").fillna("")
validate(samples, schema="../schemas/samples.schema.yaml")
if samples["sample"].duplicated().any():
    raise ValueError(
        f"{SAMPLE_SHEET}: duplicate sample names "
        f"{sorted(samples.loc[samples['sample'].duplicated(), 'sample'])}"
    )
samples = samples.set_index("sample", drop=False)

DATA_DIR = config.get("data_dir", "")
DEFAULT_SPOT_DIAMETER_UM = {
    "legacy_st": 100.0,
    "visium": 55.0,
    "xenium": 55.0,  # spots a Xenium sample is binned into
    "synthetic": float(config["synthetic"]["spot_diameter_um"]),
}

FOLDS = make_folds(
    samples.reset_index(drop=True),
    config["folds"]["strategy"],
    config["folds"].get("explicit"),
    sheet=SAMPLE_SHEET,
)
MODELS = list(config["models"])
SPOT_MODELS = ("stnet", "histogene")  # one image crop per spot
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
        raise ValueError(f"config: `models` entry {_model!r} is neither a model "
                         f"{SPOT_MODELS + DENSE_MODELS + BASELINE_MODELS} nor a `variants` "
                         "entry")
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
HIGHRES_PLATFORMS = ("synthetic", "xenium")  # platforms with ground truth at any scale
CROSS_SCALE = config.get(
    "cross_scale", {"enabled": False, "models": [], "diameters_um": [100.0], "min_spacing_um": 10}
)
CROSS_SCALE_PREPROCESS = {
    **config["preprocess"],
    **{k: CROSS_SCALE[k] for k in ("min_counts", "min_genes") if k in CROSS_SCALE},
}


wildcard_constraints:
    sample="|".join(samples["sample"]),
    fold="|".join(FOLDS),
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
    return str(Path(DATA_DIR) / image) if image else None


def spot_diameter_um(sample):
    value = sample_value(sample, "spot_diameter_um")
    if value:
        return float(value)
    return DEFAULT_SPOT_DIAMETER_UM[samples.loc[sample, "platform"]]


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
    return FOLDS[fold][part]


def model_params(model):
    """A model's config block without the pipeline-only keys (train overrides, scales)."""
    block = model_block(model)
    block.pop("train", None)
    block.pop("predict_spot_diameters_um", None)
    block.pop("train_diameters_um", None)
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
    return [
        f
        for f in FOLDS
        if all(samples.loc[s, "platform"] in HIGHRES_PLATFORMS for s in fold_samples(f, "test"))
    ]


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
    those sizes by truth_at_scale; samples without high-resolution data have none)."""
    diameters = model_block(model).get("train_diameters_um", [])
    return [
        [f"results/scales/{s}/truth_{scale_label(um)}um.h5ad" for um in diameters]
        if samples.loc[s, "platform"] in HIGHRES_PLATFORMS
        else []
        for s in fold_samples(fold, "train")
    ]


for _model in MODELS:
    for _um in model_block(_model).get("train_diameters_um", []):
        if scale_label(_um) not in CROSS_SCALE_LABELS:
            raise ValueError(
                f"config: {_model}.train_diameters_um has {_um}, which is not one of "
                f"cross_scale.diameters_um {CROSS_SCALE['diameters_um']} (the sizes re-measured "
                "from high-resolution data)"
            )


def train_inputs(wildcards):
    train = fold_samples(wildcards.fold, "train")
    extra = extra_train_spots(wildcards.model, wildcards.fold)
    return {
        "st": [f"results/st/{s}.h5ad" for s in train],
        "slides": [f"results/ingest/{s}/slide.tif" for s in train],
        "genes": f"results/genes/{GENE_PANEL}.tsv",
        "extra": [path for paths in extra for path in paths],
    }


def figure_files():
    """Expression maps of the first training seed."""
    return [
        f"results/report/figures/{model}/{fold}_{s}.png"
        for model in MODELS
        for fold in FOLDS
        for s in fold_samples(fold, "test")
    ]


def all_targets():
    return [
        "results/report/benchmark.csv",
        "results/report/benchmark.md",
        "results/report/figures/pcc_distribution.png",
        *figure_files(),
        *extra_scale_files(),
        *expand("results/tiles/{sample}.parquet", sample=samples["sample"]),
        *superres_targets(),
    ]


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


def sr_methods_of(kind):
    """Wildcard regex of the configured SR methods built on Diff-ST (``kind="diffst"``: Diff-ST
    and its ablations) or on anything else (``"baseline"``)."""
    names = [m for m in sr_method_names() if (sr_method(m)[0] == "diffst") == (kind == "diffst")]
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
    if not sr_config().get("enabled", False):
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


def sr_pairs_file(sample, scale):
    return f"results/sr/pairs/{sample}_x{scale}.zarr"


def sr_pairs_inputs(wildcards):
    platform = samples.loc[wildcards.sample, "platform"]
    counts = "spots" if platform in SR_SPOT_GRID_PLATFORMS else "highres"
    return {
        "slide": f"results/ingest/{wildcards.sample}/slide.tif",
        "counts": f"results/ingest/{wildcards.sample}/{counts}.h5ad",
        "genes": f"results/genes/{GENE_PANEL}.tsv",
    }


def sr_train_inputs(wildcards):
    train = sr_fold_samples(wildcards.fold, "train", wildcards.sr_scale)
    return [sr_pairs_file(s, wildcards.sr_scale) for s in train]


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
        "pairs": [sr_pairs_file(s, scale) for _, s in runs],
        "maps": [f"results/sr/predictions/{method}/x{scale}/{f}/{s}/maps.zarr" for f, s in runs],
    }


def sr_metric_files():
    runs = dict.fromkeys((m, sc) for m, sc, _ in sr_runs())
    return [f"results/sr/metrics/{m}/x{sc}.parquet" for m, sc in runs]


def superres_targets():
    if not sr_runs():
        return []
    return ["results/report/superres.csv", "results/report/superres.md"]


def reader_options(sample):
    """Platform reader options from the sample sheet (Xenium: min_qv, origin_um "x,y")."""
    if samples.loc[sample, "platform"] != "xenium":
        return {}
    options = {}
    if sample_value(sample, "min_qv"):
        options["min_qv"] = float(sample_value(sample, "min_qv"))
    if sample_value(sample, "origin_um"):
        x, y = sample_value(sample, "origin_um").replace(";", ",").split(",")
        options["origin_um"] = [float(x), float(y)]
    return options

