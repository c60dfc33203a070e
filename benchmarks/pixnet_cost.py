#!/usr/bin/env python
"""Cost of scales and dense-map throughput of PixNet vs the ST-Net-style spot regressor.

Issue 3's cost benchmark. Weights do not change cost, so every model is freshly initialised
with a fixed seed, saved with :func:`histomap.train.save_model` as training would save it, and
predicted through the package's real prediction functions, on a synthetic slide
(:func:`histomap.data.synthetic.simulate_sample` -> normalised spots ->
:func:`histomap.data.tiling.tile_slide`).

1. Cost of scales: seconds to predict the sample's N spots at 1 scale (the first of
   ``--scales-um``, the sample's spot diameter) and at every scale of ``--scales-um``:

   * ``pixnet``: :func:`histomap.tasks.dense.predict_pixnet` once with one output file per
     diameter (one dense map, then one disc aggregation per scale);
   * ``stnet``: :func:`histomap.tasks.spot.predict_spot_model` once per scale, each with a
     ``model.pt`` whose saved ``crop_um`` is ``--stnet-crop-factor`` x the diameter
     (``predict_spot_model`` takes its crop from the saved config only), so the encoder re-runs
     per scale on a crop of ``crop_um / input_mpp`` pixels (a 2 um spot at 1 um/px is a 2 px
     crop);
   * ``stnet_fixed_px``: the same, but every crop is resampled to the pixel side of the first
     scale's crop (the saved ``input_mpp`` is crop_um / side), as ST-Net resizes every crop to a
     fixed network input; its 1-scale call is identical to ``stnet``'s, so that time is shared.

   Each configuration is run once as a warm-up, then ``--repeats`` times round-robin across the
   configurations (so background load hits all alike); the median is reported.
2. Dense-map throughput: mm^2 of tissue (area of the tissue tiles of the tile index) per second of
   :func:`histomap.tasks.dense_map.predict_dense_map` (warm-up, then the median of ``--repeats``), with
   and without autocast on CUDA. Peak memory is measured in a fresh subprocess per setting
   (imports, model load, then one cold dense-map prediction): the peak resident set size is
   reset right before the prediction (Linux ``/proc/self/clear_refs``; elsewhere
   ``ru_maxrss``), and on CUDA ``torch.cuda.max_memory_allocated`` after a peak reset
   (model weights included).

Outputs (written atomically): ``<out-dir>/pixnet_cost.csv`` (one row per method for the cost of
scales, ``benchmark=scales``, and one row per autocast setting for the dense map,
``benchmark=dense``) and ``<out-dir>/pixnet_cost.md`` (the tables, the machine and the exact
command line). Run ``python benchmarks/pixnet_cost.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# the memory worker (a fresh process) needs only these; the rest is imported where used
from histomap.machine import cpu_model  # noqa: E402
from histomap.outputs import write_text_atomic  # noqa: E402
from histomap.compat import torch  # noqa: E402
from histomap.tasks.dense_map import predict_dense_map, read_dense  # noqa: E402
from histomap.train import amp_dtype, load_model, resolve_device, save_model  # noqa: E402

log = logging.getLogger("pixnet_cost")

CSV_NAME, MD_NAME = "pixnet_cost.csv", "pixnet_cost.md"
RESULT_TAG = "PIXNET_COST_WORKER_RESULT "
TINY_ENCODER = "tiny"  # timm test_resnet + narrow decoder: seconds on CPU
TINY_PIXNET = {"encoder": "test_resnet", "decoder_channels": [16, 16, 24, 32, 32]}
METHODS = ("pixnet", "stnet", "stnet_fixed_px")

# settings of a full run and of --quick (tiny, for the smoke test); explicit options win
PROFILES = {
    "full": {"size_um": 1500.0, "spot_spacing_um": 100.0, "scales_um": "100,55,16,8,2",
             "encoder": "efficientnet_lite0_imagenet", "input_mpp": 1.0, "tile_px": 256,
             "batch_size": 8,
             "n_genes": 250, "repeats": 3, "tiles_tile_px": 224, "tiles_tile_mpp": 1.0,
             "tiles_mask_mpp": 16.0},
    "quick": {"size_um": 400.0, "spot_spacing_um": 100.0, "scales_um": "100,55,16,8,2",
              "encoder": TINY_ENCODER, "input_mpp": 2.0, "tile_px": 64, "batch_size": 8,
              "n_genes": 8, "repeats": 1, "tiles_tile_px": 64, "tiles_tile_mpp": 2.0,
              "tiles_mask_mpp": 8.0},
}

SCALE_COLUMNS = ["benchmark", "method", "device", "amp", "encoder", "n_spots", "n_scales",
                 "scales_um", "crop_px", "seconds_1_scale", "seconds_all_scales",
                 "ratio_all_to_1", "ratio_to_stnet_all_scales", "seconds_per_extra_scale",
                 "repeats", "times_1_scale_s", "times_all_scales_s"]
DENSE_COLUMNS = ["benchmark", "method", "device", "amp", "encoder", "n_genes", "input_mpp",
                 "tile_px", "overlap_px", "tissue_mm2", "map_covered_mm2", "n_model_tiles",
                 "seconds", "mm2_per_s", "peak_rss_mib", "rss_growth_mib", "rss_method",
                 "cuda_peak_mib", "repeats", "times_s"]
COLUMNS = list(dict.fromkeys(SCALE_COLUMNS + DENSE_COLUMNS))


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/pixnet_cost.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                   help="where pixnet_cost.csv and pixnet_cost.md go")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="scratch folder for the synthetic slide, models and predictions "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (400 um slide, tiny encoder, 1 repeat) for smoke tests")
    p.add_argument("--size-um", type=float, default=None,
                   help="side of the square synthetic slide, um (full: 1500)")
    p.add_argument("--spot-spacing-um", type=float, default=None,
                   help="centre-to-centre spacing of the hexagonal spot grid, um (full: 100)")
    p.add_argument("--n-spots", type=int, default=None,
                   help="keep at most this many spots (random subset, --seed); default all")
    p.add_argument("--scales-um", default=None,
                   help="comma-separated spot diameters, um; the first is the sample's spot "
                        "size and the 1-scale case (full: 100,55,16,8,2)")
    p.add_argument("--encoder", default=None,
                   help="timm backbone of both PixNet's encoder and ST-Net, or 'tiny' "
                        "(timm test_resnet, narrow decoder) (full: efficientnet_lite0_imagenet)")
    p.add_argument("--input-mpp", type=float, default=None,
                   help="um per model-input pixel for both methods (full: 1.0)")
    p.add_argument("--tile-px", type=int, default=None,
                   help="PixNet window / prediction tile side, input px; overlap is a quarter "
                        "(full: 256)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="PixNet tiles per batch (ST-Net uses predict_spot_model's 64) (full: 8)")
    p.add_argument("--n-genes", type=int, default=None, help="genes predicted (full: 250)")
    p.add_argument("--stnet-crop-factor", type=float, default=1.0,
                   help="ST-Net crop side = this x the spot diameter")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (pixnet is required)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per configuration after one warm-up (full: 3)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--seed", type=int, default=0, help="synthetic sample, weights, subset")
    p.add_argument("--note", default="", help="free text added to the markdown (e.g. load)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the package's messages")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.scales = [float(s) for s in str(args.scales_um).split(",") if s.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.method_list) - set(METHODS))
    problems = []
    if unknown:
        problems.append(f"unknown methods {unknown}; choose from {METHODS}")
    if "pixnet" not in args.method_list:
        problems.append("--methods must include pixnet")
    if not args.scales or min(args.scales) <= 0 or len(set(args.scales)) != len(args.scales):
        problems.append(f"--scales-um must be distinct positive diameters, got {args.scales_um}")
    if args.repeats < 1 or args.tile_px < 8 or args.batch_size < 1 or args.n_genes < 1:
        problems.append("--repeats, --batch-size, --n-genes must be >= 1 and --tile-px >= 8")
    if args.n_spots is not None and args.n_spots < 1:
        problems.append("--n-spots must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return args


# --------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The synthetic sample as the pipeline would hand it to prediction."""

    slide: Path
    spots_h5ad: Path
    tiles_parquet: Path
    n_spots: int
    slide_mpp: float
    tissue_mm2: float


def prepare_inputs(work: Path, args: argparse.Namespace) -> Inputs:
    """Synthetic slide + normalised spots (optionally subsampled) + tissue tile index."""
    from histomap.data.io.synthetic import read as read_synthetic
    from histomap.data.preprocess import normalise_spots
    from histomap.data.synthetic import simulate_sample
    from histomap.data.tiling import tile_slide

    sample_dir = work / "sample"
    simulate_sample(sample_dir, seed=args.seed, size_um=(args.size_um, args.size_um),
                    spot_diameter_um=args.scales[0], spot_spacing_um=args.spot_spacing_um)
    sample = read_synthetic("bench", sample_dir)
    spots = normalise_spots(sample.spots, min_counts=1, min_genes=1,
                            path=sample_dir / "spots.h5ad")
    if args.n_spots is not None and args.n_spots < spots.n_obs:
        keep = np.sort(np.random.default_rng(args.seed).choice(spots.n_obs, args.n_spots,
                                                               replace=False))
        log.info("keeping %d of %d spots (random subset, seed %d)", args.n_spots, spots.n_obs,
                 args.seed)
        spots = spots[keep].copy()
    elif args.n_spots is not None:
        log.warning("--n-spots %d: the sample has only %d spots; using all", args.n_spots,
                    spots.n_obs)
    spots_h5ad = work / "spots.h5ad"
    spots.write_h5ad(spots_h5ad)
    tiles_parquet = work / "tiles.parquet"
    tiles = tile_slide(sample.image_path, work / "tiles.zarr", tiles_parquet,
                       tile_px=args.tiles_tile_px, tile_mpp=args.tiles_tile_mpp, overlap_px=0,
                       mask_mpp=args.tiles_mask_mpp)
    tissue_mm2 = float((tiles["size_px0"].to_numpy(np.float64) ** 2).sum()
                       * sample.mpp ** 2 / 1e6)
    log.info("synthetic slide %.0f um, %d spots, %d tissue tiles = %.3f mm^2", args.size_um,
             spots.n_obs, len(tiles), tissue_mm2)
    return Inputs(sample.image_path, spots_h5ad, tiles_parquet, int(spots.n_obs),
                  float(sample.mpp), tissue_mm2)


# --------------------------------------------------------------------------- models
def gene_names(n: int) -> list[str]:
    return [f"gene_{i:03d}" for i in range(n)]


def pixnet_kwargs(encoder: str) -> dict:
    return dict(TINY_PIXNET) if encoder == TINY_ENCODER else {"encoder": encoder}


def stnet_backbone(encoder: str) -> str:
    return TINY_PIXNET["encoder"] if encoder == TINY_ENCODER else encoder


def save_pixnet(path: Path, args: argparse.Namespace, genes: list[str]) -> Path:
    """A freshly initialised PixNet saved with the extras train_pixnet stores."""
    from histomap.models.pixnet import PixNet

    torch.manual_seed(args.seed)
    model = PixNet(len(genes), **pixnet_kwargs(args.encoder))
    if args.tile_px % model.out_stride:
        raise SystemExit(f"--tile-px {args.tile_px} must be a multiple of PixNet's out_stride "
                         f"{model.out_stride}")
    extra = {"input_mpp": args.input_mpp, "window_px": args.tile_px, "loss": "joint",
             "pcc_weight": 0.5, "mse_weight": 1.0, "out_stride": model.out_stride,
             "benchmark": f"decoder untrained (seed {args.seed}): cost only"}
    return save_model(path, model, model_name="pixnet", model_config=model.config, genes=genes,
                      extra=extra)


def save_stnets(folder: Path, args: argparse.Namespace, genes: list[str]
                ) -> dict[str, dict[float, tuple[Path, int]]]:
    """ST-Net ``model.pt`` per method and scale: {method: {diameter: (path, crop px)}}.

    Same weights everywhere (one seed); only the saved crop and input mpp differ, which is
    all :func:`predict_spot_model` reads to choose its patches.
    """
    from histomap.data.spot_patches import patch_side_px
    from histomap.models.stnet import STNet

    torch.manual_seed(args.seed)
    model = STNet(len(genes), backbone=stnet_backbone(args.encoder))
    fixed_side = patch_side_px(args.stnet_crop_factor * args.scales[0], args.input_mpp)
    out: dict[str, dict[float, tuple[Path, int]]] = {}
    for method in ("stnet", "stnet_fixed_px"):
        if method not in args.method_list:
            continue
        out[method] = {}
        for d in args.scales:
            crop_um = args.stnet_crop_factor * d
            mpp = args.input_mpp if method == "stnet" or d == args.scales[0] \
                else crop_um / fixed_side
            path = save_model(folder / f"{method}_{d:g}um.pt", model, model_name="stnet",
                              model_config=model.config, genes=genes,
                              extra={"input_mpp": mpp, "crop_um": crop_um,
                                     "benchmark": f"head untrained (seed {args.seed}): cost only"})
            out[method][d] = (path, patch_side_px(crop_um, mpp))
    return out


# --------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_timings(configs: dict[str, Callable[[], object]], repeats: int, device: torch.device
                ) -> dict[str, list[float]]:
    """One warm-up per configuration, then ``repeats`` round-robin passes: seconds per run."""
    for name, fn in configs.items():
        log.info("warm-up: %s", name)
        timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(repeats):
        for name, fn in configs.items():
            times[name].append(timed(fn, device))
            log.info("repeat %d/%d %s: %.2f s", r + 1, repeats, name, times[name][-1])
    return times


def scale_configs(inputs: Inputs, args: argparse.Namespace, pixnet_pt: Path,
                  stnets: dict[str, dict[float, tuple[Path, int]]], work: Path
                  ) -> dict[str, Callable[[], object]]:
    from histomap.tasks.dense import predict_pixnet
    from histomap.tasks.spot import predict_spot_model

    pred = work / "predictions"
    device = args.device_str

    def pixnet(diameters: list[float]) -> Callable[[], object]:
        files = {d: pred / f"pixnet_{len(diameters)}" / f"spots_{d:g}um.h5ad" for d in diameters}
        return lambda: predict_pixnet(pixnet_pt, inputs.slide, inputs.tiles_parquet,
                                      pred / f"pixnet_{len(diameters)}" / "dense.zarr",
                                      inputs.spots_h5ad, files, tile_px=args.tile_px,
                                      batch_size=args.batch_size, device=device)

    def stnet(method: str, diameters: list[float]) -> Callable[[], object]:
        def run() -> None:
            for d in diameters:
                predict_spot_model(stnets[method][d][0], inputs.spots_h5ad, inputs.slide,
                                   pred / f"{method}_spots_{d:g}um.h5ad", device=device)
        return run

    configs = {"pixnet/1": pixnet(args.scales[:1]), "pixnet/all": pixnet(args.scales)}
    for method in stnets:
        if method == "stnet" or "stnet" not in stnets:
            configs[f"{method}/1"] = stnet(method, args.scales[:1])
        configs[f"{method}/all"] = stnet(method, args.scales)
    return configs


def scale_rows(times: dict[str, list[float]], args: argparse.Namespace, inputs: Inputs,
               stnets: dict[str, dict[float, tuple[Path, int]]], amp: str) -> list[dict]:
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for method in args.method_list:
        one = f"{method}/1" if f"{method}/1" in times else "stnet/1"  # identical 1-scale call
        s1, s_all = med[one], med[f"{method}/all"]
        crop = "" if method == "pixnet" else ";".join(
            str(stnets[method][d][1]) for d in args.scales)
        ref = med.get("stnet/all")
        rows.append({
            "benchmark": "scales", "method": method, "device": args.device_str, "amp": amp,
            "encoder": args.encoder, "n_spots": inputs.n_spots, "n_scales": len(args.scales),
            "scales_um": ";".join(f"{d:g}" for d in args.scales), "crop_px": crop,
            "seconds_1_scale": s1, "seconds_all_scales": s_all, "ratio_all_to_1": s_all / s1,
            "ratio_to_stnet_all_scales": s_all / ref if ref else np.nan,
            "seconds_per_extra_scale": (s_all - s1) / max(len(args.scales) - 1, 1),
            "repeats": args.repeats, "times_1_scale_s": _join(times[one]),
            "times_all_scales_s": _join(times[f"{method}/all"])})
    return rows


def _join(values: Sequence[float]) -> str:
    return ";".join(f"{v:.4g}" for v in values)


# --------------------------------------------------------------------------- dense map
def dense_settings(device: torch.device) -> list[tuple[str, bool]]:
    """(label, amp flag) pairs: fp32 everywhere, plus autocast where it does anything (CUDA)."""
    settings = [("off", False)]
    dtype = amp_dtype(device, True)
    if dtype is not None:
        settings.append((str(dtype).removeprefix("torch.").replace("bfloat16", "bf16"), True))
    return settings


def overlap_for(tile_px: int, out_stride: int) -> int:
    """predict_pixnet's default overlap: a quarter of the tile, on the stride."""
    return (tile_px // 4) // out_stride * out_stride


def dense_spec(args: argparse.Namespace, inputs: Inputs, pixnet_pt: Path, out_zarr: Path,
               amp: bool, out_stride: int) -> dict:
    return {"model": str(pixnet_pt), "slide": str(inputs.slide),
            "tiles": str(inputs.tiles_parquet), "input_mpp": args.input_mpp,
            "tile_px": args.tile_px, "overlap_px": overlap_for(args.tile_px, out_stride),
            "batch_size": args.batch_size, "device": args.device_str, "amp": amp,
            "threads": torch.get_num_threads(), "out_zarr": str(out_zarr)}


def run_dense(spec: dict, model=None, genes=None):
    if model is None:
        model, meta = load_model(spec["model"], device=resolve_device(spec["device"]))
        genes = meta["genes"]
    return predict_dense_map(model, spec["slide"], pd.read_parquet(spec["tiles"]),
                             input_mpp=spec["input_mpp"], tile_px=spec["tile_px"],
                             overlap_px=spec["overlap_px"], out_zarr=spec["out_zarr"],
                             batch_size=spec["batch_size"], device=spec["device"], genes=genes,
                             amp=spec["amp"])


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) on Linux; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def memory_worker(spec: dict) -> dict:
    """In a fresh process: load the model, reset the peaks, one cold dense-map prediction."""
    torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    model, meta = load_model(spec["model"], device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if _reset_peak_rss():
        method, base = "VmHWM reset", _proc_status_kib("VmRSS")
    else:
        method, base = "ru_maxrss", _maxrss_kib()
    start = time.perf_counter()
    run_dense(spec, model, meta["genes"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM") if method == "VmHWM reset" else _maxrss_kib()
    return {"rss_method": method, "rss_before_mib": base / 1024, "peak_rss_mib": peak / 1024,
            "rss_growth_mib": (peak - base) / 1024, "cold_seconds": seconds,
            "cuda_peak_mib": (torch.cuda.max_memory_allocated() / 2 ** 20
                              if device.type == "cuda" else None)}


def measure_memory(spec: dict) -> dict:
    """Run :func:`memory_worker` in a fresh Python process; its result dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def dense_rows(args: argparse.Namespace, inputs: Inputs, pixnet_pt: Path, work: Path,
               device: torch.device) -> list[dict]:
    model, meta = load_model(pixnet_pt, device=device)
    stride = int(model.out_stride)
    rows = []
    for label, amp in dense_settings(device):
        spec = dense_spec(args, inputs, pixnet_pt, work / f"dense_amp-{label}.zarr", amp, stride)
        times = run_timings({f"dense/{label}": lambda s=spec: run_dense(s, model, meta["genes"])},
                            args.repeats, device)[f"dense/{label}"]
        dmap = read_dense(spec["out_zarr"])
        covered = float(np.asarray(dmap.mask[:], dtype=bool).sum()) * dmap.mpp ** 2 / 1e6
        mem = {}
        if not args.no_memory:
            log.info("peak memory (fresh subprocess): amp %s", label)
            mem = measure_memory({**spec, "out_zarr": str(work / f"dense_mem-{label}.zarr")})
        seconds = statistics.median(times)
        rows.append({
            "benchmark": "dense", "method": "pixnet", "device": args.device_str, "amp": label,
            "encoder": args.encoder, "n_genes": len(meta["genes"]), "input_mpp": args.input_mpp,
            "tile_px": spec["tile_px"], "overlap_px": spec["overlap_px"],
            "tissue_mm2": inputs.tissue_mm2, "map_covered_mm2": covered,
            "n_model_tiles": int(dmap.attrs["n_tiles"]), "seconds": seconds,
            "mm2_per_s": inputs.tissue_mm2 / seconds,
            "peak_rss_mib": mem.get("peak_rss_mib", np.nan),
            "rss_growth_mib": mem.get("rss_growth_mib", np.nan),
            "rss_method": mem.get("rss_method", "not measured"),
            "cuda_peak_mib": mem.get("cuda_peak_mib") if mem.get("cuda_peak_mib") is not None
            else np.nan,
            "repeats": args.repeats, "times_s": _join(times)})
    return rows


# --------------------------------------------------------------------------- machine, outputs
def machine_info(device: torch.device) -> dict[str, str]:
    cpu = cpu_model() or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": cpu, "cpu cores (os / usable)": f"{os.cpu_count()} / {usable}",
            "torch threads": str(torch.get_num_threads()), "device": str(device),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "workflow"], capture_output=True, text=True,
                               check=True).stdout.strip()
        info["histomap commit"] = commit + (" (package files modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if not np.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _md_table(frame: pd.DataFrame, columns: dict[str, str]) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return lines


def render_markdown(table: pd.DataFrame, args: argparse.Namespace, inputs: Inputs,
                    machine: dict[str, str], command: str, meta: dict) -> str:
    scales = table[table["benchmark"] == "scales"]
    dense = table[table["benchmark"] == "dense"]
    n = len(args.scales)
    lines = [
        "# PixNet cost of scales and dense-map throughput", "",
        f"Command (from the repository root): `{command}`", "",
        f"Synthetic slide {args.size_um:g} x {args.size_um:g} um (seed {args.seed}), "
        f"{inputs.n_spots} spots of {args.scales[0]:g} um, {inputs.tissue_mm2:.3f} mm^2 of "
        f"tissue tiles ({inputs.n_spots / inputs.tissue_mm2:.0f} spots per mm^2); encoder "
        f"`{args.encoder}` for both methods (decoder and head untrained: cost only), "
        f"{args.n_genes} genes, input {args.input_mpp:g} um/px, PixNet tiles {args.tile_px} px. "
        f"Times: median of {args.repeats} after one warm-up. "
        f"Benchmark wall time {meta['wall_s']:.0f} s; "
        f"load average {meta['load_start']} at start, {meta['load_end']} at the end.", "",
        "## Machine", "", "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()], "",
        f"## Cost of scales: {inputs.n_spots} spots at 1 scale and at {n} scales "
        f"({', '.join(f'{d:g}' for d in args.scales)} um)", "",
        *_md_table(scales, {"method": "method", "seconds_1_scale": "s, 1 scale",
                            "seconds_all_scales": f"s, {n} scales",
                            "ratio_all_to_1": f"ratio {n}/1",
                            "ratio_to_stnet_all_scales": f"vs stnet at {n} scales",
                            "seconds_per_extra_scale": "s per extra scale",
                            "crop_px": "ST-Net crop px per scale",
                            "times_1_scale_s": "runs, 1 scale (s)",
                            "times_all_scales_s": f"runs, {n} scales (s)"}), "",
        "- `pixnet`: `predict_pixnet` (load model, dense map over the tissue tiles, then one "
        "disc aggregation and h5ad per scale).",
        "- `stnet`: `predict_spot_model` once per scale; crop = "
        f"{args.stnet_crop_factor:g} x diameter at {args.input_mpp:g} um/px (the encoder re-runs "
        "per scale; small crops are cheap).",
        "- `stnet_fixed_px`: as `stnet` but every crop resampled to the first scale's pixel side "
        "(ST-Net's fixed network input); its 1-scale time is `stnet`'s (identical call).",
        "- Ratios are of the medians; `vs stnet` = method's time / `stnet`'s at all scales.", "",
        "## Dense-map throughput and peak memory", "",
        *_md_table(dense, {"amp": "autocast", "tissue_mm2": "tissue mm^2",
                           "n_model_tiles": "model tiles", "seconds": "s",
                           "mm2_per_s": "mm^2/s", "peak_rss_mib": "peak RSS MiB",
                           "rss_growth_mib": "RSS growth MiB", "cuda_peak_mib": "CUDA peak MiB",
                           "times_s": "runs (s)"}),
        "",
        "- Tissue = area of the tissue tiles of the tile index (tile_slide, min_tissue 0.25); "
        "the map also covers tile overlaps and is written to zarr (included in the time).",
        "- Peak RSS: a fresh subprocess imports, loads the model, resets its peak "
        f"({dense['rss_method'].iloc[0] if len(dense) else ''}), runs one cold dense-map "
        "prediction; growth = peak - resident size before the prediction (activations, "
        "tiles, band accumulator, allocator caches). CUDA peak = "
        "`torch.cuda.max_memory_allocated` over that prediction, model weights included.",
    ]
    if args.note:
        lines += ["", f"Note: {args.note}"]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out_dir: Path, markdown: str) -> tuple[Path, Path]:
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MD_NAME
    write_text_atomic(csv_path, table.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(md_path, markdown)
    return csv_path, md_path


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace, work: Path, command: str) -> tuple[Path, Path]:
    wall = time.perf_counter()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device_str = device.type
    inputs = prepare_inputs(work, args)
    genes = gene_names(args.n_genes)
    pixnet_pt = save_pixnet(work / "models" / "pixnet.pt", args, genes)
    stnets = save_stnets(work / "models", args, genes)
    amp = dense_settings(device)[-1][0]  # the prediction functions autocast where they can
    times = run_timings(scale_configs(inputs, args, pixnet_pt, stnets, work), args.repeats,
                        device)
    rows = scale_rows(times, args, inputs, stnets, amp)
    rows += dense_rows(args, inputs, pixnet_pt, work, device)
    meta = {"wall_s": time.perf_counter() - wall, "load_start": load_start,
            "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    markdown = render_markdown(table, args, inputs, machine_info(device), command, meta)
    csv_path, md_path = write_outputs(rows, args.out_dir, markdown)
    log.info("wrote %s and %s in %.0f s", csv_path, md_path, meta["wall_s"])
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_worker is not None:
        result = memory_worker(json.loads(args.memory_worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    package_log = logging.getLogger("histomap")
    level = package_log.level  # restored on return: main() is also called in-process (tests)
    if not args.verbose:
        package_log.setLevel(logging.WARNING)
    command = shlex.join(["python", "benchmarks/pixnet_cost.py", *argv])
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            return run(args, args.work_dir, command)
        with tempfile.TemporaryDirectory(prefix="pixnet_cost_") as tmp:
            return run(args, Path(tmp), command)
    finally:
        package_log.setLevel(level)


if __name__ == "__main__":
    main()
