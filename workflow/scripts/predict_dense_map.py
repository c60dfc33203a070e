"""Snakemake adapter: whole-slide dense map (dense.zarr) of one held-out sample."""
from histomap.logs import run_step
from histomap.threads import set_threads
from histomap.tasks.dense import predict_dense


def main(sm):
    set_threads(sm.params.torch_threads)
    predict_dense(sm.input.model, sm.input.slide, sm.input.tiles, sm.input.st, sm.output[0],
                  device=sm.params.train.get("device", "auto"), cover_um=sm.params.cover_um,
                  cover=list(zip(sm.input.cover, sm.params.cover_diameters_um, strict=True)),
                  cpu_bf16=sm.params.cpu_bf16, dtype=sm.params.dense_dtype)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
