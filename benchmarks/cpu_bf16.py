#!/usr/bin/env python
"""CPU bf16 autocast and batched diffusion chains against fp32 / one chain after another.

Issue 17's check of the CPU speed switches: where bf16 autocast on the CPU stays within tolerance
of fp32, and which way of running the K diffusion chains is faster. Models are freshly
initialised with a fixed seed (cost and numerical agreement, not accuracy); the data are one
demo-sized synthetic section (``histomap.data.synthetic.simulate_sample``, the demo's 1200 um,
55 um spots on a 100 um grid).

* ``dense``: PixNet with the demo config (resnet10t, decoder 16-128, SAFB, stride 4, 1 um/px,
  160 px tiles, overlap 40; the output bias set to the section's mean log-normalised expression
  of its most expressed genes, so the values have the magnitude of real predictions) predicts the dense map of the section's tissue tiles
  (:func:`histomap.tasks.dense_map.predict_dense_map`) in fp32 and with ``cpu_bf16``; the spots
  are read out at 100, 55, 16, 8 and 2 um (:func:`spots_from_dense`). Per scale: max |bf16 -
  fp32| of the read-outs, that over the fp32 read-outs' spread (std over spots, averaged over
  genes), and the PCC over spots of bf16 vs fp32 read-outs per gene (min and median).
* ``sr``: Diff-ST with the demo config (8 genes, 32 x 32 HR at 10 um, 5x) samples every SR
  pair of the section (respaced, 20 steps, K = 2, as the demo) with the chains one after another
  (fp32, the reference), as one batch (fp32; must equal the reference), and one after another in
  bf16. Max |diff| and PCC (per gene over tissue pixels, min / median) of the mean maps.
* ``cigc``: seconds of one Diff-ST denoiser call at ``--cigc-genes`` genes with the top-k graph
  (``cigc_topk`` 16) and with the dense graph, and of the gene-graph product alone (the new
  batched matmul and the old einsum); at ``--cigc-large-genes`` the top-16 graph's product as a
  dense matmul and as a sparse CSR product.

Tolerance for turning bf16 on by default (``cpu_bf16: auto``): every scale's max |diff| <= 1e-2
(the maps' unit: log-normalised expression for PixNet, [0, 1] min-max units for the SR maps) and
min PCC >= 0.99. The relative max |diff| (over the fp32 read-outs' spread) is reported, not
used: an untrained model's read-outs vary little from spot to spot. Output:
``<out-dir>/cpu_bf16.csv`` and ``cpu_bf16.md`` with the machine, load average and this command.

    python benchmarks/cpu_bf16.py --threads 1              # ~5-10 min on a loaded 2-core machine
    python benchmarks/cpu_bf16.py --quick --out-dir /tmp/b  # smoke run (tests)
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

from histomap.machine import cpu_model, load_average  # noqa: E402
from histomap.compat import torch  # noqa: E402
from histomap.outputs import atomic_output, write_text_atomic  # noqa: E402

log = logging.getLogger("cpu_bf16")
SCALES = (100.0, 55.0, 16.0, 8.0, 2.0)
TOLERANCE = {"max_abs_diff": 1e-2, "min_pcc": 0.99}
DEMO_PIXNET = {"encoder": "resnet10t", "decoder_channels": [16, 32, 64, 128, 128],
               "fusion": "safb", "out_stride": 4}
TINY_PIXNET = {"encoder": "test_resnet", "decoder_channels": [16, 16, 24, 32, 32],
               "fusion": "safb", "out_stride": 4}
DEMO_DIFFST = dict(base_channels=16, channel_mult=[1, 2], tissue_channels=16, cell_channels=16,
                   attn_channels=16, fusion_channels=8, gene_node_channels=4, cell_grid=4,
                   cell_patch_px=16, cam_region=3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--size-um", type=float, default=None, help="section side (1200; quick 400)")
    p.add_argument("--n-genes", type=int, default=None, help="PixNet genes (50; quick 8)")
    p.add_argument("--sr-genes", type=int, default=8)
    p.add_argument("--cigc-genes", type=int, default=None, help="(250; quick 40)")
    p.add_argument("--cigc-large-genes", type=int, default=None, help="(1000; quick 80)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed runs each (2; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    q = args.quick
    args.size_um = args.size_um or (400.0 if q else 1200.0)
    args.n_genes = args.n_genes or (8 if q else 50)
    args.cigc_genes = args.cigc_genes or (40 if q else 250)
    args.cigc_large_genes = args.cigc_large_genes or (80 if q else 1000)
    args.repeats = args.repeats or (1 if q else 2)
    return args


def pcc_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PCC per column of (n, genes) arrays (NaN rows dropped; constant column -> 0)."""
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    a, b = a[ok] - a[ok].mean(0), b[ok] - b[ok].mean(0)
    den = np.sqrt((a ** 2).sum(0) * (b ** 2).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


# ------------------------------------------------------------------------------- dense maps
def bench_dense(work: Path, args) -> list[dict]:
    from histomap.data.io.synthetic import read as read_synthetic
    from histomap.data.preprocess import normalise_spots
    from histomap.data.synthetic import simulate_sample
    from histomap.data.tiling import tile_slide
    from histomap.models.pixnet import PixNet
    from histomap.tasks.dense_map import predict_dense_map, spots_from_dense

    simulate_sample(work / "sample", seed=0, size_um=(args.size_um, args.size_um),
                    n_genes=max(60, args.n_genes + 10), spot_diameter_um=55.0,
                    spot_spacing_um=100.0)
    sample = read_synthetic("bench", work / "sample")
    tiles = tile_slide(sample.image_path, None, work / "tiles.parquet", tile_px=224,
                       tile_mpp=1.0, mask_mpp=16.0)
    tissue_mm2 = float((tiles["size_px0"].to_numpy(np.float64) ** 2).sum()
                       * sample.mpp ** 2 / 1e6)
    torch.manual_seed(0)
    model = PixNet(args.n_genes, **(TINY_PIXNET if args.quick else DEMO_PIXNET))
    # outputs at the magnitude of real predictions: the head starts at the mean log-normalised
    # expression of the section's most expressed genes (as training initialises it)
    spots = normalise_spots(sample.spots, min_counts=1, min_genes=1, path=work / "spots.h5ad")
    mean = np.sort(np.asarray(spots.X.mean(axis=0)).ravel())[::-1][:args.n_genes]
    model.init_output_bias(mean.copy())
    tile_px = 64 if args.quick else 160
    centres = np.asarray(sample.spots.obsm["spatial"], np.float64)
    maps, seconds = {}, {}
    for name, bf16 in (("fp32", False), ("bf16", True), ("fp32", False), ("bf16", True)
                       )[:2 * args.repeats]:
        start = time.perf_counter()
        maps[name] = predict_dense_map(model, sample.image_path, tiles, input_mpp=1.0,
                                       tile_px=tile_px, overlap_px=tile_px // 4,
                                       out_zarr=work / f"dense_{name}.zarr", device="cpu",
                                       cpu_bf16=bf16)
        seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    assert maps["bf16"].attrs["autocast"] == "bfloat16" and maps["fp32"].attrs["autocast"] is None
    dense_diff = float(np.abs(maps["bf16"].read() - maps["fp32"].read()).max())
    rows = []
    for d in SCALES:
        ref = spots_from_dense(maps["fp32"], centres, d, sample.mpp)
        low = spots_from_dense(maps["bf16"], centres, d, sample.mpp)
        ok = np.isfinite(ref).all(1)
        diff = float(np.abs(low[ok] - ref[ok]).max())
        spread = float(ref[ok].std(0).mean())
        pcc = pcc_columns(ref, low)
        rows.append({"benchmark": "dense", "case": f"spots {d:g} um", "n": int(ok.sum()),
                     "genes": args.n_genes, "max_abs_diff": diff,
                     "rel_max_abs_diff": diff / spread if spread > 0 else np.nan,
                     "min_pcc": float(pcc.min()), "median_pcc": float(np.median(pcc)),
                     "fp32_s": seconds["fp32"], "other_s": seconds["bf16"],
                     "speedup": seconds["fp32"] / seconds["bf16"], "dense_max_abs_diff":
                     dense_diff, "tissue_mm2": tissue_mm2})
    return rows


# ------------------------------------------------------------------------------- SR sampling
def bench_sr(work: Path, args) -> list[dict]:
    import anndata as ad
    from torch.utils.data import DataLoader

    from histomap.data.srpairs import SRPairDataset, build_sr_pairs
    from histomap.models.diffst import DiffST, coexpression_adjacency
    from histomap.models.diffusion import GaussianDiffusion
    from histomap.tasks import superres as sr_task

    cells = ad.read_h5ad(work / "sample" / "cells.h5ad")
    totals = np.asarray(cells.X.sum(axis=0)).ravel()
    genes = [str(g) for g in cells.var_names[np.argsort(-totals)[:args.sr_genes]]]
    build_sr_pairs(cells, work / "sample" / "he.tif", genes, work / "pairs.zarr",
                   patch_um=320.0, lr_um=50.0, scale=5, min_tissue=0.25,
                   normalisation="minmax", image_mpp=5.0, edge="ceil")
    dataset = SRPairDataset(work / "pairs.zarr")
    torch.manual_seed(0)
    model = DiffST(len(genes), **DEMO_DIFFST).eval()
    x = cells[:, genes].X
    model.set_adjacency(coexpression_adjacency(x))
    diffusion = GaussianDiffusion(T=1000, clip_x0=(-1.0, 1.0))
    meta = {"method": "diffst", "value_range": [0.0, 1.0, True], "diffusion": {"T": 1000}}
    k, steps = 2, 20

    def run(batched: bool, amp) -> tuple[np.ndarray, np.ndarray]:
        gen = torch.Generator().manual_seed(0)
        means, masks = [], []
        for batch in DataLoader(dataset, batch_size=8, shuffle=False):
            chains = list(sr_task.predict_chains(
                model, meta, batch, device=torch.device("cpu"), sampler="respaced",
                steps=steps, n_samples=k, generator=gen, diffusion=diffusion,
                batch_chains=batched, amp_type=amp))
            means.append(np.mean(chains, axis=0))
            masks.append(batch["mask"].numpy())
        return np.concatenate(means), np.concatenate(masks)

    cases = {"sequential fp32": (False, None), "batched fp32": (True, None),
             "sequential bf16": (False, torch.bfloat16), "batched bf16": (True, torch.bfloat16)}
    seconds, outs = {}, {}
    for _ in range(2 * args.repeats):   # interleaved; min per case
        for name, (batched, amp) in cases.items():
            s, outs[name] = timed(lambda b=batched, a=amp: run(b, a), 1)
            seconds[name] = min(seconds.get(name, float("inf")), s)
    ref, mask = outs["sequential fp32"]
    rows = []
    for name in cases:
        if name == "sequential fp32":
            continue
        out = outs[name][0]
        # pixels of tissue: (patch, gene, y, x) -> (pixels, genes)
        a = ref.transpose(0, 2, 3, 1)[mask]
        b = out.transpose(0, 2, 3, 1)[mask]
        pcc = pcc_columns(a, b)
        diff = float(np.abs(b - a).max())
        rows.append({"benchmark": "sr", "case": name, "n": int(len(dataset)), "genes": len(genes),
                     "max_abs_diff": diff, "rel_max_abs_diff": diff / float(a.std(0).mean()),
                     "min_pcc": float(pcc.min()), "median_pcc": float(np.median(pcc)),
                     "fp32_s": seconds["sequential fp32"], "other_s": seconds[name],
                     "speedup": seconds["sequential fp32"] / seconds[name]})
    return rows


# ------------------------------------------------------------------------------- CIGC graph
def bench_cigc(args) -> list[dict]:
    from histomap.models.diffst import DiffST, coexpression_adjacency

    g = args.cigc_genes
    rng = np.random.default_rng(0)
    adj = coexpression_adjacency(rng.gamma(0.5, size=(400, g)) * (rng.random((400, g)) > 0.5))
    x = torch.randn(8, g, 32, 32)
    t = torch.full((8,), 500)
    cases = {"dense graph": (None, None), "top-16 graph": (16, None),
             "top-16 graph, sparse product": (16, 1.0)}
    models, conds, nodes = {}, {}, {}
    with torch.no_grad():
        for name, (topk, sparse_density) in cases.items():
            torch.manual_seed(0)
            model = DiffST(g, cigc_topk=topk, **DEMO_DIFFST).eval()
            model.set_adjacency(adj)
            if sparse_density is not None:
                model.graph.SPARSE_DENSITY = sparse_density
            models[name] = model
            conds[name] = model.encode_condition(torch.rand(8, g, 7, 7),
                                                 torch.rand(8, 3, 64, 64), hr_shape=(32, 32))
            nodes[name] = model.graph.encode(x.reshape(-1, 1, 32, 32)).reshape(8, g, -1, 32, 32)
            model(x, t, condition=conds[name])
        times: dict[str, dict[str, float]] = {name: {} for name in cases}
        for _ in range(3 * args.repeats):   # interleaved: the load drifts between cases alike
            for name, model in models.items():
                c, n = conds[name], nodes[name]
                for key, fn in (("step_s", lambda m=model, c=c: m(x, t, condition=c)),
                                ("graph_mix_s", lambda m=model, n=n: m.graph.mix(n)),
                                ("einsum_mix_s", lambda m=model, n=n: torch.einsum(
                                    "ij,bjchw->bichw", m.graph.adjacency, n))):
                    s, _ = timed(fn, 1)
                    times[name][key] = min(times[name].get(key, float("inf")), s)
    rows = []
    for name, model in models.items():
        rows.append({"benchmark": "cigc", "case": name, "n": 8, "genes": g,
                     "graph_edges": int((model.graph.adjacency != 0).sum()), **times[name],
                     "sparse_product": model.graph._sparse_adjacency() is not None,
                     "speedup": times["dense graph"]["step_s"] / times[name]["step_s"]})
    rows += bench_graph_product(args)
    return rows


def bench_graph_product(args) -> list[dict]:
    """The gene-graph product alone for a large panel: top-16 graph as a dense batched matmul
    and as the sparse (CSR) product (GeneGraph picks the sparse one below SPARSE_DENSITY)."""
    from histomap.models.diffst import GeneGraph, coexpression_adjacency

    g = args.cigc_large_genes
    rng = np.random.default_rng(0)
    adj = coexpression_adjacency(rng.gamma(0.5, size=(400, g)) * (rng.random((400, g)) > 0.5))
    graph = GeneGraph(g, node_channels=4, topk=16)
    graph.set_adjacency(adj)
    nodes = torch.randn(2, g, 4, 32, 32)
    times: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(3 * args.repeats):
            for name, density in (("top-16 graph, dense product", 0.0),
                                  ("top-16 graph, sparse product", 1.0)):
                graph.SPARSE_DENSITY, graph._sparse = density, None
                graph.mix(nodes)
                s, _ = timed(lambda: graph.mix(nodes), 1)
                times[name] = min(times.get(name, float("inf")), s)
    edges = int((graph.adjacency != 0).sum())
    return [{"benchmark": "cigc", "case": f"{name} (product only, 2 x 4 x 32 x 32)", "n": 2,
             "genes": g, "graph_edges": edges, "graph_mix_s": s,
             "sparse_product": "sparse" in name,
             "speedup": times["top-16 graph, dense product"] / s} for name, s in times.items()]


# ------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    from histomap.train import cpu_has_bf16
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), native bf16: {cpu_has_bf16()}, "
            f"load average {load_average()}")


def within_tolerance(rows: pd.DataFrame) -> bool:
    return bool((rows["max_abs_diff"] <= TOLERANCE["max_abs_diff"]).all()
                and (rows["min_pcc"] >= TOLERANCE["min_pcc"]).all())


def write_report(rows: list[dict], args, argv, seconds: float, load_before: str) -> None:
    table = pd.DataFrame(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out_dir / "cpu_bf16.csv") as tmp:
        table.to_csv(tmp, index=False)
    dense = table[table["benchmark"] == "dense"]
    sr = table[table["benchmark"] == "sr"]
    verdict = [
        f"* dense maps, bf16 within tolerance ({TOLERANCE}): **{within_tolerance(dense)}**, "
        f"speed-up {dense['speedup'].iloc[0]:.2f}x",
        f"* SR sampling, bf16 within tolerance: **{within_tolerance(sr[sr['case'] == 'sequential bf16'])}**, "
        f"speed-up {sr.loc[sr['case'] == 'sequential bf16', 'speedup'].iloc[0]:.2f}x",
        f"* SR batched chains (fp32) equal to sequential: max |diff| "
        f"{sr.loc[sr['case'] == 'batched fp32', 'max_abs_diff'].iloc[0]:.2g}, speed-up "
        f"{sr.loc[sr['case'] == 'batched fp32', 'speedup'].iloc[0]:.2f}x"]
    cols = {"dense": ["case", "n", "genes", "max_abs_diff", "rel_max_abs_diff", "min_pcc",
                      "median_pcc", "fp32_s", "other_s", "speedup"],
            "sr": ["case", "n", "genes", "max_abs_diff", "rel_max_abs_diff", "min_pcc",
                   "median_pcc", "fp32_s", "other_s", "speedup"],
            "cigc": ["case", "genes", "graph_edges", "step_s", "graph_mix_s", "einsum_mix_s",
                     "sparse_product", "speedup"]}
    parts = ["# CPU bf16 autocast, batched chains, CIGC graph\n",
             f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/cpu_bf16.py', *argv])}`\n",
             f"Machine: {machine()} (load average before the run: {load_before}). "
             f"Wall time {seconds:.0f} s. Models freshly initialised (seed 0). {args.note}\n",
             "\n".join(verdict) + "\n"]
    for name, title in (("dense", "Dense map (PixNet): bf16 vs fp32 spot read-outs; "
                         "`other_s` = bf16 seconds"),
                        ("sr", "SR sampling (Diff-ST, respaced 20 steps, K = 2): vs sequential "
                         "fp32; `other_s` = the case's seconds"),
                        ("cigc", "CIGC gene graph: one denoiser call (8 x 32 x 32) and the graph "
                         "product alone (new batched matmul, old einsum), top-16 vs dense graph; "
                         "min over interleaved runs")):
        sub = table[table["benchmark"] == name][cols[name]]
        parts.append(f"## {title}\n\n" + sub.to_markdown(index=False, floatfmt=".4g") + "\n")
    write_text_atomic(args.out_dir / "cpu_bf16.md", "\n".join(parts))
    print("\n".join(parts))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    load_before = load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = bench_dense(work, args)
        rows += bench_sr(work, args)
    rows += bench_cigc(args)
    write_report(rows, args, argv, time.perf_counter() - start, load_before)


if __name__ == "__main__":
    main()
