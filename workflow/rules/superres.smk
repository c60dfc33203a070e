# Super-resolution benchmark (Diff-ST and its baselines). Per fold, sample and SR factor: aligned
# LR/HR/H&E pairs of the fold's gene panel (chosen from its training samples only). Per method, factor and fold: train on the fold's training samples' pairs
# (validation patches are carved out of those) and predict its test samples (train_diffst /
# predict_diffst for Diff-ST and its ablations, train_sr_baseline / predict_sr_baseline for the
# baselines: same code, same inputs); per method and factor: score every fold's test samples;
# then the Table-1-shaped report. Target and input functions: histomap.plan.superres.

# The `superres` block is validated with the config at start-up (common.smk: validate_config,
# histomap/plan/schemas/superres.schema.yaml).


wildcard_constraints:
    sr_method="|".join(sr_all_method_names()) or "no_sr_method",
    sr_scale=r"\d+",


rule build_sr_pairs:
    input:
        unpack(sr_pairs_inputs),
    output:
        directory("results/sr/pairs/{fold}/{sample}_x{sr_scale}.zarr"),
    params:
        platform=lambda wc: samples.loc[wc.sample, "platform"],
        pairs=lambda wc: sr_pair_settings(wc.fold, wc.sample),
        n_genes=config["superres"].get("n_genes"),
    log:
        "logs/build_sr_pairs/{fold}/{sample}_x{sr_scale}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/build_sr_pairs.py"


rule train_diffst:
    input:
        pairs=sr_train_inputs,
    output:
        model="results/sr/models/{sr_method}/x{sr_scale}/{fold}/model.pt",
        log_csv="results/sr/models/{sr_method}/x{sr_scale}/{fold}/train_log.csv",
    wildcard_constraints:
        sr_method=sr_methods_of("diffst"),
    params:
        method=lambda wc: sr_method(wc.sr_method)[0],
        model=lambda wc: sr_model_config(wc.sr_method),
        train=lambda wc: sr_train_config(wc.sr_method),
        validation=sr_validation(),
        diffusion=lambda wc: sr_diffusion_config(wc.sr_method),
        seed=config["seed"],
        checkpoint_dir=lambda wc: (
            f"results/sr/models/{wc.sr_method}/x{wc.sr_scale}/{wc.fold}/checkpoints"
        ),
    log:
        "logs/train_sr/{sr_method}/x{sr_scale}/{fold}.log",
    threads: sr_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_sr.py"


use rule train_diffst as train_sr_baseline with:
    wildcard_constraints:
        sr_method=sr_methods_of("baseline"),


rule predict_diffst:
    input:
        model="results/sr/models/{sr_method}/x{sr_scale}/{fold}/model.pt",
        pairs="results/sr/pairs/{fold}/{sample}_x{sr_scale}.zarr",
    output:
        maps=directory("results/sr/predictions/{sr_method}/x{sr_scale}/{fold}/{sample}/maps.zarr"),
        bins="results/sr/predictions/{sr_method}/x{sr_scale}/{fold}/{sample}/bins.h5ad",
    wildcard_constraints:
        sr_method=sr_methods_of("diffst"),
    params:
        torch_threads=sr_threads,
        sampling=config["superres"].get("sampling", {}),
        device=config["train"].get("device", "auto"),
        seed=config["seed"],
    log:
        "logs/predict_sr/{sr_method}/x{sr_scale}/{fold}/{sample}.log",
    threads: sr_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/predict_sr.py"


use rule predict_diffst as predict_sr_baseline with:
    wildcard_constraints:
        sr_method=sr_methods_of("baseline"),


rule evaluate_sr:
    input:
        unpack(sr_evaluate_inputs),
    output:
        parquet="results/sr/metrics/{sr_method}/x{sr_scale}.parquet",
        summary="results/sr/metrics/{sr_method}/x{sr_scale}_summary.csv",
        calibration="results/sr/metrics/{sr_method}/x{sr_scale}_calibration.csv",
    params:
        runs=sr_test_runs,
        fold_kinds=lambda wc: [FOLD_KINDS[f] for f, _ in sr_test_runs(wc)],
        dataset=config["dataset"],
    log:
        "logs/evaluate_sr/{sr_method}/x{sr_scale}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/evaluate_sr.py"


rule sr_tables:
    input:
        metrics=sr_metric_files(),
        calibration=sr_calibration_files(),
    output:
        csv=report(
            "results/report/superres.csv",
            caption="../report/superres.rst",
            category="Super-resolution",
        ),
        md="results/report/superres.md",
        html=report(
            "results/report/superres.html",
            caption="../report/superres.rst",
            category="Super-resolution",
        ),
    params:
        methods=config["superres"].get("methods", []),
        ablations=config["superres"].get("ablations", []),
        reference=config["superres"].get("reference", "diffst"),
    log:
        "logs/sr_tables.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/sr_tables.py"


rule sr_figure:
    input:
        unpack(sr_figure_inputs),
    output:
        report(
            "results/report/figures/superres/{sr_method}_x{sr_scale}.png",
            caption="../report/superres_panels.rst",
            category="Super-resolution",
            subcategory="x{sr_scale}",
        ),
    params:
        fold=lambda wc: sr_test_runs(wc)[0][0],
        sample=lambda wc: sr_test_runs(wc)[0][1],
        n_patches=2,
        n_genes=config["report"]["figure_genes"],
    log:
        "logs/figures/superres/{sr_method}_x{sr_scale}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/sr_figure.py"


# Super-resolution applied to samples with LR ST and H&E but no HR truth (apply.superres): the
# SR bundle (train_diffst / train_sr_baseline on fold `final`) on the sample's measured spots as
# the LR map, an output grid `factor` times finer; no truth, so no metrics.
rule apply_sr_inputs:
    input:
        model=f"results/sr/models/{{sr_method}}/x{{sr_scale}}/{FINAL_FOLD}/model.pt",
        spots="results/ingest/{sample}/spots.h5ad",
        slide="results/ingest/{sample}/slide.tif",
    output:
        directory("results/apply/superres/{sr_method}/x{sr_scale}/{sample}/lr.zarr"),
    log:
        "logs/apply/superres/{sr_method}/x{sr_scale}/{sample}_inputs.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/apply_sr.py"


rule apply_sr:
    input:
        model=f"results/sr/models/{{sr_method}}/x{{sr_scale}}/{FINAL_FOLD}/model.pt",
        pairs="results/apply/superres/{sr_method}/x{sr_scale}/{sample}/lr.zarr",
    output:
        maps=directory("results/apply/superres/{sr_method}/x{sr_scale}/{sample}/maps.zarr"),
        bins="results/apply/superres/{sr_method}/x{sr_scale}/{sample}/bins.h5ad",
    params:
        torch_threads=sr_threads,
        sampling=config["superres"].get("sampling", {}),
        device=config["train"].get("device", "auto"),
        seed=config["seed"],
    log:
        "logs/apply/superres/{sr_method}/x{sr_scale}/{sample}_predict.log",
    threads: sr_threads
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/predict_sr.py"


rule apply_sr_figure:
    input:
        pairs="results/apply/superres/{sr_method}/x{sr_scale}/{sample}/lr.zarr",
        maps="results/apply/superres/{sr_method}/x{sr_scale}/{sample}/maps.zarr",
    output:
        report(
            "results/apply/superres/{sr_method}/x{sr_scale}/{sample}/map.png",
            caption="../report/apply_superres.rst",
            category="Applied models",
            subcategory="super-resolution",
        ),
    params:
        n_patches=APPLY_SR["figure_patches"],
        n_genes=APPLY["figure_genes"],
    log:
        "logs/apply/superres/{sr_method}/x{sr_scale}/{sample}_figure.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/apply_sr.py"
