"""Snakemake adapter: one SpatialData per sample. Rule sample_spatialdata: ingest's sample.zarr
+ every dense map and spot prediction of the sample's held-out runs; rule apply_spatialdata:
sample.zarr + every bundle applied to the slide (dense maps, pseudo-spot and bin tables)."""
import anndata as ad

from histomap.data.spatial_data import (
    add_predictions,
    applied_spatialdata,
    read_spatialdata,
    write_spatialdata,
)
from histomap.logs import run_step


def main(sm):
    dense = dict(zip(sm.params.dense_runs, sm.input.dense, strict=True))
    if sm.rule == "apply_spatialdata":
        tables = {name: ad.read_h5ad(path)
                  for name, path in zip(sm.params.table_names, sm.input.tables, strict=True)}
        sdata = applied_spatialdata(sm.input.sample, dense_maps=dense, tables=tables)
    else:
        sdata = read_spatialdata(sm.input.sample)
        tables = {run: ad.read_h5ad(path) for run, path in
                  zip(sm.params.prediction_runs, sm.input.predictions, strict=True)}
        add_predictions(sdata, dense_maps=dense, tables=tables)
    write_spatialdata(sdata, sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
