"""Snakemake adapter: generate one synthetic section (H&E, cells, spots): the dataset's biology
from the workflow seed, the section's layout, composition, staining and depth from its own, and
with `synthetic.patient_effects` its patient's (the sheet's patient column, in params.synthetic)."""
import zlib

from histomap.data.synthetic import simulate_sample
from histomap.logs import run_step

sm = snakemake  # noqa: F821 (injected by Snakemake)
sample = sm.wildcards.sample
# one reproducible seed per sample: the global seed plus a stable hash of the sample name
seed = int(sm.params.seed) + zlib.crc32(sample.encode()) % 100_000
run_step(sm.log[0], simulate_sample, sm.output[0], seed=seed, dataset_seed=int(sm.params.seed),
         **sm.params.synthetic)
