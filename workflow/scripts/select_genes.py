"""Snakemake adapter: the gene panel of one fold, chosen from the fold's training samples."""
from pathlib import Path

import anndata as ad

from histomap.data.preprocess import select_genes, write_gene_panel
from histomap.logs import run_step


def main(sm):
    g = sm.params.genes
    st = {Path(f).stem: ad.read_h5ad(f) for f in sm.input.st}
    # the fold's test sections: only their gene names (which genes can be scored there)
    measured = {Path(f).stem: list(ad.read_h5ad(f, backed="r").var_names)
                for f in sm.input.measured}
    genes = select_genes(st, method=g["method"], n_genes=g["n_genes"], genes=g.get("list"),
                         measured=measured, path=sm.output[0])
    write_gene_panel(genes, sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
