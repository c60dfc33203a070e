#!/usr/bin/env python
"""One Table 1 from several pipeline runs: concatenates their ``results/report/superres.csv``
(e.g. the synthetic 5x/10x run, the HER2ST 2x run) and writes the markdown of
:func:`histomap.evaluation.srreport.sr_markdown` (rows methods, columns dataset x factor x
RMSE/PCC).

    python benchmarks/superres/combine_tables.py synthetic/results/report/superres.csv \\
        her2st/results/report/superres.csv --out benchmarks/superres/results/table1
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


from histomap.evaluation.srreport import SR_TABLE_COLUMNS, SR_UNITS, sr_markdown  # noqa: E402

DEFAULT_ORDER = ["bicubic", "tesla", "unet", "unetpp", "attention_unet", "histogene_sr",
                 "guided", "diffst"]


def _read(path: str) -> pd.DataFrame:
    """A superres.csv; one written before the units and patch counts were recorded gets them
    (per-patch min-max was the only unit then; dropped patches unknown: 0)."""
    table = pd.read_csv(path)
    # old "counts" rows were de-normalised with the truth's own statistics: not kept
    table = table[table["units"] != "counts"].copy()
    table["units"] = table["units"].replace({"normalised": SR_UNITS["minmax"]})
    for column, default in (("n_nan_patches", 0), ("n_dropped_patches", 0),
                            ("uses_lr_map", True)):
        if column not in table.columns:
            table[column] = default
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="superres.csv files of pipeline runs")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="Table-1 rows in order (default: the usual order, then others)")
    parser.add_argument("--ablations", nargs="+", default=None,
                        help="ablation rows in order (default: every diffst_* method, in the "
                             "order the runs list them)")
    parser.add_argument("--out", required=True, help="output prefix (writes .csv and .md)")
    args = parser.parse_args(argv)
    table = pd.concat([_read(p) for p in args.tables], ignore_index=True)[SR_TABLE_COLUMNS]
    present = list(dict.fromkeys(table["method"]))
    if args.ablations is None:
        args.ablations = [m for m in present if m.startswith("diffst_")]
    methods = args.methods or [m for m in DEFAULT_ORDER if m in present] + [
        m for m in present if m not in DEFAULT_ORDER and m not in args.ablations]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    text = sr_markdown(table, methods=methods, ablations=[a for a in args.ablations
                                                          if a in present])
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
