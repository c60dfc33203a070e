#!/usr/bin/env python
"""Whole-slide throughput: tiling (index only), PixNet dense map, spot tables at five scales.

Issue 17's end-to-end benchmark. A square slide of ``--side-mm`` at 0.5 um/px (a pyramidal JPEG
TIFF written tile by tile by ``benchmarks/tiling.py``'s ``write_slide``: H&E texture inside an
elliptical tissue region, so the slide is never in memory) goes through the pipeline's own
functions, stage by stage in one process:

* ``tiling``: :func:`histomap.data.tiling.tile_slide` with no tile store (the pipeline's default:
  tissue mask and tile index; 224 px tiles at 1 um/px as the demo config);
* ``dense_map``: :func:`histomap.tasks.dense_map.predict_dense_map` over the tissue tiles with a
  freshly initialised PixNet (weights do not change cost; ``freeze_encoder`` on, the frozen
  encoder mode, which changes nothing at inference), at ``--input-mpp``;
* ``spots_<d>um``: :func:`histomap.tasks.dense_map.spots_from_dense` for discs of ``d`` um
  (100, 55, 16, 8, 2) on a square grid of pitch max(d, ``--min-pitch-um``) over the tissue
  tiles (e.g. Visium HD's 2, 8 and 16 um bins; the finest bins are sub-sampled to the pitch).

Per stage: seconds, mm^2 of tissue (the tile index's area) per second, the peak RSS during the
stage (Linux: VmHWM reset before each stage; elsewhere the process maximum) and, with
``--device cuda``, ``torch.cuda.max_memory_allocated`` (peak reset before each stage). The total
row sums the stages. Output: ``<out-dir>/whole_slide.csv`` and ``whole_slide.md`` (machine, load
average before and after, torch threads, autocast, and this command).

    python benchmarks/whole_slide.py --side-mm 6.5 --input-mpp 2 --threads 1   # Visium HD size
    python benchmarks/whole_slide.py --side-mm 20 --device cuda --input-mpp 1  # a GPU machine
    python benchmarks/whole_slide.py --quick --out-dir /tmp/ws                 # smoke run (tests)
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

log = logging.getLogger("whole_slide")
SCALES = (100.0, 55.0, 16.0, 8.0, 2.0)
SLIDE_MPP = 0.5   # tiling.py's write_slide


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (kept when given)")
    p.add_argument("--side-mm", type=float, default=None, help="slide side (6.5; quick 0.6)")
    p.add_argument("--input-mpp", type=float, default=2.0, help="um per PixNet input pixel")
    p.add_argument("--encoder", default=None,
                   help="image encoder (efficientnet_lite0_imagenet, the configs'; quick "
                        "test_resnet)")
    p.add_argument("--decoder-channels", default=None,
                   help="PixNet decoder widths, comma separated (16,32,64,128,128; quick "
                        "16,16,24,32,32)")
    p.add_argument("--n-genes", type=int, default=None, help="genes (50; quick 8)")
    p.add_argument("--tile-px", type=int, default=None, help="prediction tile (160; quick 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-pitch-um", type=float, default=16.0,
                   help="smallest spot-grid pitch (finer bins are sub-sampled to it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpu-bf16", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    q = args.quick
    args.side_mm = args.side_mm or (0.6 if q else 6.5)
    args.encoder = args.encoder or ("test_resnet" if q else "efficientnet_lite0_imagenet")
    args.decoder_channels = [int(c) for c in (args.decoder_channels or (
        "16,16,24,32,32" if q else "16,32,64,128,128")).split(",")]
    args.n_genes = args.n_genes or (8 if q else 50)
    args.tile_px = args.tile_px or (64 if q else 160)
    return args


# ------------------------------------------------------------------------------- memory
def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Stage:
    """Times a stage and records its peak RSS (and CUDA peak) into ``rows``."""

    def __init__(self, rows: list[dict], name: str, device: torch.device, tissue_mm2: float,
                 **extra):
        self.rows, self.name, self.device = rows, name, device
        self.tissue_mm2, self.extra = tissue_mm2, extra

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
            self.rss_method = "VmHWM reset"
        except OSError:
            self.rss_method = "ru_maxrss"
        self.rss_before = _status_mib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        import resource
        peak = _status_mib("VmHWM") if self.rss_method == "VmHWM reset" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"stage": self.name, "seconds": seconds,
               "tissue_mm2": self.tissue_mm2,
               "mm2_per_s": self.tissue_mm2 / seconds if seconds > 0 else np.nan,
               "peak_rss_mib": peak, "rss_before_mib": self.rss_before,
               "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20
               if self.device.type == "cuda" else np.nan, **self.extra}
        self.rows.append(row)
        log.info("%s: %.1f s, %.3g mm^2/s, peak RSS %.0f MiB", self.name, seconds,
                 row["mm2_per_s"], peak)
        return False


def spot_grid(tiles: pd.DataFrame, pitch_um: float, slide_mpp: float) -> np.ndarray:
    """Centres (level-0 px) of a square grid of ``pitch_um`` whose centres lie in a tissue tile."""
    step = pitch_um / slide_mpp
    x0, y0 = tiles["x0_px"].to_numpy(np.float64), tiles["y0_px"].to_numpy(np.float64)
    size = tiles["size_px0"].to_numpy(np.float64)
    parts = []
    for a, b, s in zip(x0, y0, size):   # grid anchored at (0, 0): no duplicates across tiles
        xs = np.arange(np.ceil(a / step - 0.5), np.ceil((a + s) / step - 0.5)) * step + step / 2
        ys = np.arange(np.ceil(b / step - 0.5), np.ceil((b + s) / step - 0.5)) * step + step / 2
        if len(xs) and len(ys):
            gx, gy = np.meshgrid(xs, ys)
            parts.append(np.column_stack([gx.ravel(), gy.ravel()]))
    return np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 2))


# ------------------------------------------------------------------------------- run
def run(work: Path, args) -> tuple[list[dict], dict]:
    from tiling import write_slide

    from histomap.data.tiling import tile_slide
    from histomap.models.pixnet import PixNet
    from histomap.tasks.dense_map import CPU_BF16_DEFAULT, predict_dense_map, spots_from_dense
    from histomap.train import cpu_bf16_enabled, resolve_device

    device = resolve_device(args.device)
    side_px = int(round(args.side_mm * 1000 / SLIDE_MPP))
    slide = work / "slide.tif"
    start = time.perf_counter()
    write_slide(slide, side_px)
    info = {"slide_px": side_px, "slide_write_s": time.perf_counter() - start}
    rows: list[dict] = []
    tiles_parquet = work / "tiles.parquet"
    with Stage(rows, "tiling (index only)", device, np.nan):
        tiles = tile_slide(slide, None, tiles_parquet, tile_px=224, tile_mpp=1.0,
                           mask_mpp=16.0)
    tissue_mm2 = float((tiles["size_px0"].to_numpy(np.float64) ** 2).sum()
                       * SLIDE_MPP ** 2 / 1e6)
    rows[-1].update(tissue_mm2=tissue_mm2, mm2_per_s=tissue_mm2 / rows[-1]["seconds"],
                    items=len(tiles))
    torch.manual_seed(0)
    model = PixNet(args.n_genes, encoder=args.encoder, decoder_channels=args.decoder_channels,
                   fusion="safb", out_stride=4, freeze_encoder=True)
    bf16 = cpu_bf16_enabled(args.cpu_bf16, CPU_BF16_DEFAULT) and device.type == "cpu"
    with Stage(rows, "dense_map", device, tissue_mm2):
        dense = predict_dense_map(model, slide, tiles, input_mpp=args.input_mpp,
                                  tile_px=args.tile_px, overlap_px=args.tile_px // 4,
                                  out_zarr=work / "dense.zarr", batch_size=args.batch_size,
                                  device=device, cpu_bf16=bf16)
    rows[-1]["items"] = int(dense.attrs["n_tiles"])
    info.update(autocast=dense.attrs.get("autocast"), threads=dense.attrs.get("threads"),
                map_px=list(dense.mask.shape), map_mpp=dense.mpp)
    del model
    for d in SCALES:
        centres = spot_grid(tiles, max(d, args.min_pitch_um), SLIDE_MPP)
        with Stage(rows, f"spots {d:g} um", device, tissue_mm2,
                   pitch_um=max(d, args.min_pitch_um)):
            values = spots_from_dense(dense, centres, d, SLIDE_MPP)
        rows[-1]["items"] = len(centres)
        if not np.isfinite(values).all(axis=1).mean() > 0.9:
            log.warning("%g um: %.0f%% of the spots read NaN", d,
                        100 * (1 - np.isfinite(values).all(axis=1).mean()))
    stages = pd.DataFrame(rows)
    rows.append({"stage": "total (tiling + dense map + 5 spot tables)", "items": None,
                 "seconds": float(stages["seconds"].sum()), "tissue_mm2": tissue_mm2,
                 "mm2_per_s": tissue_mm2 / float(stages["seconds"].sum()),
                 "peak_rss_mib": float(stages["peak_rss_mib"].max()),
                 "cuda_max_allocated_mib": float(stages["cuda_max_allocated_mib"].max())})
    info["device"] = str(device)
    return rows, info


def machine() -> str:
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def write_report(rows, info, args, argv, load_before: str, wall: float) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["items"] = table["items"].astype("Int64")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out_dir / "whole_slide.csv") as tmp:
        table.to_csv(tmp, index=False)
    load_after = load_average()
    cols = ["stage", "items", "seconds", "mm2_per_s", "peak_rss_mib"]
    if info["device"].startswith("cuda"):
        cols.append("cuda_max_allocated_mib")
    text = "\n".join([
        "# Whole-slide throughput\n",
        "Command: `python " + " ".join(shlex.quote(a) for a in ["benchmarks/whole_slide.py",
                                                               *argv]) + "`\n",
        f"Machine: {machine()}; device {info['device']}, {info['threads']} torch thread(s), "
        f"autocast {info['autocast']}; load average (1 / 5 / 15 min) {load_before} before, "
        f"{load_after} after. Wall time {wall:.0f} s (slide writing {info['slide_write_s']:.0f} s "
        "not in the table).\n",
        f"Slide: {args.side_mm:g} x {args.side_mm:g} mm ({info['slide_px']} px at {SLIDE_MPP} "
        f"um/px), {rows[0]['tissue_mm2']:.2f} mm^2 of tissue tiles. PixNet: encoder "
        f"{args.encoder} (frozen-encoder mode), freshly initialised decoder "
        f"{args.decoder_channels}, "
        f"{args.n_genes} genes, input {args.input_mpp:g} um/px, {args.tile_px} px tiles "
        f"(overlap {args.tile_px // 4}), map {info['map_px'][1]} x {info['map_px'][0]} px at "
        f"{info['map_mpp']:g} um. Spot grids: pitch max(diameter, {args.min_pitch_um:g} um). "
        f"{args.note}\n",
        table[cols].to_markdown(index=False, floatfmt=".4g") + "\n"])
    write_text_atomic(args.out_dir / "whole_slide.md", text)
    print(text)
    return table


def main(argv=None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows, info = run(work, args)
    return write_report(rows, info, args, argv, load_before, time.perf_counter() - start)


if __name__ == "__main__":
    main()
