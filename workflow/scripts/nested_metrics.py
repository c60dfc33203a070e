"""Snakemake adapter: the nested row's spot metrics of one outer fold and seed, the chosen
candidate's own (histomap.evaluation.nested.nested_row)."""
import logging

from histomap.evaluation.nested import nested_row, read_choice
from histomap.logs import run_step
from histomap.outputs import atomic_output


def main(sm):
    choice = read_choice(sm.input.choice)
    tables = dict(zip(sm.params.candidates, sm.input.metrics, strict=True))
    row = nested_row(choice, tables, sm.wildcards.fold, int(sm.wildcards.tseed))
    logging.getLogger("nested_metrics").info("%s: %s (%s)", sm.wildcards.fold,
                                             choice["chosen"], choice["how"])
    with atomic_output(sm.output[0]) as tmp:
        row.to_parquet(tmp, index=False)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
