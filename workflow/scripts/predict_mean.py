"""Snakemake adapter: the `mean` baseline at a held-out sample's spots (`um` wildcard) or at the
cross-scale discs (`params.diameters_um`, parallel to `input.centres` and the outputs)."""
from histomap.logs import run_step
from histomap.tasks.mean import predict_mean


def main(sm):
    if "um" in sm.wildcards.keys():
        predict_mean(sm.input.model, sm.input.centres, sm.output[0],
                     diameter_um=float(sm.wildcards.um))
        return
    for diameter, centres, out in zip(sm.params.diameters_um, sm.input.centres, sm.output,
                                      strict=True):
        predict_mean(sm.input.model, centres, out, diameter_um=float(diameter))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
