"""Snakemake adapter: results/manifest.json, the run's outputs, inputs, config and versions."""
from pathlib import Path

from histomap.logs import run_step
from histomap.manifest import write_manifest


def main(sm):
    out = Path(sm.output[0])
    write_manifest(out.parent, out, config=dict(sm.params.config),
                   configfiles=list(sm.params.configfiles), inputs=list(sm.params.inputs),
                   repo_dir=sm.params.repo)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
