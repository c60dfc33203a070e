"""Snakemake adapter: fit the linear probe of one fold (ridge on cached frozen features)."""
from histomap.data.preprocess import read_gene_panel
from histomap.logs import run_step
from histomap.threads import set_threads
from histomap.tasks.probe import train_probe


def main(sm):
    set_threads(sm.params.torch_threads)
    p = sm.params
    train_probe(sm.input.st, sm.input.slides, read_gene_panel(sm.input.genes), model_cfg=p.model,
                validation=p.validation, seed=p.seed, out_model=sm.output.model,
                out_log=sm.output.log_csv, feature_caches=list(sm.input.features))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
