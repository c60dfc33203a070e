rule evaluate:
    input:
        predictions=lambda wc: prediction_files(wc.model, wc.fold, wc.tseed),
        truth=lambda wc: [f"results/st/{s}.h5ad" for s in fold_samples(wc.fold, "test")],
        genes=lambda wc: genes_for_fold(wc.fold),
    output:
        "results/metrics/spot/{model}/{fold}/seed{tseed}.parquet",
    params:
        task="spot",
        dataset=config["dataset"],
        gene_set=GENE_PANEL,
        fold_kind=lambda wc: FOLD_KINDS[wc.fold],
        samples=lambda wc: fold_samples(wc.fold, "test"),
    log:
        "logs/evaluate/spot/{model}/{fold}/seed{tseed}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/evaluate.py"


# Cross-scale: ground truth re-measured from highres.h5ad with discs of each diameter on a
# lattice, every disc whose centre is in the H&E tissue mask (empty ones: zeros), normalised like
# the training spots (histomap.evaluation.scales), and every cross-scale model scored on exactly
# its discs (dense models at every diameter, spot models at their training one, predicted at
# the same centres: one set of discs per column, its size recorded as n_spots_scored); qc_*
# keeps the discs that pass the spot QC, the targets of mixed-scale training.
rule truth_at_scale:
    input:
        highres="results/ingest/{sample}/highres.h5ad",
        st="results/st/{sample}.h5ad",
        slide="results/ingest/{sample}/slide.tif",
    output:
        truth=expand("results/scales/{{sample}}/truth_{um}um.h5ad", um=CROSS_SCALE_LABELS),
        qc=expand("results/scales/{{sample}}/qc_{um}um.h5ad", um=CROSS_SCALE_LABELS),
    params:
        preprocess=CROSS_SCALE_PREPROCESS,
        mask_mpp=config["tiling"]["mask_mpp"],
        min_spacing_um=CROSS_SCALE.get("min_spacing_um", 10.0),
        diameters_um=CROSS_SCALE.get("diameters_um", []),
    log:
        "logs/truth_at_scale/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/truth_at_scale.py"


use rule evaluate as evaluate_cross_scale with:
    input:
        predictions=lambda wc: [
            f"{run_dir('predictions', wc.model, wc.fold, wc.tseed)}/{s}/scale_{um}um.h5ad"
            for s, um in cross_scale_pairs(wc.fold, wc.model)
        ],
        truth=lambda wc: [
            f"results/scales/{s}/truth_{um}um.h5ad"
            for s, um in cross_scale_pairs(wc.fold, wc.model)
        ],
        genes=lambda wc: genes_for_fold(wc.fold),
    output:
        "results/metrics/cross_scale/{model}/{fold}/seed{tseed}.parquet",
    params:
        task="cross_scale",
        dataset=config["dataset"],
        gene_set=GENE_PANEL,
        fold_kind=lambda wc: FOLD_KINDS[wc.fold],
        samples=lambda wc: [s for s, _ in cross_scale_pairs(wc.fold, wc.model)],
    log:
        "logs/evaluate/cross_scale/{model}/{fold}/seed{tseed}.log",


rule benchmark_tables:
    input:
        metrics=metric_files(),
        ingest=[f"results/ingest/{s}/spots.h5ad" for s in samples.index],
    output:
        csv=report(
            "results/report/benchmark.csv",
            caption="../report/benchmark.rst",
            category="Benchmark",
        ),
        md="results/report/benchmark.md",
        html=report(
            "results/report/benchmark.html",
            caption="../report/benchmark_html.rst",
            category="Benchmark",
        ),
        pcc=report(
            "results/report/figures/pcc_distribution.png",
            caption="../report/pcc_distribution.rst",
            category="Benchmark",
        ),
    log:
        "logs/benchmark_tables.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/benchmark_tables.py"


rule figures:
    input:
        prediction=lambda wc: native_prediction(wc.model, wc.fold, TRAIN_SEEDS[0], wc.sample),
        truth="results/st/{sample}.h5ad",
        slide="results/ingest/{sample}/slide.tif",
        metrics=f"results/metrics/spot/{{model}}/{{fold}}/seed{TRAIN_SEEDS[0]}.parquet",
    output:
        report(
            "results/report/figures/{model}/{fold}_{sample}.png",
            caption="../report/expression_maps.rst",
            category="Expression maps",
            subcategory="{model}",
        ),
    params:
        n_genes=config["report"]["figure_genes"],
    log:
        "logs/figures/{model}/{fold}_{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


# One SpatialData per sample: ingest's sample.zarr plus every held-out run's dense map (images,
# genes as channels) and spot predictions (tables annotating the spots), in micrometres.
rule sample_spatialdata:
    input:
        sample="results/ingest/{sample}/sample.zarr",
        dense=lambda wc: list(sample_dense_maps(wc.sample).values()),
        predictions=lambda wc: list(sample_predictions(wc.sample).values()),
    output:
        directory("results/spatialdata/{sample}.zarr"),
    params:
        dense_runs=lambda wc: list(sample_dense_maps(wc.sample)),
        prediction_runs=lambda wc: list(sample_predictions(wc.sample)),
    log:
        "logs/sample_spatialdata/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/sample_spatialdata.py"


# Report figures: dense maps over the H&E, training curves, the cross-scale plot.
rule dense_map_figure:
    input:
        dense=f"results/predictions/{{model}}/{{fold}}/seed{TRAIN_SEEDS[0]}/{{sample}}/dense.zarr",
        truth="results/st/{sample}.h5ad",
        slide="results/ingest/{sample}/slide.tif",
        metrics=f"results/metrics/spot/{{model}}/{{fold}}/seed{TRAIN_SEEDS[0]}.parquet",
    output:
        report(
            "results/report/figures/dense/{model}/{fold}_{sample}.png",
            caption="../report/dense_maps.rst",
            category="Dense maps",
            subcategory="{model}",
        ),
    wildcard_constraints:
        model=DENSE_RUNS,
    params:
        n_genes=config["report"]["figure_genes"],
        mask_mpp=config["tiling"]["mask_mpp"],
    log:
        "logs/figures/dense/{model}/{fold}_{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/dense_map_figure.py"


rule training_curves:
    input:
        [path for _, path in training_logs()],
    output:
        report(
            "results/report/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
    params:
        labels=[label for label, _ in training_logs()],
    log:
        "logs/figures/training_curves.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/training_curves.py"


rule cross_scale_figure:
    input:
        "results/report/benchmark.csv",
    output:
        report(
            "results/report/figures/cross_scale.png",
            caption="../report/cross_scale.rst",
            category="Cross-scale",
        ),
    log:
        "logs/figures/cross_scale.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/cross_scale_figure.py"


# The run manifest (histomap.manifest): every file under results/ with its size and SHA-256, the
# inputs' hashes, the merged config, package versions and the code version; checked later with
# `histomap verify results`. The last target of `rule all`.
rule manifest:
    input:
        PLAN.all_targets(),
    output:
        MANIFEST,
    params:
        config=config,
        configfiles=[str(p) for p in workflow.configfiles],
        inputs=manifest_input_files(),
        repo=workflow.basedir,
    log:
        "logs/manifest.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/write_manifest.py"
