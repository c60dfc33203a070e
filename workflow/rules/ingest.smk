rule simulate_sample:
    output:
        directory("results/synthetic/{sample}"),
    params:
        synthetic=synthetic_params,
        seed=config["seed"],
    log:
        "logs/simulate_sample/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/simulate_sample.py"


rule ingest_sample:
    input:
        unpack(ingest_inputs),
    output:
        slide="results/ingest/{sample}/slide.tif",
        spots="results/ingest/{sample}/spots.h5ad",
        highres="results/ingest/{sample}/highres.h5ad",
        zarr=directory("results/ingest/{sample}/sample.zarr"),
    params:
        platform=lambda wc: samples.loc[wc.sample, "platform"],
        mpp=lambda wc: sample_value(wc.sample, "mpp"),
        spot_diameter_um=lambda wc: spot_diameter_um(wc.sample),
        spatialdata_mpp=config["ingest"]["spatialdata_mpp"],
        sheet=SAMPLE_SHEET,
        reader_options=lambda wc: reader_options(wc.sample),
        image_keyword=lambda wc: image_keyword(wc.sample),
        max_dropped_fraction=config["ingest"].get("max_dropped_fraction", 0.05),
        min_spots_on_tissue=config["ingest"].get("min_spots_on_tissue", 0.5),
        mask_mpp=config["tiling"]["mask_mpp"],
    log:
        "logs/ingest_sample/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/ingest_sample.py"


# The tile images (zarr) are written only on request (tiling.write_tiles): models read the slide.
rule tile_slide:
    input:
        slide="results/ingest/{sample}/slide.tif",
    output:
        **tile_outputs(),
    params:
        tiling=config["tiling"],
    log:
        "logs/tile_slide/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/tile_slide.py"


# The worked example's H&E-only slides (config/apply.yaml): a synthetic section of the sheet's
# name, rendered by simulate_sample, kept as an image alone (.tif with its mpp, or .png).
rule synthetic_he_slide:
    input:
        "results/synthetic/{sample}",
    output:
        "results/synthetic_he/{sample}.{ext}",
    log:
        "logs/synthetic_he_slide/{sample}_{ext}.log",
    wildcard_constraints:
        ext="tif|png|jpg",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    script:
        "../scripts/synthetic_he_slide.py"


# The frozen encoder's features, once per sample x encoder x mpp (histomap.tasks.feature_cache):
# every fold and seed of a frozen-encoder model (pixnet/istar with `feature_cache: true`, the
# linear probe) trains from them instead of running the encoder on every window.
rule encode_slide:
    input:
        slide="results/ingest/{sample}/slide.tif",
        st="results/st/{sample}.h5ad",
        tiles="results/tiles/{sample}.parquet",
    output:
        directory("results/features/{encoder}/{mpp}/{sample}.zarr"),
    wildcard_constraints:
        encoder=r"[A-Za-z0-9_.-]+",
        mpp=r"[0-9.]+",
    params:
        torch_threads=TORCH_THREADS,
        features=config.get("features", {}),
    log:
        "logs/encode_slide/{encoder}/{mpp}/{sample}.log",
    threads: TORCH_THREADS
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/encode_slide.py"


# Stain normalisation (a model's `stain_normalise`; histomap.data.stain): each fold's reference
# is fitted on that fold's training slides only; every slide a model of the fold reads is
# normalised to it, and the features of a frozen encoder are cached per reference.
rule stain_reference:
    input:
        slides=lambda wc: stain_reference_slides(wc.fold),
    output:
        "results/stain/{method}/{fold}/reference.json",
    wildcard_constraints:
        method="macenko|reinhard",
    log:
        "logs/stain_reference/{method}/{fold}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/stain_reference.py"


rule stain_slide:
    input:
        slide="results/ingest/{sample}/slide.tif",
        reference="results/stain/{method}/{fold}/reference.json",
    output:
        slide="results/stain/{method}/{fold}/{sample}/slide.tif",
        profile="results/stain/{method}/{fold}/{sample}/source.json",
    wildcard_constraints:
        method="macenko|reinhard",
    log:
        "logs/stain_slide/{method}/{fold}/{sample}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["slide"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/stain_slide.py"


use rule encode_slide as encode_stained_slide with:
    input:
        slide="results/stain/{method}/{fold}/{sample}/slide.tif",
        st="results/st/{sample}.h5ad",
        tiles="results/tiles/{sample}.parquet",
    output:
        directory("results/features/{encoder}/{mpp}/stain_{method}/{fold}/{sample}.zarr"),
    log:
        "logs/encode_slide/{encoder}/{mpp}/stain_{method}/{fold}/{sample}.log",
