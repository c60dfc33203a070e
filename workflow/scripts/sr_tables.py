"""Snakemake adapter: the super-resolution tables (Diff-ST Table 1 shape, ablations)."""
from histomap.evaluation.html import write_html
from histomap.evaluation.srreport import sr_tables
from histomap.logs import run_step


def main(sm):
    p = sm.params
    sr_tables(list(sm.input.metrics), sm.output.csv, sm.output.md, methods=p.methods,
              ablations=p.ablations, reference=p.reference,
              calibration_files=list(sm.input.calibration))
    write_html(sm.output.md, sm.output.html, "histomap super-resolution benchmark")


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
