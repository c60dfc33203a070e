"""Snakemake adapter: the nested choices per outer fold with every candidate's inner scores
(histomap.evaluation.nested) -> nested_choices.md, nested_choices.csv."""
from histomap.evaluation.nested import choices_markdown, choices_table, outer_scores, read_choice
from histomap.logs import run_step
from histomap.outputs import write_text_atomic


def main(sm):
    choices = [read_choice(p) for p in sm.input.choices]
    outer = outer_scores(sm.input.outer, sorted({c["metric"] for c in choices}))
    table = choices_table(choices, outer)
    write_text_atomic(sm.output.csv, table.to_csv(index=False))
    write_text_atomic(sm.output.md, choices_markdown(choices, table))


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
