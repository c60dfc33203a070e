rule evaluate:
    input:
        predictions=lambda wc: prediction_files(wc.model, wc.fold),
        truth=lambda wc: [f"results/st/{s}.h5ad" for s in fold_samples(wc.fold, "test")],
        genes=f"results/genes/{GENE_PANEL}.tsv",
    output:
        "results/metrics/spot/{model}/{fold}.parquet",
    params:
        task="spot",
        dataset=config["dataset"],
        gene_set=GENE_PANEL,
        samples=lambda wc: fold_samples(wc.fold, "test"),
    log:
        "logs/evaluate/spot/{model}/{fold}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/evaluate.py"


rule benchmark_tables:
    input:
        expand("results/metrics/spot/{model}/{fold}.parquet", model=MODELS, fold=FOLDS),
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
        prediction=lambda wc: (
            f"results/predictions/{wc.model}/{wc.fold}/{wc.sample}/"
            f"spots_{scale_label(spot_diameter_um(wc.sample))}um.h5ad"
        ),
        truth="results/st/{sample}.h5ad",
        slide="results/ingest/{sample}/slide.tif",
        metrics="results/metrics/spot/{model}/{fold}.parquet",
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
