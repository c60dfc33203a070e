"""Snakemake adapter: super-resolution panels (H&E, LR, HR truth, prediction, uncertainty) for
a few patches and genes of one held-out sample."""
from histomap.evaluation.figures import plot_sr_panels, sr_panels
from histomap.logs import run_step


def main(sm):
    panels = sr_panels(sm.input.pairs, sm.input.maps, n_patches=sm.params.n_patches,
                       n_genes=sm.params.n_genes)
    plot_sr_panels(panels, sm.output[0],
                   title=f"{sm.wildcards.sr_method} x{sm.wildcards.sr_scale}, fold "
                         f"{sm.params.fold}, held-out {sm.params.sample}")


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
