"""Snakemake adapter: a synthetic section's H&E alone, as an H&E-only slide (.tif or .png)."""
from pathlib import Path

from histomap.data.io.he import write_he_only
from histomap.logs import run_step

sm = snakemake  # noqa: F821 (injected by Snakemake)
run_step(sm.log[0], write_he_only, Path(sm.input[0]) / "he.tif", sm.output[0])
