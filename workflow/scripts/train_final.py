"""Snakemake adapter: train a deployable bundle of one model on every ST sample (train_final)."""
from pathlib import Path

from histomap.data.preprocess import read_gene_panel
from histomap.logs import run_step
from histomap.tasks.bundle import train_bundle


def main(sm):
    p = sm.params
    train_bundle(p.base, sm.input.st, sm.input.slides, read_gene_panel(sm.input.genes),
                 name=sm.wildcards.model, model_cfg=p.model, train_cfg=p.train,
                 validation=p.validation, seed=p.seed, out_dir=Path(sm.output.bundle).parent,
                 checkpoint_dir=p.checkpoint_dir,
                 extra_st_paths=p.extra_st if p.base in ("pixnet", "istar") else None,
                 stain_reference=sm.input.get("stain_reference"))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
