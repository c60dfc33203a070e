rule normalise_st:
    input:
        spots="results/ingest/{sample}/spots.h5ad",
    output:
        "results/st/{sample}.h5ad",
    params:
        preprocess=config["preprocess"],
    log:
        "logs/normalise_st/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/normalise_st.py"


rule select_genes:
    input:
        st=expand("results/st/{sample}.h5ad", sample=ST_SAMPLES),
    output:
        f"results/genes/{GENE_PANEL}.tsv",
    params:
        genes=config["genes"],
    log:
        f"logs/select_genes/{GENE_PANEL}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/select_genes.py"
