"""Snakemake adapter: per-gene metrics of one model and fold, per held-out slide and pooled."""
import anndata as ad
import pandas as pd

from histomap.logs import run_step
from histomap.metrics import evaluate_predictions
from histomap.preprocess import read_gene_panel
from histomap.sample import geometry


def main(sm):
    p = sm.params
    truth_paths = dict(zip(p.samples, sm.input.truth))
    pred_paths = dict(zip(p.samples, sm.input.predictions))
    truth = {s: ad.read_h5ad(f) for s, f in truth_paths.items()}
    pred = {s: ad.read_h5ad(f) for s, f in pred_paths.items()}
    genes = read_gene_panel(sm.input.genes)
    table = evaluate_predictions(truth, pred, genes, truth_paths=truth_paths,
                                 pred_paths=pred_paths)
    scales = {geometry(a)["spot_diameter_um"] for a in pred.values()}
    if len(scales) != 1:
        raise ValueError(f"predictions of one fold mix spot scales {sorted(scales)}")
    front = pd.DataFrame({"task": p.task, "dataset": p.dataset, "model": sm.wildcards.model,
                          "fold": sm.wildcards.fold, "scale_um": scales.pop(),
                          "gene_set": p.gene_set}, index=table.index)
    pd.concat([front, table], axis=1).to_parquet(sm.output[0], index=False)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
