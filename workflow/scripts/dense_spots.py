"""Snakemake adapter: spots read out of a dense map. One output per diameter: the `um` wildcard
(spots at the sample's centres) or `params.diameters_um`, parallel to `input.centres` and the
outputs (cross-scale: each diameter with its own ground-truth centres)."""
from histomap.logs import run_step
from histomap.tasks.dense import dense_spot_table


def main(sm):
    if "um" in sm.wildcards.keys():
        dense_spot_table(sm.input.dense, sm.input.centres, float(sm.wildcards.um), sm.output[0])
        return
    centres = list(sm.input.centres)
    for diameter, spots, out in zip(sm.params.diameters_um, centres, sm.output, strict=True):
        dense_spot_table(sm.input.dense, spots, float(diameter), out)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
