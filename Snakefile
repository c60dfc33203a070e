# histomap: H&E + spatial transcriptomics -> high-resolution gene-expression maps.
# Run: snakemake --cores all [--configfile config/her2st.yaml]
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/nested.smk"
include: "workflow/rules/superres.smk"


rule all:
    input:
        all_targets(),
    default_target: True
