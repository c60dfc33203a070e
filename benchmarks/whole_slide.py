#!/usr/bin/env python
"""Whole-slide throughput: tiling, PixNet dense map, spot and bin tables at five scales, each
stage against the encoder's one-pass floor.

The end-to-end benchmark. A square slide of ``--side-mm`` at 0.5 um/px (a
pyramidal JPEG TIFF written tile by tile by ``benchmarks/tiling.py``'s ``write_slide``: H&E
texture inside an elliptical tissue region, so the slide is never in memory) goes through the
pipeline's own functions, stage by stage in one process:

* ``tiling``: :func:`histomap.data.tiling.tile_slide` with no tile store (the pipeline's default:
  tissue mask and tile index; 224 px tiles at 1 um/px as the demo config);
* ``encoder floor``: the frozen encoder alone over as many ``--tile-px`` tiles as the tissue has
  input pixels (each pixel once; no reading, decoding, stitching or writing): the cost below
  which no frozen-encoder dense map can go on this machine. Every stage's ``x_floor`` is its
  seconds over the floor's;
* ``dense_map``: :func:`histomap.tasks.dense_map.predict_dense_map` over the tissue tiles with a
  freshly initialised PixNet (weights do not change cost; ``freeze_encoder`` on, the frozen
  encoder mode, which changes nothing at inference), at ``--input-mpp``;
* ``tables``: ``spots <d> um`` (100, 55: discs on the hexagonal lattice of touching discs) and
  ``bins <d> um`` (16, 8, 2: Visium HD's square bins, every bin over the tissue):
  :func:`histomap.tasks.apply.stream_dense_tables`, the ``apply_dense_tables`` rule's code,
  streaming the five tables to ``.h5ad`` files in row blocks, together (one read of the map;
  deleted after the stage); a row per table gives the seconds spent on it (its lattice, the
  map reads it triggered, its writes), not counted again in the total.

Per stage: seconds, mm^2 of tissue (the tile index's area) per second, the peak RSS during the
stage (Linux: VmHWM reset before each stage; elsewhere the process maximum) and, with
``--device cuda``, ``torch.cuda.max_memory_allocated`` (peak reset before each stage). The total
row sums the stages but the floor. Output: ``<out-dir>/<--name>.csv`` and ``.md`` (whole_slide)
(machine, load average before and after, torch threads, autocast, and this command).

    python benchmarks/whole_slide.py --side-mm 6.5 --input-mpp 1 --threads 2  # Visium HD size
    python benchmarks/whole_slide.py --side-mm 20 --device cuda --input-mpp 1  # a GPU machine
    python benchmarks/whole_slide.py --quick --out-dir /tmp/ws                 # smoke run (tests)
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

from histomap.machine import Stage, load_average, machine  # noqa: E402
from histomap.compat import torch  # noqa: E402
from histomap.outputs import atomic_output, write_text_atomic  # noqa: E402

log = logging.getLogger("whole_slide")
SPOT_UM = (100.0, 55.0)      # pseudo-spots: discs on a hexagonal lattice (Visium-like)
BIN_UM = (16.0, 8.0, 2.0)    # square bins (Visium HD's)
FLOOR = "encoder floor (1 pass per tissue px)"
TABLES = "tables (5 scales, one read of the map)"
TOTAL = "total (tiling + dense map + 5 tables)"
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
    p.add_argument("--overlap-px", type=int, default=None, help="tile overlap (tile / 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--cpu-bf16", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    p.add_argument("--name", default="whole_slide", help="output file stem")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    q = args.quick
    args.side_mm = args.side_mm or (0.6 if q else 6.5)
    args.encoder = args.encoder or ("test_resnet" if q else "efficientnet_lite0_imagenet")
    args.decoder_channels = [int(c) for c in (args.decoder_channels or (
        "16,16,24,32,32" if q else "16,32,64,128,128")).split(",")]
    args.n_genes = args.n_genes or (8 if q else 50)
    args.tile_px = args.tile_px or (64 if q else 160)
    args.overlap_px = args.tile_px // 4 if args.overlap_px is None else args.overlap_px
    return args


# ------------------------------------------------------------------------------- run
def encoder_floor(model, n_px: float, tile_px: int, batch_size: int, device, amp_type) -> int:
    """The bare encoder pass over ``n_px`` input pixels: ceil(n_px / tile^2) tiles of
    ``tile_px`` through the frozen encoder, channels-last, its BatchNorms folded as
    ``predict_dense_map`` runs it, no reading, decoding or writing. Returns the number of
    tiles."""
    from histomap.models.fuse import fold_batchnorm
    from histomap.training.device import autocast

    n_tiles = max(1, int(np.ceil(n_px / tile_px ** 2)))
    x = torch.rand(batch_size, 3, tile_px, tile_px, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    encoder = fold_batchnorm(model.encoder.to(device, memory_format=torch.channels_last).eval(),
                             x[:1], forward=lambda m, t: m.frozen_maps(t))
    with torch.no_grad(), autocast(device, amp_type):
        for start in range(0, n_tiles, batch_size):
            encoder.frozen_maps(x[:min(batch_size, n_tiles - start)])
    return n_tiles


def tables(rows, dense, tiles, slide, work: Path, device, tissue_mm2: float) -> None:
    """Pseudo-spot tables (hexagonal lattices of touching discs) and bin tables (square
    lattices), streamed to ``.h5ad`` together by the pipeline's ``apply_dense_tables`` code (one
    read of the map): one stage, and a row per table with the seconds spent on it."""
    from histomap.tasks.apply import stream_dense_tables, tissue_lookup

    tissue = tissue_lookup(slide, 16.0)
    geo = {"sample": "bench", "platform": "he", "mpp": SLIDE_MPP, "image": str(slide),
           "spatial": {}}
    scales = [("disc", d) for d in SPOT_UM] + [("square", b) for b in BIN_UM]
    labels = [f"{'spots' if shape == 'disc' else 'bins'} {d:g} um" for shape, d in scales]
    paths = [work / f"{label.replace(' ', '_')}.h5ad" for label in labels]
    with Stage(rows, TABLES, device, tissue_mm2):
        written = stream_dense_tables(dense, tiles, scales, paths, geo=geo, tissue=tissue,
                                      info={"model": "pixnet (benchmark)"})
    rows[-1]["items"] = sum(w.n_rows for w in written)
    for label, w in zip(labels, written):
        rows.append({"stage": f"  {label}", "items": w.n_rows, "seconds": w.seconds,
                     "tissue_mm2": tissue_mm2, "mm2_per_s": tissue_mm2 / w.seconds,
                     "file_mib": w.path.stat().st_size / 2 ** 20, "part": True})
        w.path.unlink()


def run(work: Path, args) -> tuple[list[dict], dict]:
    from tiling import write_slide

    from histomap.data.tiling import tile_slide
    from histomap.models.pixnet import PixNet
    from histomap.tasks.dense_map import CPU_BF16_DEFAULT, predict_dense_map
    from histomap.train import cpu_bf16_enabled, resolve_device
    from histomap.training.device import amp_dtype

    device = resolve_device(args.device)
    side_px = int(round(args.side_mm * 1000 / SLIDE_MPP))
    slide = work / "slide.tif"
    start = time.perf_counter()
    write_slide(slide, side_px)
    info = {"slide_px": side_px, "slide_write_s": time.perf_counter() - start}
    rows: list[dict] = []
    with Stage(rows, "tiling (index only)", device, np.nan):
        tiles = tile_slide(slide, None, work / "tiles.parquet", tile_px=224, tile_mpp=1.0,
                           mask_mpp=16.0)
    tissue_mm2 = float((tiles["size_px0"].to_numpy(np.float64) ** 2).sum()
                       * SLIDE_MPP ** 2 / 1e6)
    rows[-1].update(tissue_mm2=tissue_mm2, mm2_per_s=tissue_mm2 / rows[-1]["seconds"],
                    items=len(tiles))
    torch.manual_seed(0)
    model = PixNet(args.n_genes, encoder=args.encoder, decoder_channels=args.decoder_channels,
                   fusion="safb", out_stride=4, freeze_encoder=True)
    bf16 = cpu_bf16_enabled(args.cpu_bf16, CPU_BF16_DEFAULT) and device.type == "cpu"
    with Stage(rows, FLOOR, device, tissue_mm2):
        n_floor = encoder_floor(model, tissue_mm2 * 1e6 / args.input_mpp ** 2, args.tile_px,
                                args.batch_size, device, amp_dtype(device, True, cpu_bf16=bf16))
    rows[-1]["items"] = n_floor  # (the stage's row is appended when its block ends)
    with Stage(rows, "dense_map", device, tissue_mm2):
        dense = predict_dense_map(model, slide, tiles, input_mpp=args.input_mpp,
                                  tile_px=args.tile_px, overlap_px=args.overlap_px,
                                  out_zarr=work / "dense.zarr", batch_size=args.batch_size,
                                  device=device, cpu_bf16=bf16)
    rows[-1]["items"] = int(dense.attrs["n_tiles"])
    info.update(autocast=dense.attrs.get("autocast"), threads=dense.attrs.get("threads"),
                map_px=list(dense.mask.shape), map_mpp=dense.mpp)
    del model
    tables(rows, dense, tiles, slide, work, device, tissue_mm2)
    stages = pd.DataFrame([r for r in rows if r["stage"] != FLOOR and not r.get("part")])
    rows.append({"stage": TOTAL, "items": None, "seconds": float(stages["seconds"].sum()),
                 "tissue_mm2": tissue_mm2,
                 "mm2_per_s": tissue_mm2 / float(stages["seconds"].sum()),
                 "peak_rss_mib": float(stages["peak_rss_mib"].max()),
                 "cuda_max_allocated_mib": float(stages["cuda_max_allocated_mib"].max())})
    floor = next(r["seconds"] for r in rows if r["stage"] == FLOOR)
    for r in rows:
        r["x_floor"] = r["seconds"] / floor
    info["device"] = str(device)
    return rows, info


def write_report(rows, info, args, argv, load_before: str, wall: float) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["items"] = table["items"].astype("Int64")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out_dir / f"{args.name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    load_after = load_average()
    cols = ["stage", "items", "seconds", "x_floor", "mm2_per_s", "peak_rss_mib", "file_mib"]
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
        f"(overlap {args.overlap_px}), channels-last, batch {args.batch_size}, map "
        f"{info['map_px'][1]} x {info['map_px'][0]} px at {info['map_mpp']:g} um. Tables: "
        "pseudo-spots (discs, hexagonal lattice of touching discs) and square bins over the "
        "tissue, every lattice point, streamed to .h5ad in row blocks, the five together through "
        "one read of the map (indented rows: the seconds spent on each table within that "
        "stage; `file_mib`: the file). "
        "`x_floor`: seconds / the encoder floor's (each tissue pixel through the frozen encoder "
        f"once, {args.tile_px} px tiles, nothing else); the total leaves the floor out. "
        f"{args.note}\n",
        table[cols].to_markdown(index=False, floatfmt=".4g") + "\n"])
    write_text_atomic(args.out_dir / f"{args.name}.md", text)
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
