"""Snakemake adapter: cross-scale ground truth of one sample at every configured diameter."""
import anndata as ad

from histomap.evaluation.scales import truth_at_scale
from histomap.logs import run_step


def main(sm):
    highres, spots = ad.read_h5ad(sm.input.highres), ad.read_h5ad(sm.input.st)
    for diameter, out in zip(sm.params.diameters_um, sm.output, strict=True):
        truth_at_scale(highres, spots, float(diameter), min_spacing_um=sm.params.min_spacing_um,
                       preprocess=sm.params.preprocess, path=sm.input.highres).write_h5ad(out)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
