#!/usr/bin/env python
"""GPU check: the paper-sized workloads, timed on one GPU in under 8 minutes (an H100), through
the pipeline's own functions and the configs' own settings (read with histomap.plan, as the
workflow reads them). Four stages, in one process so that CUDA peak memory is measured:

* ``pixnet_train``: PixNet at the paper's widths (``config/her2st.yaml`` +
  ``config/her2st_full.yaml``: decoder 64-512, 0.5 um/px input, 512 px windows, the config's
  frozen encoder with its ``encode_slide`` feature cache) for ``--epochs`` epochs on the four
  HER2ST sections (fold B4: trains on C2, C3, C4; ingest, tiling, normalisation, the fold's
  gene panel and the feature caches first, not timed in s/epoch) -> s/epoch;
* ``diffst_train``: the paper-sized Diff-ST of ``benchmarks/superres/synthetic.yaml`` (the
  paper's layout: 2.56 mm patches, 100 um LR pixels, 26 -> 128 px at 5x; eps-prediction) on two
  simulated sections of 2 x 2 patches, ``--epochs`` epochs on one -> s/epoch;
* ``diffst_sample``: its respaced sampler as the config sets it (50 steps, 10 chains) on the
  other section's patches -> s/patch;
* ``dense_map``: a dense map of a Visium HD-sized slide (6.5 x 6.5 mm at 0.5 um/px, written tile
  by tile by ``benchmarks/tiling.py``'s ``write_slide``, as ``benchmarks/whole_slide.py``) by
  that PixNet (weights do not change cost) -> mm^2 of tissue per s.

Every row: seconds, the rate, peak GPU memory (``torch.cuda.max_memory_allocated`` after a reset
at the stage's start) and the device name. Output: ``<out-dir>/gpu_check.csv`` and
``gpu_check.md`` (the command, the machine, the table); default ``benchmarks/results/gpu/``.

    python benchmarks/gpu_check.py                       # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --quick --out-dir /tmp/gpu_check   # CPU smoke run (tests)

``--quick`` shrinks sizes only (synthetic sections instead of HER2ST, small slides and patches,
narrow networks, 1 epoch, 2 sampling steps) so the same code runs on a CPU in about a minute.
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

from histomap.compat import torch  # noqa: E402
from histomap.machine import Stage, cpu_model, load_average  # noqa: E402
from histomap.outputs import atomic_output, write_text_atomic  # noqa: E402

log = logging.getLogger("gpu_check")
HER2ST_LAYERS = ["config/her2st.yaml", "config/her2st_full.yaml"]
SR_LAYERS = ["benchmarks/superres/synthetic.yaml"]
SLIDE_MPP = 0.5  # tiling.py's write_slide

PROFILES = {
    "full": {"epochs": 3, "side_mm": 6.5, "sr_size_um": 5300.0, "sr_scale": 5},
    "quick": {"epochs": 1, "side_mm": 0.6, "sr_size_um": 800.0, "sr_scale": 10},
}
# --quick: sizes only, for a CPU (the full run uses the configs as they are)
QUICK_PIXNET = {"decoder_channels": [8, 8, 16, 16, 16, 16], "input_mpp": 2.0, "window_px": 64}
QUICK_DIFFST = {"base_channels": 16, "tissue_channels": 16, "cell_channels": 16,
                "attn_channels": 16, "fusion_channels": 8, "gene_node_channels": 4,
                "cell_grid": 4, "tissue_px": 64}
QUICK_SR = {"patch_um": 320, "steps": 2, "n_samples": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (kept when given)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    p.add_argument("--quick", action="store_true", help="CPU smoke sizes (module docstring)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (3; quick 1)")
    p.add_argument("--stages", default="pixnet_train,diffst_train,dense_map",
                   help="comma separated: pixnet_train, diffst_train (+ diffst_sample), "
                        "dense_map")
    p.add_argument("--her2st", type=Path, default=REPO.parent / "shared" / "data" / "her2st",
                   help="the four HER2ST sections (full run)")
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    args.epochs = args.epochs or profile["epochs"]
    args.side_mm, args.sr_size_um = profile["side_mm"], profile["sr_size_um"]
    args.sr_scale = profile["sr_scale"]
    args.stage_list = [s.strip() for s in args.stages.split(",") if s.strip()]
    return args


# ------------------------------------------------------------------------------ measuring
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model() or platform.processor() or 'unknown'}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------ data
def plan_of(layers: list[str], overrides: dict | None = None):
    """The merged config (config/config.yaml, then ``layers``, then ``overrides``) and its
    plan, exactly as the workflow builds them (relative paths from the repository root)."""
    from histomap.plan import load_config, validate_config
    from histomap.plan.config import deep_update

    config = load_config([REPO / f for f in layers], defaults=REPO / "config" / "config.yaml")
    deep_update(config, overrides or {})
    return config, validate_config(config, REPO)


def prepare_sections(work: Path, config: dict, sections: dict[str, dict]) -> dict[str, dict]:
    """Ingest (simulating synthetic ones first), tile and normalise; {name: paths}."""
    from histomap.data.ingest import ingest_sample
    from histomap.data.preprocess import normalise_spots
    from histomap.data.synthetic import simulate_sample
    from histomap.data.tiling import tile_slide
    import anndata as ad

    out = {}
    for name, spec in sections.items():
        folder = work / "ingest" / name
        if spec["platform"] == "synthetic":
            source = work / "synthetic" / name
            if not source.exists():
                simulate_sample(source, seed=spec["seed"], dataset_seed=int(config["seed"]),
                                **{**config["synthetic"], **spec.get("synthetic", {})})
            spec = {**spec, "path": source}
        if not (folder / "spots.h5ad").exists():
            ingest_sample(platform=spec["platform"], sample=name, path=spec["path"],
                          out_dir=folder, spot_diameter_um=spec.get("spot_diameter_um"),
                          spatialdata_mpp=None, mask_mpp=config["tiling"]["mask_mpp"])
        t = config["tiling"]
        tiles = folder / "tiles.parquet"
        if not tiles.exists():
            tile_slide(folder / "slide.tif", None, tiles, tile_px=t["tile_px"],
                       tile_mpp=t["tile_mpp"], overlap_px=t["overlap_px"],
                       min_tissue=t["min_tissue"], mask_mpp=t["mask_mpp"])
        st = folder / "st.h5ad"
        if not st.exists():
            pp = config["preprocess"]
            normalise_spots(ad.read_h5ad(folder / "spots.h5ad"), min_counts=pp["min_counts"],
                            min_genes=pp["min_genes"], target_sum=pp["target_sum"],
                            path=folder / "spots.h5ad").write_h5ad(st)
        out[name] = {"slide": folder / "slide.tif", "spots": folder / "spots.h5ad",
                     "highres": folder / "highres.h5ad", "tiles": tiles, "st": st}
    return out


def gene_panel(paths: dict[str, dict], train: list[str], test: list[str], genes_cfg: dict,
               n_genes: int | None = None) -> list[str]:
    """The fold's panel: ranked on the training sections, scorable on the test ones."""
    import anndata as ad

    from histomap.data.preprocess import select_genes

    return list(select_genes({s: ad.read_h5ad(paths[s]["st"]) for s in train},
                             method=genes_cfg["method"],
                             n_genes=n_genes or genes_cfg["n_genes"],
                             genes=genes_cfg.get("list"),
                             measured={s: list(ad.read_h5ad(paths[s]["st"], backed="r").var_names)
                                       for s in test}))


# ------------------------------------------------------------------------------ stages
def pixnet_stages(work: Path, args, device: torch.device, rows: list[dict]) -> dict:
    """PixNet at the paper's widths: feature caches, then ``--epochs`` epochs (s/epoch)."""
    from histomap.tasks.dense import train_pixnet
    from histomap.tasks.feature_cache import encode_slide

    if args.quick:   # two simulated sections instead of HER2ST; narrow, coarse PixNet
        config, plan = plan_of(HER2ST_LAYERS, {   # the demo's synthetic sheet, not HER2ST's
            "samples": "config/samples.tsv", "data_dir": "", "pixnet": QUICK_PIXNET, "features": {"tile_px": 128},
            "synthetic": {"size_um": [600, 600], "mpp": 1.0}, "genes": {"n_genes": 20},
            "preprocess": {"min_counts": 10, "min_genes": 5},
            "validation": {"block_um": 200}})
        sections = {"synA": {"platform": "synthetic", "seed": 1},
                    "synB": {"platform": "synthetic", "seed": 2}}
        train, test = ["synB"], ["synA"]
    else:
        if not (args.her2st / "B4").is_dir():
            raise SystemExit(f"HER2ST sections not found at {args.her2st} (--her2st)")
        config, plan = plan_of(HER2ST_LAYERS, {"data_dir": str(args.her2st)})
        sections = {s: {"platform": "legacy_st", "path": args.her2st / s,
                        "spot_diameter_um": 100.0} for s in ("B4", "C2", "C3", "C4")}
        train, test = ["C2", "C3", "C4"], ["B4"]
    start = time.perf_counter()
    paths = prepare_sections(work, config, sections)
    genes = gene_panel(paths, train, test, config["genes"])
    model_cfg = plan.models.params("pixnet")
    train_cfg = {**plan.models.train("pixnet"), "epochs": args.epochs, "patience": args.epochs,
                 "device": str(device)}
    encoder, mpp = model_cfg["encoder"], float(model_cfg["input_mpp"])
    f = config.get("features", {})
    caches = []
    with Stage(rows, "pixnet feature cache", device, unit="s per section"):
        for s in train:
            caches.append(encode_slide(paths[s]["slide"], paths[s]["st"],
                                       work / "features" / f"{s}.zarr", encoder=encoder, mpp=mpp,
                                       tiles_parquet=paths[s]["tiles"],
                                       checkpoint=model_cfg.get("checkpoint"),
                                       crop_um=f.get("crop_um"), tile_px=int(f.get("tile_px", 512)),
                                       margin_px=int(f.get("margin_px", 64)),
                                       context_um=float(f.get("context_um", 300.0)),
                                       device=str(device)))
    rows[-1]["value"] = rows[-1]["seconds"] / len(train)
    rows[-1]["details"] = f"encoder {encoder} at {mpp:g} um/px, {len(train)} sections"
    with Stage(rows, "pixnet_train", device, unit="s per epoch"):
        summary = train_pixnet([paths[s]["st"] for s in train],
                               [paths[s]["slide"] for s in train], genes, model_cfg=model_cfg,
                               train_cfg=train_cfg, validation=config["validation"], seed=0,
                               out_model=work / "pixnet" / "model.pt",
                               out_log=work / "pixnet" / "train_log.csv",
                               checkpoint_dir=work / "pixnet" / "checkpoints",
                               feature_caches=caches)
    epoch_s = [h["seconds"] for h in summary["history"]]
    rows[-1]["value"] = float(np.median(epoch_s[1:] if len(epoch_s) > 1 else epoch_s))
    rows[-1]["details"] = (f"{len(train)} {'simulated' if args.quick else 'HER2ST'} sections x "
                           f"{len(genes)} genes, decoder "
                           f"{model_cfg['decoder_channels']}, {model_cfg['window_px']} px windows "
                           f"at {mpp:g} um/px, epochs {[round(s, 1) for s in epoch_s]} s "
                           "(median of epochs after the first)")
    log.info("pixnet stages (with data preparation): %.0f s", time.perf_counter() - start)
    return {"model_cfg": model_cfg, "genes": genes}


def diffst_stages(work: Path, args, device: torch.device, rows: list[dict]) -> None:
    """The paper-sized Diff-ST: ``--epochs`` epochs (s/epoch), then the config's sampler."""
    from histomap.data.srpairs.sample import build_sample_pairs
    from histomap.tasks.superres.prediction import predict_sr
    from histomap.tasks.superres.training import train_sr

    overrides = {"synthetic": {"size_um": [args.sr_size_um] * 2},
                 "superres": {"scales": {"synthetic": [args.sr_scale]}}}
    if args.quick:
        overrides["superres"].update(patch_um=QUICK_SR["patch_um"],
                                     validation={"block_um": QUICK_SR["patch_um"]},
                                     models={"diffst": QUICK_DIFFST})
    config, plan = plan_of(SR_LAYERS, overrides)
    sections = {"synA": {"platform": "synthetic", "seed": 11},
                "synB": {"platform": "synthetic", "seed": 12}}
    paths = prepare_sections(work / "sr", config, sections)
    sr = config["superres"]
    genes = gene_panel(paths, ["synA"], ["synB"], config["genes"])
    pairs = {}
    for s in sections:
        pairs[s] = work / "sr" / "pairs" / f"{s}_x{args.sr_scale}.zarr"
        if not pairs[s].exists():
            build_sample_pairs("synthetic", paths[s]["highres"], paths[s]["slide"], genes,
                               pairs[s], scale=args.sr_scale, pairs_cfg=plan.sr.pair_settings(),
                               sample=s, n_genes=sr.get("n_genes"))
    method, _ = plan.sr.method("diffst")
    model_cfg = plan.sr.model_config("diffst")
    train_cfg = {**plan.sr.train_config("diffst"), "epochs": args.epochs,
                 "patience": args.epochs, "device": str(device)}
    with Stage(rows, "diffst_train", device, unit="s per epoch"):
        summary = train_sr(method, [pairs["synA"]], model_cfg=model_cfg, train_cfg=train_cfg,
                           validation=plan.sr.validation(), seed=0,
                           out_model=work / "diffst" / "model.pt",
                           out_log=work / "diffst" / "train_log.csv",
                           checkpoint_dir=work / "diffst" / "checkpoints",
                           diffusion=plan.sr.diffusion_config("diffst"), variant="diffst")
    epoch_s = [h["seconds"] for h in summary["history"]]
    rows[-1]["value"] = float(np.median(epoch_s[1:] if len(epoch_s) > 1 else epoch_s))
    rows[-1]["details"] = (f"{len(genes)} genes, {sr['patch_um']:g} um patches, "
                           f"{sr['lr_um']:g} um LR px, {args.sr_scale}x, base_channels "
                           f"{model_cfg.get('base_channels')}, epochs "
                           f"{[round(s, 1) for s in epoch_s]} s")
    s = dict(sr["sampling"])
    if args.quick:
        s.update(steps=QUICK_SR["steps"], n_samples=QUICK_SR["n_samples"])
    with Stage(rows, "diffst_sample", device, unit="s per patch"):
        info = predict_sr(work / "diffst" / "model.pt", pairs["synB"],
                          work / "diffst" / "maps.zarr", work / "diffst" / "bins.h5ad",
                          sampler=s.get("sampler", "respaced"), steps=s.get("steps"),
                          n_samples=s.get("n_samples", 4), batch_size=s.get("batch_size", 4),
                          eta=s.get("eta", 0.0), device=str(device), seed=0, sample="synB",
                          batch_chains=s.get("batch_chains", "auto"))
    n_patches = int(info.get("n_patches") or info.get("patches") or 0) if isinstance(info, dict) \
        else 0
    if not n_patches:
        import zarr
        n_patches = int(zarr.open_group(str(pairs["synB"]), mode="r")["hr"].shape[0])
    rows[-1]["value"] = rows[-1]["seconds"] / n_patches
    rows[-1]["details"] = (f"{s.get('sampler')} sampler, {s.get('steps')} steps, "
                           f"{s.get('n_samples')} chains, {n_patches} patches")


def dense_stage(work: Path, args, device: torch.device, rows: list[dict],
                pixnet: dict | None) -> None:
    """A dense map of a Visium HD-sized synthetic slide by the paper-width PixNet (mm^2/s)."""
    from tiling import write_slide

    from histomap.data.tiling import tile_slide
    from histomap.models import build_model
    from histomap.tasks.dense import task_options
    from histomap.tasks.dense_map import predict_dense_map

    if pixnet is None:
        config, plan = plan_of(HER2ST_LAYERS, {"samples": "config/samples.tsv", "data_dir": "",
                                               "pixnet": QUICK_PIXNET} if args.quick else
                               {"data_dir": str(args.her2st)})
        pixnet = {"model_cfg": plan.models.params("pixnet"),
                  "genes": [f"g{i}" for i in range(20 if args.quick else 250)]}
    task, pixnet_cfg = task_options(pixnet["model_cfg"])
    side_px = int(round(args.side_mm * 1000 / SLIDE_MPP))
    slide = work / "slide.tif"
    write_slide(slide, side_px)
    tiles = tile_slide(slide, None, work / "tiles.parquet", tile_px=224, tile_mpp=1.0,
                       mask_mpp=16.0)
    tissue_mm2 = float((tiles["size_px0"].to_numpy(np.float64) ** 2).sum() * SLIDE_MPP ** 2
                       / 1e6)
    torch.manual_seed(0)
    model = build_model("pixnet", len(pixnet["genes"]),
                        pretrained_checkpoint=task.get("checkpoint"), **pixnet_cfg)
    window = int(task["window_px"])
    with Stage(rows, "dense_map", device, unit="mm^2 per s"):
        dense = predict_dense_map(model, slide, tiles, input_mpp=float(task["input_mpp"]),
                                  tile_px=window, overlap_px=window // 4,
                                  out_zarr=work / "dense.zarr", batch_size=8, device=device)
    rows[-1]["value"] = tissue_mm2 / rows[-1]["seconds"]
    rows[-1]["details"] = (f"{args.side_mm:g} x {args.side_mm:g} mm slide, {tissue_mm2:.2f} mm^2 "
                           f"tissue, {window} px tiles at {task['input_mpp']:g} um/px, "
                           f"{len(pixnet['genes'])} genes, autocast {dense.attrs.get('autocast')}")


# ------------------------------------------------------------------------------ report
def write_report(rows: list[dict], args, argv: list[str], device: torch.device, wall: float,
                 load_before: str) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    name = device_name(device)
    table.insert(0, "device", name)
    table = table.rename(columns={"cuda_max_allocated_mib": "peak_gpu_mib"})
    table = table[["device", "stage", "value", "unit", "seconds", "peak_gpu_mib", "details"]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out_dir / "gpu_check.csv") as tmp:
        table.to_csv(tmp, index=False)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/gpu_check.py", *argv])
    text = "\n".join([
        "# GPU check" + (" (--quick: CPU smoke sizes, not a measurement)" if args.quick else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Device: {name}; torch {torch.__version__}; load average before {load_before}, after "
        f"{load_average()}; wall time {wall:.0f} s (data preparation included).",
        "",
        table.drop(columns="device").to_markdown(index=False, floatfmt=".4g"),
        ""])
    write_text_atomic(args.out_dir / "gpu_check.md", text)
    print(text)
    return table


def main(argv=None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from histomap.train import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.quick:
        log.warning("no CUDA device: the full check on %s measures the CPU, not a GPU", device)
    load_before, start = load_average(), time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pixnet = None
        if "pixnet_train" in args.stage_list:
            pixnet = pixnet_stages(work / "pixnet_data", args, device, rows)
        if "diffst_train" in args.stage_list:
            diffst_stages(work / "diffst_data", args, device, rows)
        if "dense_map" in args.stage_list:
            dense_stage(work / "dense_data", args, device, rows, pixnet)
    return write_report(rows, args, argv, device, time.perf_counter() - start, load_before)


if __name__ == "__main__":
    main()
