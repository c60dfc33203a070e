rule simulate_sample:
    output:
        directory("results/synthetic/{sample}"),
    params:
        synthetic=config["synthetic"],
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


rule tile_slide:
    input:
        slide="results/ingest/{sample}/slide.tif",
    output:
        zarr=directory("results/tiles/{sample}.zarr"),
        index="results/tiles/{sample}.parquet",
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
