"""Snakemake adapter: a slide normalised to an applied bundle's stain reference."""
from histomap.data.stain import normalise_slide
from histomap.logs import run_step
from histomap.tasks.bundle import read_bundle


def main(sm):
    reference = read_bundle(sm.input.bundle, check_weights=False).stain
    normalise_slide(sm.input.slide, reference, sm.output.slide, sm.output.profile)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
