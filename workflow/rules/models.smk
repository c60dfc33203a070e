# Training and prediction, once per model x fold x training seed: train_{model} and
# predict_{model} per model (variants of a model, config `variants`, run through its base
# model's rules). Each fold trains on its training samples only (train_inputs); validation for
# early stopping is carved out of those (config: validation), never out of the test fold. Spot
# models (stnet, histogene) see one crop per spot; dense models (pixnet, istar) predict a
# whole-slide map (predict_{model} -> dense.zarr) that spots of any diameter are read from
# (dense_spots).


rule train_stnet:
    input:
        unpack(train_inputs),
    output:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        log_csv="results/models/{model}/{fold}/seed{tseed}/train_log.csv",
    wildcard_constraints:
        model=model_runs("stnet"),
    params:
        base=lambda wc: base_model(wc.model),
        model=lambda wc: model_params(wc.model),
        train=lambda wc: model_train(wc.model),
        validation=config["validation"],
        seed=lambda wc: int(wc.tseed),
        checkpoint_dir=lambda wc: f"{run_dir('models', wc.model, wc.fold, wc.tseed)}/checkpoints",
    log:
        "logs/train/{model}/{fold}/seed{tseed}.log",
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_spot_model.py"


use rule train_stnet as train_histogene with:
    wildcard_constraints:
        model=model_runs("histogene"),


rule train_pixnet:
    input:
        unpack(train_inputs),
    output:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        log_csv="results/models/{model}/{fold}/seed{tseed}/train_log.csv",
    wildcard_constraints:
        model=model_runs("pixnet"),
    params:
        base=lambda wc: base_model(wc.model),
        model=lambda wc: model_params(wc.model),
        train=lambda wc: model_train(wc.model),
        validation=config["validation"],
        seed=lambda wc: int(wc.tseed),
        extra_st=lambda wc: extra_train_spots(wc.model, wc.fold),
        checkpoint_dir=lambda wc: f"{run_dir('models', wc.model, wc.fold, wc.tseed)}/checkpoints",
    log:
        "logs/train/{model}/{fold}/seed{tseed}.log",
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_dense_model.py"


# The linear probe (HEST-Benchmark style): ridge on the frozen encoder's cached pooled features
# of each spot's crop; predicted like the ST-Net-style crop models (predict_probe).
rule train_probe:
    input:
        unpack(train_inputs),
    output:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        log_csv="results/models/{model}/{fold}/seed{tseed}/train_log.csv",
    wildcard_constraints:
        model=model_runs("probe"),
    params:
        torch_threads=model_threads,
        model=lambda wc: model_params(wc.model),
        validation=config["validation"],
        seed=lambda wc: int(wc.tseed),
    log:
        "logs/train/{model}/{fold}/seed{tseed}.log",
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_probe.py"


use rule train_pixnet as train_istar with:
    wildcard_constraints:
        model=model_runs("istar"),


rule predict_stnet:
    input:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        st="results/st/{sample}.h5ad",
        slide=lambda wc: model_slide(wc.model, wc.fold, wc.sample),
    output:
        "results/predictions/{model}/{fold}/seed{tseed}/{sample}/spots_{um}um.h5ad",
    wildcard_constraints:
        model=model_runs("stnet"),
    params:
        torch_threads=model_threads,
        base=lambda wc: base_model(wc.model),
        train=lambda wc: model_train(wc.model),
    log:
        "logs/predict/{model}/{fold}/seed{tseed}/{sample}_{um}um.log",
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["light"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/predict_spot_model.py"


# A spot model at the centres of the cross-scale ground truth of its training size
# (results/scales): scored on the same discs or bins as the dense models in that column.
use rule predict_stnet as predict_spot_scale with:
    input:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        st="results/scales/{sample}/truth_{um}um.h5ad",
        slide=lambda wc: model_slide(wc.model, wc.fold, wc.sample),
    output:
        "results/predictions/{model}/{fold}/seed{tseed}/{sample}/scale_{um}um.h5ad",
    wildcard_constraints:
        model=SPOT_RUNS,
    log:
        "logs/predict/{model}/{fold}/seed{tseed}/{sample}_scale_{um}um.log",


use rule predict_stnet as predict_histogene with:
    wildcard_constraints:
        model=model_runs("histogene"),


use rule predict_stnet as predict_probe with:
    wildcard_constraints:
        model=model_runs("probe"),


rule predict_pixnet:
    input:
        model="results/models/{model}/{fold}/seed{tseed}/model.pt",
        st="results/st/{sample}.h5ad",
        slide=lambda wc: model_slide(wc.model, wc.fold, wc.sample),
        tiles="results/tiles/{sample}.parquet",
        cover=lambda wc: cross_scale_truth(wc.model, wc.fold, wc.sample),
    output:
        dense_map_output("results/predictions/{model}/{fold}/seed{tseed}/{sample}/dense.zarr"),
    wildcard_constraints:
        model=model_runs("pixnet"),
    params:
        torch_threads=model_threads,
        train=lambda wc: model_train(wc.model),
        cover_diameters_um=lambda wc: cross_scale_diameters(wc.model, wc.fold),
        cover_um=lambda wc: max(
            [
                spot_diameter_um(wc.sample),
                *model_block(wc.model).get("predict_spot_diameters_um", []),
            ]
        ),
        cpu_bf16=config.get("predict", {}).get("cpu_bf16", "auto"),
        dense_dtype=config.get("predict", {}).get("dense_dtype", "float32"),
    log:
        "logs/predict/{model}/{fold}/seed{tseed}/{sample}_dense.log",
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/predict_dense_map.py"


use rule predict_pixnet as predict_istar with:
    wildcard_constraints:
        model=model_runs("istar"),


# Spots of any diameter read out of a dense map: `spots_*` at the sample's own spot centres,
# `scale_*` at the centres of the cross-scale ground truth (results/scales).
rule dense_spots:
    input:
        dense="results/predictions/{model}/{fold}/seed{tseed}/{sample}/dense.zarr",
        centres="results/st/{sample}.h5ad",
    output:
        "results/predictions/{model}/{fold}/seed{tseed}/{sample}/spots_{um}um.h5ad",
    wildcard_constraints:
        model=DENSE_RUNS,
    log:
        "logs/dense_spots/{model}/{fold}/seed{tseed}/{sample}_{um}um.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/dense_spots.py"


rule dense_scale_spots:
    input:
        dense="results/predictions/{model}/{fold}/seed{tseed}/{sample}/dense.zarr",
        centres=expand("results/scales/{{sample}}/truth_{um}um.h5ad", um=CROSS_SCALE_LABELS),
    output:
        expand(
            "results/predictions/{{model}}/{{fold}}/seed{{tseed}}/{{sample}}/scale_{um}um.h5ad",
            um=CROSS_SCALE_LABELS,
        ),
    wildcard_constraints:
        model=DENSE_RUNS,
    params:
        diameters_um=CROSS_SCALE.get("diameters_um", []),
    log:
        "logs/dense_spots/{model}/{fold}/seed{tseed}/{sample}_scales.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/dense_spots.py"


# Train once, apply anywhere. train_final: each `apply.models` entry trained on every ST sample
# of the sheet (validation blocks as in the folds) into a self-describing bundle
# (histomap.tasks.bundle); apply_*: a bundle (that one, or `apply.bundle` made elsewhere) run on
# `apply.samples` (default: the H&E-only `he` samples): the dense map, pseudo-spot and bin
# tables, a figure (histomap.tasks.apply).
localrules:
    apply,


# `snakemake apply`: the bundles and their application alone, without the benchmark.
rule apply:
    input:
        apply_targets(),


rule train_final:
    input:
        unpack(final_inputs),
    output:
        model=f"results/bundles/{{model}}/seed{FINAL_SEED}/model.pt",
        bundle=f"results/bundles/{{model}}/seed{FINAL_SEED}/bundle.json",
        log_csv=f"results/bundles/{{model}}/seed{FINAL_SEED}/train_log.csv",
    log:
        "logs/train_final/{model}.log",
    conda:
        "../../envs/models.yaml"
    threads: model_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    params:
        base=lambda wc: base_model(wc.model),
        model=lambda wc: model_params(wc.model),
        train=lambda wc: model_train(wc.model),
        validation=config["validation"],
        seed=FINAL_SEED,
        extra_st=lambda wc: extra_spots_of(wc.model, final_train_samples()),
        checkpoint_dir=lambda wc: f"{run_dir('models', wc.model, FINAL_FOLD, FINAL_SEED)}/checkpoints",
    script:
        "../scripts/train_final.py"


# A bundle trained on stain-normalised slides reads each slide normalised to its reference
# (recorded in bundle.json, fitted on its training slides).
rule apply_stain_slide:
    input:
        bundle=lambda wc: f"{apply_bundle(wc.bundle)}/bundle.json",
        slide="results/ingest/{sample}/slide.tif",
    output:
        slide="results/apply/{bundle}/{sample}/slide_stain_normalised.tif",
        profile="results/apply/{bundle}/{sample}/stain_source.json",
    log:
        "logs/apply/{bundle}/{sample}_stain.log",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    script:
        "../scripts/apply_stain_slide.py"


rule apply_dense:
    input:
        model=lambda wc: f"{apply_bundle(wc.bundle)}/model.pt",
        bundle=lambda wc: f"{apply_bundle(wc.bundle)}/bundle.json",
        slide=lambda wc: apply_model_slide(wc.bundle, wc.sample),
        tiles="results/tiles/{sample}.parquet",
    output:
        directory("results/apply/{bundle}/{sample}/dense.zarr"),
    log:
        "logs/apply/{bundle}/{sample}_dense.log",
    wildcard_constraints:
        bundle=apply_runs(dense=True),
    conda:
        "../../envs/models.yaml"
    threads: TORCH_THREADS
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    params:
        torch_threads=TORCH_THREADS,
        device=config["train"].get("device", "auto"),
    script:
        "../scripts/apply_bundle.py"


rule apply_dense_tables:
    input:
        bundle=lambda wc: f"{apply_bundle(wc.bundle)}/bundle.json",
        dense="results/apply/{bundle}/{sample}/dense.zarr",
        tiles="results/tiles/{sample}.parquet",
        spots="results/ingest/{sample}/spots.h5ad",
        slide="results/ingest/{sample}/slide.tif",
    output:
        spots=expand(
            "results/apply/{{bundle}}/{{sample}}/spots_{um}um.h5ad",
            um=APPLY_SPOT_LABELS,
        ),
        bins=expand("results/apply/{{bundle}}/{{sample}}/bins_{um}um.h5ad", um=APPLY_BIN_LABELS),
    log:
        "logs/apply/{bundle}/{sample}_tables.log",
    wildcard_constraints:
        bundle=apply_runs(dense=True),
    conda:
        "../../envs/models.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    params:
        spot_diameters_um=APPLY["spot_diameters_um"],
        spot_spacing_um=APPLY["spot_spacing_um"],
        bin_um=APPLY["bin_um"],
        mask_mpp=config["tiling"]["mask_mpp"],
    script:
        "../scripts/apply_bundle.py"


rule apply_spot_tables:
    input:
        model=lambda wc: f"{apply_bundle(wc.bundle)}/model.pt",
        bundle=lambda wc: f"{apply_bundle(wc.bundle)}/bundle.json",
        slide=lambda wc: apply_model_slide(wc.bundle, wc.sample),
        tiles="results/tiles/{sample}.parquet",
        spots="results/ingest/{sample}/spots.h5ad",
    output:
        spots=expand(
            "results/apply/{{bundle}}/{{sample}}/spots_{um}um.h5ad",
            um=APPLY_SPOT_LABELS,
        ),
    log:
        "logs/apply/{bundle}/{sample}_tables.log",
    wildcard_constraints:
        bundle=apply_runs(dense=False),
    conda:
        "../../envs/models.yaml"
    threads: TORCH_THREADS
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["light"],
        gpu=config["resources"]["gpu"],
    params:
        torch_threads=TORCH_THREADS,
        spot_diameters_um=APPLY["spot_diameters_um"],
        spot_spacing_um=APPLY["spot_spacing_um"],
        mask_mpp=config["tiling"]["mask_mpp"],
        device=config["train"].get("device", "auto"),
    script:
        "../scripts/apply_bundle.py"


rule apply_figure:
    input:
        bundle=lambda wc: f"{apply_bundle(wc.bundle)}/bundle.json",
        slide="results/ingest/{sample}/slide.tif",
        maps=lambda wc: (
            f"results/apply/{wc.bundle}/{wc.sample}/dense.zarr"
            if apply_is_dense(wc.bundle)
            else apply_tables(wc.bundle, wc.sample)[0]
        ),
    output:
        report(
            "results/apply/{bundle}/{sample}/map.png",
            caption="../report/apply_map.rst",
            category="Applied models",
            subcategory="{bundle}",
        ),
    log:
        "logs/apply/{bundle}/{sample}_figure.log",
    wildcard_constraints:
        bundle=APPLY_RUNS,
    conda:
        "../../envs/models.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    params:
        n_genes=APPLY["figure_genes"],
        mask_mpp=config["tiling"]["mask_mpp"],
    script:
        "../scripts/apply_bundle.py"


# One SpatialData per applied sample: the H&E, every applied dense map (gene channels) and
# every pseudo-spot/bin table with its own shapes, in `global` (um) and `pixels`.
rule apply_spatialdata:
    input:
        sample="results/ingest/{sample}/sample.zarr",
        dense=lambda wc: list(apply_sample_dense(wc.sample).values()),
        tables=lambda wc: list(apply_sample_tables(wc.sample).values()),
    output:
        directory("results/spatialdata/apply/{sample}.zarr"),
    params:
        dense_runs=lambda wc: list(apply_sample_dense(wc.sample)),
        table_names=lambda wc: list(apply_sample_tables(wc.sample)),
    log:
        "logs/apply/spatialdata/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/sample_spatialdata.py"


# The trivial baseline: the per-gene mean of the fold's training spots, constant over space
# (histomap.tasks.mean); no torch, no image.
rule train_mean:
    input:
        st=lambda wc: train_inputs(wc)["st"],
        genes=lambda wc: train_inputs(wc)["genes"],
    output:
        model="results/models/{model}/{fold}/seed{tseed}/means.tsv",
    wildcard_constraints:
        model=model_runs("mean"),
    log:
        "logs/train/{model}/{fold}/seed{tseed}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/train_mean.py"


rule predict_mean:
    input:
        model="results/models/{model}/{fold}/seed{tseed}/means.tsv",
        centres="results/st/{sample}.h5ad",
    output:
        "results/predictions/{model}/{fold}/seed{tseed}/{sample}/spots_{um}um.h5ad",
    wildcard_constraints:
        model=model_runs("mean"),
    log:
        "logs/predict/{model}/{fold}/seed{tseed}/{sample}_{um}um.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/predict_mean.py"


rule predict_mean_scales:
    input:
        model="results/models/{model}/{fold}/seed{tseed}/means.tsv",
        centres=expand("results/scales/{{sample}}/truth_{um}um.h5ad", um=CROSS_SCALE_LABELS),
    output:
        expand(
            "results/predictions/{{model}}/{{fold}}/seed{{tseed}}/{{sample}}/scale_{um}um.h5ad",
            um=CROSS_SCALE_LABELS,
        ),
    wildcard_constraints:
        model=model_runs("mean"),
    params:
        diameters_um=CROSS_SCALE.get("diameters_um", []),
    log:
        "logs/predict/{model}/{fold}/seed{tseed}/{sample}_scales.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/predict_mean.py"
