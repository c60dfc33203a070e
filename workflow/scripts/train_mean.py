"""Snakemake adapter: the `mean` baseline of one fold (per-gene mean of the training spots)."""
from histomap.data.preprocess import read_gene_panel
from histomap.logs import run_step
from histomap.tasks.mean import train_mean


def main(sm):
    train_mean(sm.input.st, read_gene_panel(sm.input.genes), sm.output.model)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
