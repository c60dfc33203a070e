"""Snakemake adapter: training and validation loss per epoch of every trained model."""
import pandas as pd

from histomap.evaluation.figures import plot_training_curves
from histomap.logs import run_step


def main(sm):
    logs = {}
    for label, path in zip(sm.params.labels, sm.input, strict=True):
        try:
            logs[label] = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            logs[label] = pd.DataFrame()
    plot_training_curves(logs, sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
