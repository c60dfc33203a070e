"""Snakemake adapter: train a dense model (PixNet or iStar-style) of one fold and seed."""
from histomap.data.preprocess import read_gene_panel
from histomap.logs import run_step
from histomap.tasks.dense import train_pixnet


def main(sm):
    p = sm.params
    train_pixnet(sm.input.st, sm.input.slides, read_gene_panel(sm.input.genes),
                 model_cfg=p.model, train_cfg=p.train, validation=p.validation, seed=p.seed,
                 out_model=sm.output.model, out_log=sm.output.log_csv,
                 checkpoint_dir=p.checkpoint_dir, model_name=p.base, extra_st_paths=p.extra_st,
                 feature_caches=list(sm.input.features) or None)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
