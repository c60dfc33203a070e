"""Where a spot model's error comes from: each gene's MSE split into a per-slide offset (the
squared difference of the predicted and measured means over the slide's spots) and the
spot-to-spot part (:func:`histomap.evaluation.metrics.mse_decomposition`), from a finished
run's predictions and the truth it was scored against, for every model, fold and test slide.
Genes: each fold's gene set, as the evaluation scored them.

    .venv/bin/python benchmarks/error_decomposition.py --results results \\
        --models mean probe stnet histogene pixnet \\
        --out benchmarks/results/cohort_synthetic/error_decomposition
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histomap.evaluation.metrics import align_prediction, mse_decomposition


def decompose(results: Path, models: list[str], scale: str = "55um",
              seed: str = "seed0") -> pd.DataFrame:
    """One row per (model, fold, sample): MSE, its offset and spot-to-spot parts (means over
    genes), the median predicted / measured std over the spots, spot and gene counts."""
    gene_sets = sorted(d.name for d in (results / "genes").iterdir() if d.is_dir())
    if len(gene_sets) != 1:
        raise SystemExit(f"expected one gene set under {results / 'genes'}, found {gene_sets}")
    rows = []
    for model in models:
        for path in sorted(results.glob(f"predictions/{model}/*/{seed}/*/spots_{scale}.h5ad")):
            fold, sample = path.parts[-4], path.parts[-2]
            truth_path = results / "st" / f"{sample}.h5ad"
            genes = pd.read_csv(results / "genes" / gene_sets[0] / f"{fold}.tsv", sep="\t")["gene"]
            truth, pred = ad.read_h5ad(truth_path), ad.read_h5ad(path)
            y_true, y_pred = align_prediction(truth, pred, list(genes), sample=sample,
                                              truth_path=truth_path, pred_path=path)
            offset, spatial = mse_decomposition(y_true, y_pred)
            spread = y_true.std(axis=0)
            ratio = np.median(y_pred.std(axis=0)[spread > 0] / spread[spread > 0])
            rows.append({"model": model, "fold": fold, "sample": sample,
                         "mse": float((offset + spatial).mean()), "offset": float(offset.mean()),
                         "spot_to_spot": float(spatial.mean()), "std_ratio": float(ratio),
                         "n_spots": y_true.shape[0], "n_genes": y_true.shape[1]})
    if not rows:
        raise SystemExit(f"no predictions spots_{scale}.h5ad of {models} under {results}")
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--scale", default="55um", help="the spots_{scale}.h5ad predictions")
    p.add_argument("--out", type=Path, required=True, help="output stem (.csv, .md)")
    args = p.parse_args(argv)
    table = decompose(args.results, args.models, args.scale)
    per_fold = table.groupby(["model", "fold"])[["mse", "offset", "spot_to_spot",
                                                 "std_ratio"]].mean()
    summary = per_fold.groupby("model").agg(["mean", "std"])
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    command = "python benchmarks/error_decomposition.py " + " ".join(argv or sys.argv[1:])
    args.out.with_suffix(".md").write_text(
        "# MSE: per-slide offset and spot-to-spot parts\n\n"
        f"Command: `{command}`\n\nPer gene, MSE = offset (squared difference of the slide means)"
        " + spot-to-spot (mean squared centred error); averaged over genes, then over a fold's "
        "slides; mean and std over folds. `std_ratio`: median over genes of predicted / measured"
        " std over the spots.\n\n" + summary.round(4).to_markdown() + "\n")
    print(summary.round(3).to_string())
    return table


if __name__ == "__main__":
    main()
