"""Snakemake adapter: one slide normalised to a fold's stain reference (histomap.data.stain)."""
from histomap.data.stain import StainProfile, normalise_slide
from histomap.logs import run_step


def main(sm):
    normalise_slide(sm.input.slide, StainProfile.read(sm.input.reference), sm.output.slide,
                    sm.output.profile)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
