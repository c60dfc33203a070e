"""Snakemake adapter: train one super-resolution method on a fold's training pairs."""
import torch

from histomap.logs import run_step
from histomap.tasks.superres import train_sr
from histomap.train import training_threads


def main(sm):
    p = sm.params
    # a fixed thread count (train.torch_threads), not sm.threads: weights independent of --cores
    torch.set_num_threads(training_threads(p.train))
    train_sr(p.method, list(sm.input.pairs), model_cfg=p.model, train_cfg=p.train,
             validation=p.validation, seed=p.seed, out_model=sm.output.model,
             out_log=sm.output.log_csv, checkpoint_dir=p.checkpoint_dir,
             diffusion=p.diffusion, variant=sm.wildcards.sr_method)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
