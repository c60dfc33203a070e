"""Snakemake adapter: the nested choice of one outer fold (histomap.evaluation.nested.choose)
from the inner runs' metric files only -> results/nested/{nested}/{fold}.json."""
import json
import logging

from histomap.evaluation.nested import choose
from histomap.logs import run_step
from histomap.outputs import write_text_atomic


def main(sm):
    record = choose(sm.params.settings, list(sm.input.metrics))
    logging.getLogger("choose_nested").info("%s", record["note"])
    write_text_atomic(sm.output[0], json.dumps(record, indent=2) + "\n")


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
