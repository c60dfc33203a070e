"""Snakemake adapter: benchmark.csv (long), benchmark.md (paper-shaped), benchmark.html (the
same tables for the report) and the PCC figure."""
from histomap.evaluation.figures import plot_pcc_distribution
from histomap.evaluation.html import write_html
from histomap.evaluation.report import benchmark_long, ingest_markdown, read_metrics, write_report
from histomap.logs import run_step


def main(sm):
    per_gene = read_metrics(sm.input.metrics)
    write_report(benchmark_long(per_gene), sm.output.csv, sm.output.md,
                 extra_md=ingest_markdown(sm.input.ingest))
    write_html(sm.output.md, sm.output.html, "histomap benchmark")
    plot_pcc_distribution(per_gene, sm.output.pcc)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
