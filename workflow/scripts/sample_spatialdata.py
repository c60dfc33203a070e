"""Snakemake adapter: one SpatialData per sample (ingest's sample.zarr + every dense map and
spot prediction of the sample's held-out runs)."""
import anndata as ad

from histomap.data.spatial_data import add_predictions, read_spatialdata, write_spatialdata
from histomap.logs import run_step


def main(sm):
    sdata = read_spatialdata(sm.input.sample)
    dense = dict(zip(sm.params.dense_runs, sm.input.dense, strict=True))
    tables = {run: ad.read_h5ad(path)
              for run, path in zip(sm.params.prediction_runs, sm.input.predictions, strict=True)}
    add_predictions(sdata, dense_maps=dense, tables=tables)
    write_spatialdata(sdata, sm.output[0])


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
