"""Snakemake adapter: train one super-resolution method on a fold's training pairs."""
from histomap.logs import run_step
from histomap.tasks.superres.training import train_sr


def main(sm):
    p = sm.params
    train_sr(p.method, list(sm.input.pairs), model_cfg=p.model, train_cfg=p.train,
             validation=p.validation, seed=p.seed, out_model=sm.output.model,
             out_log=sm.output.log_csv, checkpoint_dir=p.checkpoint_dir,
             diffusion=p.diffusion, variant=sm.wildcards.sr_method)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
