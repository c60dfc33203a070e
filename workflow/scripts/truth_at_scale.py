"""Snakemake adapter: cross-scale ground truth of one sample at every configured diameter
(every lattice disc in the slide's tissue mask) and its QC-passing discs (mixed-scale training
targets)."""
import anndata as ad

from histomap.data.slide import open_slide
from histomap.data.tiling import tissue_mask
from histomap.evaluation.scales import qc_discs, truth_at_scale
from histomap.logs import run_step


def main(sm):
    highres, spots = ad.read_h5ad(sm.input.highres), ad.read_h5ad(sm.input.st)
    with open_slide(sm.input.slide) as slide:
        tissue = tissue_mask(slide, mask_mpp=float(sm.params.mask_mpp))
    diameters = sm.params.diameters_um
    for diameter, out, qc_out in zip(diameters, sm.output.truth, sm.output.qc, strict=True):
        truth = truth_at_scale(highres, spots, float(diameter),
                               min_spacing_um=sm.params.min_spacing_um,
                               preprocess=sm.params.preprocess, tissue=tissue,
                               path=sm.input.highres)
        truth.write_h5ad(out)
        qc_discs(truth).write_h5ad(qc_out)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
