"""Snakemake adapter: a fold's stain reference, fitted on its training slides only
(histomap.data.stain)."""
from histomap.data.stain import fit_slides
from histomap.logs import run_step


def main(sm):
    fit_slides(sm.wildcards.method, list(sm.input.slides)).write(sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
