rule evaluate:
    input:
        predictions=lambda wc: prediction_files(wc.model, wc.fold, wc.tseed),
        truth=lambda wc: [f"results/st/{s}.h5ad" for s in fold_samples(wc.fold, "test")],
        genes=f"results/genes/{GENE_PANEL}.tsv",
    output:
        "results/metrics/spot/{model}/{fold}/seed{tseed}.parquet",
    params:
        task="spot",
        dataset=config["dataset"],
        gene_set=GENE_PANEL,
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


# Cross-scale: ground truth re-measured from highres.h5ad with discs of each diameter
# (histomap.evaluation.scales), normalised like the training spots, and the dense models scored on it.
rule truth_at_scale:
    input:
        highres="results/ingest/{sample}/highres.h5ad",
        st="results/st/{sample}.h5ad",
    output:
        expand("results/scales/{{sample}}/truth_{um}um.h5ad", um=CROSS_SCALE_LABELS),
    params:
        preprocess=CROSS_SCALE_PREPROCESS,
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
            for s, um in cross_scale_pairs(wc.fold)
        ],
        truth=lambda wc: [
            f"results/scales/{s}/truth_{um}um.h5ad" for s, um in cross_scale_pairs(wc.fold)
        ],
        genes=f"results/genes/{GENE_PANEL}.tsv",
    output:
        "results/metrics/cross_scale/{model}/{fold}/seed{tseed}.parquet",
    params:
        task="cross_scale",
        dataset=config["dataset"],
        gene_set=GENE_PANEL,
        samples=lambda wc: [s for s, _ in cross_scale_pairs(wc.fold)],
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
