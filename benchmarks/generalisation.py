"""Within-patient against cross-patient: what each HER2ST spot model keeps across patients.

Reads a finished HER2ST spot run (``results/report/benchmark.csv`` and every model's
``results/models/{model}/{fold}/seed{s}/train_log.csv``) and writes, per model: PCC@M on the
within-patient folds (mean over folds and seeds) and on the cross-patient fold, their ratio, and
the training-to-validation loss ratio at the checkpoint epoch (the epoch of the lowest validation
loss) on each kind of fold. Losses are each model's own (PixNet's is MSE + Pearson, the others'
MSE), so only the ratios are compared across models. The validation blocks are spatial blocks
of the training sections: on the cross-patient fold they come from the training patient only.

    python benchmarks/generalisation.py --results results --out-dir benchmarks/results/her2st
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def spot_scores(benchmark_csv: Path) -> pd.DataFrame:
    """PCC@M of each model on its held-out section, one row per (model, fold_kind, fold, seed)."""
    d = pd.read_csv(benchmark_csv)
    d = d[(d.task == "spot") & (d.metric == "PCC@M") & (d["sample"] == d.fold)]
    return d.groupby(["model", "fold_kind", "fold", "seed"], as_index=False).value.mean()


def checkpoint_losses(models_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Train and validation loss at the epoch of the lowest validation loss, per run."""
    rows = []
    for run in runs.itertuples(index=False):
        log = models_dir / run.model / run.fold / f"seed{run.seed}" / "train_log.csv"
        if not log.is_file():
            continue
        t = pd.read_csv(log)
        if "val_loss" not in t or t.val_loss.isna().all():
            continue
        best = t.val_loss.idxmin()
        rows.append({"model": run.model, "fold_kind": run.fold_kind, "fold": run.fold,
                     "seed": run.seed, "epoch": int(t.epoch[best]), "epochs": len(t),
                     "train": float(t.train_loss[best]), "val": float(t.val_loss[best])})
    return pd.DataFrame(rows)


def table(scores: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    pcc = scores.groupby(["model", "fold_kind"]).value.mean().unstack("fold_kind")
    out = pd.DataFrame({"within_pcc": pcc["within_patient"], "cross_pcc": pcc["cross_patient"]})
    out["cross_over_within"] = out.cross_pcc / out.within_pcc
    if not losses.empty:
        losses = losses.assign(ratio=losses.val / losses.train)
        g = losses.groupby(["model", "fold_kind"])
        ratio, epoch = g.ratio.mean().unstack("fold_kind"), g.epoch.mean().unstack("fold_kind")
        out["val_over_train_within"] = ratio.get("within_patient")
        out["val_over_train_cross"] = ratio.get("cross_patient")
        out["best_epoch_within"] = epoch.get("within_patient")
        out["best_epoch_cross"] = epoch.get("cross_patient")
    out = out.drop(index="mean", errors="ignore")  # constant predictions: PCC 0 by definition
    return out.sort_values("within_pcc", ascending=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"),
                    help="a finished HER2ST run's results/ folder")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    csv = args.results / "report" / "benchmark.csv"
    if not csv.is_file():
        print(f"error: {csv} not found: run the HER2ST spot benchmark first", file=sys.stderr)
        return 2
    scores = spot_scores(csv)
    if not {"within_patient", "cross_patient"} <= set(scores.fold_kind):
        print(f"error: {csv} needs within-patient and cross-patient folds", file=sys.stderr)
        return 2
    runs = scores[["model", "fold_kind", "fold", "seed"]].drop_duplicates()
    t = table(scores, checkpoint_losses(args.results / "models", runs))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out_dir / "generalisation.csv")
    cols = {"within_pcc": "PCC@M within", "cross_pcc": "PCC@M cross",
            "cross_over_within": "cross / within",
            "val_over_train_within": "val / train loss, within folds",
            "val_over_train_cross": "val / train loss, cross fold",
            "best_epoch_within": "checkpoint epoch, within", "best_epoch_cross":
            "checkpoint epoch, cross"}
    shown = t.rename(columns=cols)
    lines = ["# Within-patient against cross-patient (HER2ST spots)", "",
             (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
             "| model | " + " | ".join(shown.columns) + " |",
             "|---|" + "---:|" * len(shown.columns)]
    for model, row in shown.iterrows():
        lines.append(f"| {model} | " + " | ".join(f"{v:.3g}" if pd.notna(v) else "-"
                                                  for v in row) + " |")
    command = (f"python benchmarks/generalisation.py --results {args.results} "
               f"--out-dir {args.out_dir}")
    lines += ["", f"`{command}`", ""]
    (args.out_dir / "generalisation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
