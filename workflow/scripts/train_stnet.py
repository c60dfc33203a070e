"""Snakemake adapter: train the ST-Net-style spot regressor of one fold."""
import torch

from histomap.logs import run_step
from histomap.preprocess import read_gene_panel
from histomap.spot_model import train_spot_model


def main(sm):
    torch.set_num_threads(sm.threads)
    p = sm.params
    train_spot_model(sm.input.st, sm.input.slides, read_gene_panel(sm.input.genes),
                     model_name="stnet", model_cfg=p.model, train_cfg=p.train,
                     validation=p.validation, seed=p.seed, out_model=sm.output.model,
                     out_log=sm.output.log_csv, checkpoint_dir=p.checkpoint_dir)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
