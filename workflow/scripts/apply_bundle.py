"""Snakemake adapter: a bundle applied to one slide (rules apply_dense, apply_dense_tables,
apply_spot_tables, apply_figure)."""
from pathlib import Path

from histomap.logs import run_step
from histomap.threads import set_threads
from histomap.tasks import apply
from histomap.tasks.bundle import read_bundle


def main(sm):
    bundle = read_bundle(Path(sm.input.bundle).parent)
    p, i = sm.params, sm.input
    if sm.rule in ("apply_dense", "apply_spot_tables"):  # the torch steps
        set_threads(p.torch_threads)
    if sm.rule == "apply_dense":
        apply.apply_dense(bundle, i.slide, i.tiles, sm.output[0], device=p.device)
    elif sm.rule == "apply_dense_tables":
        apply.dense_tables(bundle, i.dense, i.tiles, i.spots, i.slide, mask_mpp=p.mask_mpp,
                           spot_diameters_um=p.spot_diameters_um,
                           spot_spacing_um=p.spot_spacing_um, bin_um=p.bin_um,
                           out_spots=sm.output.spots, out_bins=sm.output.bins)
    elif sm.rule == "apply_spot_tables":
        apply.spot_model_tables(bundle, i.slide, i.tiles, i.spots,
                                spot_diameters_um=p.spot_diameters_um,
                                spot_spacing_um=p.spot_spacing_um, out_spots=sm.output.spots,
                                mask_mpp=p.mask_mpp, device=p.device)
    else:  # apply_figure
        maps = {"dense_zarr": i.maps} if bundle.is_dense else {"spots_h5ad": i.maps}
        apply.plot_applied(i.slide, bundle.genes[:p.n_genes], sm.output[0],
                           title=f"{bundle.name} on {sm.wildcards.sample}",
                           mask_mpp=p.mask_mpp, **maps)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
