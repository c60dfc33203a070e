"""Snakemake adapter: a dense map's best-predicted genes over the H&E (on tissue only), beside the
measured spots on the same colour scale."""
import anndata as ad
import numpy as np
import pandas as pd

from histomap.data.slide import open_slide
from histomap.evaluation.figures import plot_dense_maps
from histomap.logs import run_step
from histomap.tasks.apply import map_on_tissue
from histomap.tasks.dense_map import read_dense

THUMB_PX = 1024


def main(sm):
    sample = sm.wildcards.sample
    metrics = pd.read_parquet(sm.input.metrics)
    pcc = metrics[(metrics["sample"] == sample) & (metrics["metric"] == "pcc")].dropna(
        subset=["value"]).sort_values("value", ascending=False)
    dmap = read_dense(sm.input.dense)
    ranked = [g for g in pcc["gene"] if g in dmap.genes] or list(dmap.genes)
    genes = ranked[: int(sm.params.n_genes)]
    level = dmap.level_for(THUMB_PX)
    array = dmap.level(level)
    index = {g: i for i, g in enumerate(dmap.genes)}
    maps = {g: np.asarray(array[index[g]], np.float32) for g in genes}
    # drawn on tissue only: the map's mask at that level and the slide's tissue mask
    mask = map_on_tissue(dmap, sm.input.slide, step=2 ** level,
                         mask_mpp=float(sm.params.mask_mpp))
    h0, w0 = dmap.mask.shape
    px0 = dmap.mpp / dmap.slide_mpp
    box = (*dmap.origin_px, w0 * px0, h0 * px0)
    with open_slide(sm.input.slide) as slide:
        thumb = np.asarray(slide.get_thumbnail((THUMB_PX, THUMB_PX)).convert("RGB"))
        downsample = slide.dimensions[0] / thumb.shape[1]
    gene_pcc = dict(zip(pcc["gene"], pcc["value"]))
    plot_dense_maps(maps, box, mask, ad.read_h5ad(sm.input.truth), thumb, downsample,
                    sm.output[0], gene_pcc=gene_pcc,
                    title=f"{sm.wildcards.model}, fold {sm.wildcards.fold}, held-out {sample} "
                          f"(map level {level}: {dmap.mpp * 2 ** level:g} µm/px)")


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
