"""Snakemake adapter: HR maps (zarr) and HR-bin AnnData of one held-out sample's SR pairs."""
from histomap.logs import run_step
from histomap.threads import set_threads
from histomap.tasks.superres.prediction import predict_sr


def main(sm):
    set_threads(sm.params.torch_threads)
    s = sm.params.sampling
    predict_sr(sm.input.model, sm.input.pairs, sm.output.maps, sm.output.bins,
               sampler=s.get("sampler", "respaced"), steps=s.get("steps", 20),
               n_samples=s.get("n_samples", 4), batch_size=s.get("batch_size", 4),
               eta=s.get("eta", 0.0), device=sm.params.device, seed=sm.params.seed,
               sample=sm.wildcards.sample, batch_chains=s.get("batch_chains", "auto"),
               cpu_bf16=s.get("cpu_bf16", "auto"),
               mass_projection=s.get("mass_projection", True))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
