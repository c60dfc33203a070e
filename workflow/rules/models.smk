# Training and prediction. Each fold trains on its training samples only (train_inputs); validation
# for early stopping is carved out of those (config: validation), never out of the test fold.


rule train_stnet:
    input:
        unpack(train_inputs),
    output:
        model="results/models/stnet/{fold}/model.pt",
        log_csv="results/models/stnet/{fold}/train_log.csv",
    params:
        model=config["stnet"],
        train=config["train"],
        validation=config["validation"],
        seed=config["seed"],
        samples=lambda wc: fold_samples(wc.fold, "train"),
        checkpoint_dir=lambda wc: f"results/models/stnet/{wc.fold}/checkpoints",
    log:
        "logs/train_stnet/{fold}.log",
    threads: config["resources"]["threads"]["train"]
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["train"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_stnet.py"


rule predict_stnet:
    input:
        model="results/models/stnet/{fold}/model.pt",
        st="results/st/{sample}.h5ad",
        slide="results/ingest/{sample}/slide.tif",
    output:
        "results/predictions/stnet/{fold}/{sample}/spots_{um}um.h5ad",
    params:
        train=config["train"],
    log:
        "logs/predict_stnet/{fold}/{sample}_{um}um.log",
    threads: config["resources"]["threads"]["train"]
    resources:
        mem_mb=config["resources"]["mem_mb"]["train"],
        runtime=config["resources"]["runtime"]["light"],
        gpu=config["resources"]["gpu"],
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/predict_stnet.py"
