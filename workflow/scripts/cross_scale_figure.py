"""Snakemake adapter: the cross-scale plot (PCC@M vs spot diameter per model)."""
import pandas as pd

from histomap.evaluation.figures import plot_cross_scale
from histomap.logs import run_step


def main(sm):
    plot_cross_scale(pd.read_csv(sm.input[0]), sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
