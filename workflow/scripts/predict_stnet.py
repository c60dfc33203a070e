"""Snakemake adapter: ST-Net-style predictions for the spots of one held-out sample."""
import torch

from histomap.logs import run_step
from histomap.spot_model import predict_spot_model


def main(sm):
    torch.set_num_threads(sm.threads)
    predict_spot_model(sm.input.model, sm.input.st, sm.input.slide, sm.output[0],
                       batch_size=sm.params.train["batch_size"],
                       device=sm.params.train.get("device", "auto"))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
