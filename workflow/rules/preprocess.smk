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


# The gene panel of a fold, ranked on that fold's training samples only; of the test sections
# only their gene names are read (candidates must be scorable there), never a value.
# `genes.method: list` gives the same listed panel to every fold.
rule select_genes:
    input:
        st=lambda wc: [f"results/st/{s}.h5ad" for s in fold_samples(wc.fold, "train")],
        measured=lambda wc: [f"results/st/{s}.h5ad" for s in fold_samples(wc.fold, "test")],
    output:
        f"results/genes/{GENE_PANEL}/{{fold}}.tsv",
    params:
        genes=config["genes"],
    log:
        f"logs/select_genes/{GENE_PANEL}/{{fold}}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/select_genes.py"
