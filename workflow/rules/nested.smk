# Nested choice of candidates inside the training patients (histomap.plan.nested), a rule
# written into the config (`nested`) before any run. The inner runs (fold `{outer}~i{patient}`,
# made of the outer fold's training samples only) go through the ordinary train_*, predict_*
# and evaluate rules; choose_nested reads only their metric files; the nested row of an outer
# fold is the chosen candidate's own run there, beside every candidate's row in the tables.
NESTED = PLAN.nested


rule choose_nested:
    input:
        metrics=lambda wc: NESTED.inner_metric_files(wc.nested, wc.fold),
    output:
        "results/nested/{nested}/{fold}.json",
    wildcard_constraints:
        nested=NESTED.runs,
        fold=NESTED.outer_runs,
    params:
        settings=lambda wc: NESTED.choice_params(wc.nested, wc.fold),
    log:
        "logs/nested/{nested}/{fold}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/choose_nested.py"


rule nested_metrics:
    input:
        choice="results/nested/{nested}/{fold}.json",
        metrics=lambda wc: NESTED.outer_metric_files(wc.nested, wc.fold, wc.tseed),
    output:
        "results/metrics/spot/{nested}/{fold}/seed{tseed}.parquet",
    wildcard_constraints:
        nested=NESTED.runs,
        fold=NESTED.outer_runs,
    params:
        candidates=lambda wc: NESTED.rules[wc.nested].candidates,
    log:
        "logs/nested/{nested}/{fold}/seed{tseed}_metrics.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/nested_metrics.py"


rule nested_report:
    input:
        **NESTED.report_inputs(),
    output:
        md="results/report/nested_choices.md",
        csv="results/report/nested_choices.csv",
    log:
        "logs/nested/report.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["mem_mb"]["light"],
        runtime=config["resources"]["runtime"]["light"],
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/nested_report.py"
