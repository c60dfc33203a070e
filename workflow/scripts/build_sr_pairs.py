"""Snakemake adapter: super-resolution pairs (LR, HR, H&E, mask) of one sample at one factor."""
from histomap.data.preprocess import read_gene_panel
from histomap.data.srpairs.sample import build_sample_pairs
from histomap.logs import run_step


def main(sm):
    p = sm.params
    build_sample_pairs(p.platform, sm.input.counts, sm.input.slide,
                       read_gene_panel(sm.input.genes), sm.output[0],
                       scale=int(sm.wildcards.sr_scale), pairs_cfg=p.pairs,
                       sample=sm.wildcards.sample, n_genes=p.n_genes)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
