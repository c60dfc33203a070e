"""Snakemake adapter: train a spot model (ST-Net-style or HistoGene-style) of one fold and seed."""
from histomap.data.preprocess import read_gene_panel
from histomap.logs import run_step


def main(sm):
    p = sm.params
    if p.base == "histogene":
        from histomap.tasks.histogene import train_histogene as train
        kwargs = {}
    else:
        from histomap.tasks.spot import train_spot_model as train
        kwargs = {"model_name": p.base, "feature_caches": list(sm.input.features) or None}
    train(sm.input.st, sm.input.slides, read_gene_panel(sm.input.genes), model_cfg=p.model,
          train_cfg=p.train, validation=p.validation, seed=p.seed, out_model=sm.output.model,
          out_log=sm.output.log_csv, checkpoint_dir=p.checkpoint_dir, **kwargs)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
