"""Snakemake adapter: QC, library-size normalisation and log1p of one sample's spots."""
import anndata as ad

from histomap.data.preprocess import normalise_spots
from histomap.logs import run_step


def main(sm):
    spots = ad.read_h5ad(sm.input.spots)
    p = sm.params.preprocess
    out = normalise_spots(spots, min_counts=p["min_counts"], min_genes=p["min_genes"],
                          target_sum=p["target_sum"], path=sm.input.spots)
    out.write_h5ad(sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
