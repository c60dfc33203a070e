"""Snakemake adapter: per-gene metrics of one model, fold and seed, per held-out slide and pooled.

``input.predictions``, ``input.truth`` and ``params.samples`` are parallel lists; entries of
several spot scales (the cross-scale task) are scored scale by scale, each with its own pooled
rows.
"""
import anndata as ad
import pandas as pd

from histomap.data.preprocess import read_gene_panel
from histomap.data.sample import geometry
from histomap.evaluation.metrics import evaluate_predictions
from histomap.logs import run_step


def main(sm):
    p = sm.params
    genes = read_gene_panel(sm.input.genes)
    by_scale = {}
    for sample, truth_path, pred_path in zip(p.samples, sm.input.truth, sm.input.predictions):
        pred = ad.read_h5ad(pred_path)
        scale = float(geometry(pred)["spot_diameter_um"])
        entry = by_scale.setdefault(scale, {"truth": {}, "pred": {}, "tp": {}, "pp": {}})
        if sample in entry["pred"]:
            raise ValueError(f"{pred_path}: sample {sample} appears twice at {scale:g} um")
        entry["truth"][sample] = ad.read_h5ad(truth_path)
        entry["pred"][sample], entry["tp"][sample], entry["pp"][sample] = pred, truth_path, pred_path
    frames = []
    for scale, e in sorted(by_scale.items()):
        table = evaluate_predictions(e["truth"], e["pred"], genes, truth_paths=e["tp"],
                                     pred_paths=e["pp"])
        front = pd.DataFrame({"task": p.task, "dataset": p.dataset, "model": sm.wildcards.model,
                              "fold": sm.wildcards.fold, "fold_kind": p.fold_kind,
                              "scale_um": scale,
                              "gene_set": p.gene_set, "seed": int(sm.wildcards.tseed)},
                             index=table.index)
        frames.append(pd.concat([front, table], axis=1))
    pd.concat(frames, ignore_index=True).to_parquet(sm.output[0], index=False)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
