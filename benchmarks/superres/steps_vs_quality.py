#!/usr/bin/env python
"""Steps-vs-quality table of a trained diffusion SR model (Diff-ST's sampling-cost table).

For each number of reverse steps (T = the full ancestral DDPM; fewer: respaced or DDIM) it
samples the first ``--max-patches`` patches of an SR-pairs zarr and reports seconds per patch and
RMSE / signed PCC per gene per patch (normalised units), through
:func:`histomap.tasks.superres.sampling_speed.time_sampling` (the same sampling code as the
``predict_sr`` rule).

Example (a model trained by the pipeline, its fold's held-out pairs)::

    python benchmarks/superres/steps_vs_quality.py \\
        --model results/sr/models/diffst/x5/F1/model.pt --pairs results/sr/pairs/F1/synA_x5.zarr \\
        --steps 1000 250 50 20 --max-patches 4 \\
        --out benchmarks/superres/results/steps_synthetic_diffst
"""
from __future__ import annotations

import argparse
from pathlib import Path


from histomap.logs import setup_logging  # noqa: E402
from histomap.tasks.superres.sampling_speed import time_sampling  # noqa: E402


def markdown(table) -> str:
    header = "| steps | sampler | s / patch | RMSE | PCC |\n|---|---|---|---|---|\n"
    rows = "".join(f"| {r.steps} | {r.sampler} | {r.seconds_per_patch:.3g} | {r.RMSE:.4f} | "
                   f"{r.PCC:.4f} |\n" for r in table.itertuples(index=False))
    first = table.iloc[0]
    return (f"{header}{rows}\n{first['method']}, {first['n_patches']} patches, K = "
            f"{first['n_samples']} sample(s) per patch, device {first['device']}.\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of a diffusion method")
    parser.add_argument("--pairs", required=True, help="SR-pairs zarr (held-out sample)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 250, 50, 20])
    parser.add_argument("--sampler", default="respaced", choices=["respaced", "ddim"])
    parser.add_argument("--n-samples", type=int, default=1)
    parser.add_argument("--max-patches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output prefix (writes .csv and .md)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    table = time_sampling(args.model, args.pairs, steps=args.steps, sampler=args.sampler,
                          n_samples=args.n_samples, max_patches=args.max_patches,
                          batch_size=args.batch_size, device=args.device, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
