"""Snakemake adapter: super-resolution applied to a sample without HR truth (rules
apply_sr_inputs: its measured spots as the SR bundle's LR-only inputs; apply_sr_figure: LR input
and prediction for a few patches and genes). Prediction itself: predict_sr.py (rule apply_sr)."""
from histomap.logs import run_step


def main(sm):
    w = sm.wildcards
    if sm.rule == "apply_sr_inputs":
        from histomap.tasks.superres.apply import lr_inputs_for_model

        lr_inputs_for_model(sm.input.model, sm.input.spots, sm.input.slide, sm.output[0],
                            sample=w.sample)
    else:  # apply_sr_figure
        from histomap.evaluation.figures import plot_sr_panels, sr_panels

        panels = sr_panels(sm.input.pairs, sm.input.maps, n_patches=sm.params.n_patches,
                           n_genes=sm.params.n_genes)
        plot_sr_panels(panels, sm.output[0],
                       title=f"{w.sr_method} x{w.sr_scale} applied to {w.sample} (no HR truth)")


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
