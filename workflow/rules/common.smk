# Sample sheet, folds and target functions. No heavy logic: the package does the work.
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
from histomap.folds import make_folds  # noqa: E402

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
    "synthetic": float(config["synthetic"]["spot_diameter_um"]),
}

FOLDS = make_folds(
    samples.reset_index(drop=True),
    config["folds"]["strategy"],
    config["folds"].get("explicit"),
    sheet=SAMPLE_SHEET,
)
MODELS = list(config["models"])
GENE_PANEL = config["genes"]["name"]


wildcard_constraints:
    sample="|".join(samples["sample"]),
    fold="|".join(FOLDS),
    model="|".join(MODELS),


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


def ingest_inputs(wildcards):
    inputs = {"source": sample_path(wildcards.sample)}
    image = sample_image(wildcards.sample)
    if image:
        inputs["image"] = image
    return inputs


def fold_samples(fold, part):
    return FOLDS[fold][part]


def prediction_files(model, fold):
    return [
        f"results/predictions/{model}/{fold}/{s}/spots_{scale_label(spot_diameter_um(s))}um.h5ad"
        for s in fold_samples(fold, "test")
    ]


def train_inputs(wildcards):
    train = fold_samples(wildcards.fold, "train")
    return {
        "st": [f"results/st/{s}.h5ad" for s in train],
        "slides": [f"results/ingest/{s}/slide.tif" for s in train],
        "genes": f"results/genes/{GENE_PANEL}.tsv",
    }


def figure_files():
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
        *expand("results/tiles/{sample}.parquet", sample=samples["sample"]),
    ]
