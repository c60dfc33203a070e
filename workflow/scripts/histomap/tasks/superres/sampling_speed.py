"""Steps-vs-quality of a diffusion SR model: seconds per patch and scores per number of steps.

Arrow: SR model + pairs -> **a benchmark table** (``benchmarks/superres/steps_vs_quality.py``),
with the sampling code of the predict rules (:func:`~.sampling.predict_chains`).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histomap.data.srpairs.store import read_sr_pairs
from histomap.errors import InputError
from histomap.evaluation.srmetrics import patch_gene_metrics, summarise_sr
from histomap.tasks.superres.methods import is_diffusion
from histomap.tasks.superres.model_file import load_sr_model
from histomap.tasks.superres.sampling import (
    Welford,
    meta_diffusion,
    model_dataset,
    predict_chains,
    sampling_modes,
)

log = logging.getLogger(__name__)


def time_sampling(model_path: str | Path, pairs_zarr: str | Path, *,
                  steps: Sequence[int] = (1000, 250, 50, 20), sampler: str = "respaced",
                  n_samples: int = 1, max_patches: int | None = 4, batch_size: int = 4,
                  device: str = "auto", seed: int = 0, eta: float = 0.0,
                  batch_chains: bool | str = "auto", cpu_bf16: bool | str = False
                  ) -> pd.DataFrame:
    """Steps-vs-quality table of a diffusion model: for each number of steps (T steps: the full
    ancestral DDPM; fewer: ``sampler``), seconds per patch and RMSE / PCC (normalised; per gene
    per patch, averaged) on the first ``max_patches`` patches of ``pairs_zarr``."""
    from torch.utils.data import DataLoader

    from histomap.compat import torch
    from histomap.train import resolve_device

    dev = resolve_device(device)
    model, meta = load_sr_model(model_path, dev)
    if not is_diffusion(meta["method"]):
        raise ValueError(f"{model_path}: {meta['method']} is not a diffusion model")
    arrays, attrs = read_sr_pairs(pairs_zarr, lazy=True)
    if list(attrs["genes"]) != list(meta["genes"]):
        raise InputError(pairs_zarr, "genes differ from the model's")
    n = int(arrays["hr"].shape[0]) if max_patches is None else min(int(max_patches),
                                                                  int(arrays["hr"].shape[0]))
    dataset = model_dataset(meta, pairs_zarr, indices=np.arange(n))
    diff = meta_diffusion(meta)
    batched, amp_type = sampling_modes(dev, batch_chains, cpu_bf16)
    rows = []
    for k in steps:
        chain_sampler = "ddpm" if int(k) >= diff.T else sampler
        generator = torch.Generator().manual_seed(int(seed))
        metrics = []
        elapsed = 0.0
        for batch in DataLoader(dataset, batch_size=int(batch_size), shuffle=False):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            mean = Welford()
            for chain in predict_chains(model, meta, batch, device=dev, sampler=chain_sampler,
                                        steps=int(k), n_samples=n_samples, eta=eta,
                                        generator=generator, diffusion=diff,
                                        batch_chains=batched, amp_type=amp_type):
                mean.add(chain)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed += time.perf_counter() - start
            for b, i in enumerate(batch["index"].tolist()):
                rmse, pcc, _ = patch_gene_metrics(batch["hr"][b].numpy(), mean.mean[b],
                                                  batch["mask"][b].numpy())
                metrics.append((i, rmse, pcc))
        per_gene = pd.DataFrame([{"patch": i, "gene": g, "rmse": r, "pcc": p,
                                  "rmse_counts": math.nan, "pcc_counts": math.nan}
                                 for i, rmse, pcc in metrics
                                 for g, r, p in zip(attrs["genes"], rmse, pcc)])
        per_gene["method"] = meta.get("variant", meta["method"])
        summary = summarise_sr(per_gene, ["method"]).set_index("metric")
        rows.append({"method": meta.get("variant", meta["method"]), "sampler": chain_sampler,
                     "steps": int(min(int(k), diff.T)), "n_samples": int(n_samples),
                     "n_patches": n, "seconds_per_patch": elapsed / max(n, 1),
                     "RMSE": summary.loc["RMSE", "value"], "PCC": summary.loc["PCC", "value"],
                     "n_nan_pcc": int(summary.loc["PCC", "n_nan_pcc"]), "device": str(dev),
                     "batch_chains": bool(batched), "autocast": str(amp_type),
                     "threads": int(torch.get_num_threads())})
        log.info("%d steps (%s): %.3g s per patch, RMSE %.4f, PCC %.4f", rows[-1]["steps"],
                 chain_sampler, rows[-1]["seconds_per_patch"], rows[-1]["RMSE"],
                 rows[-1]["PCC"])
    return pd.DataFrame(rows)
