"""Snakemake adapter: measured vs predicted expression over the H&E for a few genes."""
import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.slide import open_slide
from histomap.evaluation.figures import plot_expression_maps
from histomap.logs import run_step


def pick_genes(metrics_file, sample, n):
    """The best and the worst predicted genes of this slide (by signed PCC)."""
    m = pd.read_parquet(metrics_file)
    rows = m[(m["sample"] == sample) & (m["metric"] == "pcc")]
    pcc = rows.dropna(subset=["value"])
    if pcc.empty:  # e.g. the `mean` baseline's constant prediction: no PCC to rank by
        return list(rows["gene"])[:n]
    ranked = list(pcc.sort_values("value", ascending=False)["gene"])
    best = ranked[: (n + 1) // 2]
    worst = [g for g in ranked[::-1] if g not in best][: n // 2]
    return best + worst


def main(sm):
    sample = sm.wildcards.sample
    genes = pick_genes(sm.input.metrics, sample, sm.params.n_genes)
    with open_slide(sm.input.slide) as slide:
        thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
        downsample = slide.dimensions[0] / thumb.shape[1]
    plot_expression_maps(ad.read_h5ad(sm.input.truth), ad.read_h5ad(sm.input.prediction), genes,
                         thumb, downsample, sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
