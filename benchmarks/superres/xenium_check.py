#!/usr/bin/env python
"""Real-signal check on the 10x Xenium breast crop: super-resolution pairs from real transcripts
and the two methods that need no training data (bicubic, TESLA-style), scored like Table 1.

The crop (about 509 x 381 um, 313 genes, DAPI morphology, no H&E) is too small to train on; it
checks that the Xenium path (reader -> pairs -> prediction -> metrics) carries real spatial
signal: LR pixels of ``--lr-um`` (transcripts with qv >= 20, controls dropped, binned by the
reader at 2 um) against HR pixels ``--scale`` times finer, for the ``--genes`` most expressed
genes. The morphology image is nuclear stain, so pairs use no tissue mask (every measured pixel
counts) and TESLA's colour term sees grey levels.

    python benchmarks/superres/xenium_check.py --data ../shared/data/xenium_breast_crop \\
        --out benchmarks/superres/results/xenium_check
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


from histomap.data.io import read_sample  # noqa: E402
from histomap.data.slide import prepare_slide  # noqa: E402
from histomap.data.srpairs.points import build_sr_pairs  # noqa: E402
from histomap.evaluation import srmetrics as sr_metrics
from histomap.evaluation import srreport as sr_report
from histomap.logs import setup_logging  # noqa: E402
from histomap.tasks.superres.prediction import predict_sr  # noqa: E402
from histomap.tasks.superres.training import train_sr  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the Xenium crop folder")
    parser.add_argument("--mpp", type=float, default=0.2125)
    parser.add_argument("--genes", type=int, default=20)
    parser.add_argument("--lr-um", type=float, default=50.0)
    parser.add_argument("--scale", type=int, default=5)
    parser.add_argument("--patch-um", type=float, default=200.0)
    parser.add_argument("--methods", nargs="+", default=["bicubic", "tesla"])
    parser.add_argument("--normalisation", choices=["log1p", "minmax", "none"], default="log1p",
                        help="SR unit: log-normalised counts (default) or the paper's per-patch "
                             "min-max")
    parser.add_argument("--out", required=True, help="output prefix (writes .csv and .md)")
    args = parser.parse_args(argv)
    setup_logging()
    sample = read_sample("xenium", "xenium_crop", args.data, mpp=args.mpp)
    totals = np.asarray(sample.highres.X.sum(axis=0)).ravel()
    genes = [str(g) for g in sample.highres.var_names[np.argsort(-totals)[:args.genes]]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "slide.tif"
        prepare_slide(sample.image_path, slide, sample.mpp)
        pairs = tmp / "pairs.zarr"
        build_sr_pairs(sample.highres, slide, genes, pairs, patch_um=args.patch_um,
                       lr_um=args.lr_um, scale=args.scale, normalisation=args.normalisation,
                       min_tissue=0.25, image_mpp=2.0, edge="ceil", tissue=False,
                       source_name="xenium crop")
        metrics = []
        for method in args.methods:
            run = tmp / method
            train_sr(method, [pairs], model_cfg={}, train_cfg={}, validation={}, seed=0,
                     out_model=run / "model.pt", out_log=run / "log.csv",
                     checkpoint_dir=run / "ckpt")
            predict_sr(run / "model.pt", pairs, run / "maps.zarr", run / "bins.h5ad",
                       device="cpu", sample="xenium_crop")
            sr_metrics.evaluate_sr([pairs], [run / "maps.zarr"], run / "m.parquet",
                                run / "m.csv", method=method, scale=args.scale,
                                dataset="xenium_crop", samples=["xenium_crop"],
                                folds=["none"])
            metrics.append(pd.read_parquet(run / "m.parquet"))
        table = sr_report.sr_long_table(pd.concat(metrics, ignore_index=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    n_patches = int(table["n_patches"].max())
    text = (sr_report.sr_markdown(table, methods=args.methods)
            + f"\n{n_patches} patches of {args.patch_um:g} um, LR {args.lr_um:g} um -> HR "
              f"{args.lr_um / args.scale:g} um, top {args.genes} genes, "
              f"{args.normalisation} units.\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
