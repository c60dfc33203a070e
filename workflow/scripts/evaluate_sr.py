"""Snakemake adapter: RMSE and signed PCC per patch and gene of one SR method and factor, over
the test samples of every fold."""
from histomap.evaluation.srmetrics import evaluate_sr
from histomap.logs import run_step


def main(sm):
    folds, samples = zip(*sm.params.runs)
    evaluate_sr(list(sm.input.pairs), list(sm.input.maps), sm.output.parquet,
                sm.output.summary, method=sm.wildcards.sr_method,
                scale=int(sm.wildcards.sr_scale), dataset=sm.params.dataset,
                samples=list(samples), folds=list(folds),
                fold_kinds=list(sm.params.fold_kinds), out_calibration=sm.output.calibration)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
