#!/usr/bin/env python
"""Peak memory of streamed bin tables as the bin count grows (it must stay flat at any size).

For each ``--bins`` count N, a dense map is written directly to zarr (no model: the map's
values do not change the read-out's cost) over a square of tissue holding N bins of
``--bin-um`` (side sqrt(N) x bin_um), at ``--map-mpp`` um per map pixel, ``--genes`` genes, in
the dense-map layout of :func:`histomap.tasks.dense_map.predict_dense_map` (one gene per chunk,
256 px chunks), written band by band; its tissue tiles are 224 um squares. Then
:func:`histomap.tasks.apply.stream_dense_table` (the ``apply_dense_tables`` rule's code) writes
the table of every bin to ``.h5ad`` in row blocks. Per N: seconds, bins per second, the peak RSS
of the table stage (VmHWM reset before it) and the file size. Output ``<out-dir>/<name>.csv`` and
``.md`` (machine, load average, this command).

    python benchmarks/bin_table_memory.py --bins 1e6 5e6 20e6
    python benchmarks/bin_table_memory.py --quick --out-dir /tmp/bins   # smoke run
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from histomap.compat import torch
from histomap.machine import Stage, load_average, machine
from histomap.outputs import atomic_output, write_text_atomic

log = logging.getLogger("bin_table_memory")
REPO = Path(__file__).resolve().parents[1]
SLIDE_MPP = 0.5
TILE_UM = 224.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bins", type=float, nargs="+", default=None, help="bin counts (1e6 5e6 20e6)")
    p.add_argument("--bin-um", type=float, default=2.0)
    p.add_argument("--map-mpp", type=float, default=4.0)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (default: a temp dir)")
    p.add_argument("--name", default="bin_table_memory")
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    args = p.parse_args(argv)
    args.bins = [int(b) for b in (args.bins or ([2e4, 8e4] if args.quick else [1e6, 5e6, 20e6]))]
    if args.quick:
        args.genes = min(args.genes, 8)
    return args


def write_map(path: Path, side_um: float, args) -> tuple:
    """A smooth dense map over [0, side) um (origin at the slide's corner), its tissue tiles."""
    import zarr

    from histomap.tasks.dense_map import DenseMap

    n = int(math.ceil(side_um / args.map_mpp))
    chunk = min(256, n)
    dense = zarr.open_array(path / "0", mode="w", shape=(args.genes, n, n),
                            chunks=(1, chunk, chunk),
                            dtype="float32")
    xs = np.arange(n, dtype=np.float32)
    for y0 in range(0, n, chunk):
        ys = np.arange(y0, min(y0 + chunk, n), dtype=np.float32)
        band = np.stack([1.5 + np.sin(ys[:, None] / (17 + g)) * np.cos(xs[None, :] / (23 + g))
                         for g in range(args.genes)]).astype(np.float32)
        dense[:, y0:y0 + len(ys)] = band
    mask = zarr.open_array(path / "mask", mode="w", shape=(n, n), chunks=(chunk, chunk),
                           dtype="uint8", fill_value=1)
    dmap = DenseMap(path=path, dense=dense, mask=mask, genes=[f"g{i}" for i in range(args.genes)],
                    mpp=args.map_mpp, origin_px=(0.0, 0.0), slide_mpp=SLIDE_MPP, attrs={})
    step = TILE_UM / SLIDE_MPP
    k = int(math.ceil(side_um / TILE_UM))
    tiles = pd.DataFrame([(c * step, r * step, step) for r in range(k) for c in range(k)],
                         columns=["x0_px", "y0_px", "size_px0"])
    return dmap, tiles


def run(work: Path, args) -> list[dict]:
    from histomap.tasks.apply import stream_dense_table

    rows: list[dict] = []
    device = torch.device("cpu")
    geo = {"sample": "bench", "platform": "he", "mpp": SLIDE_MPP, "image": "none", "spatial": {}}
    for n_bins in args.bins:
        side_um = math.sqrt(n_bins) * args.bin_um
        folder = work / f"map_{n_bins}"
        start = time.perf_counter()
        dmap, tiles = write_map(folder, side_um, args)
        log.info("map for %d bins: %.1f s", n_bins, time.perf_counter() - start)
        half = side_um / SLIDE_MPP

        def tissue(xy, half=half):  # every bin of the square is tissue
            return (xy[:, 0] < half) & (xy[:, 1] < half)

        out = work / f"bins_{n_bins}.h5ad"
        with Stage(rows, f"{n_bins / 1e6:g} M bins", device, side_um ** 2 / 1e6,
                   target_bins=n_bins):
            written = stream_dense_table(dmap, tiles, "square", args.bin_um, out, geo=geo,
                                         tissue=tissue, info={"model": "synthetic map"})
        rows[-1].update(items=written, bins_per_s=written / rows[-1]["seconds"],
                        file_mib=out.stat().st_size / 2 ** 20)
        out.unlink()
        shutil.rmtree(folder)
    return rows


def main(argv=None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    load_before = load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run(work, args)
    table = pd.DataFrame(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out_dir / f"{args.name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    cols = ["stage", "items", "seconds", "bins_per_s", "peak_rss_mib", "rss_before_mib",
            "file_mib"]
    text = "\n".join([
        "# Streamed bin tables: peak memory against the bin count\n",
        "Command: `python " + " ".join(shlex.quote(a) for a in ["benchmarks/bin_table_memory.py",
                                                               *argv]) + "`\n",
        f"Machine: {machine()}; load average (1 / 5 / 15 min) {load_before} before, "
        f"{load_average()} after; wall time {time.perf_counter() - start:.0f} s.\n",
        f"{args.bin_um:g} um bins over a square of tissue, read out of a {args.map_mpp:g} um "
        f"dense map of {args.genes} genes (zarr, 256 px chunks, one gene each) by "
        "`histomap.tasks.apply.stream_dense_table` and written to .h5ad in row blocks "
        "(X float32 dense). `peak_rss_mib`: the process's peak RSS during the table stage "
        "(VmHWM reset before it; includes the ~0.4 GB of the interpreter, torch and anndata).\n",
        table[cols].to_markdown(index=False, floatfmt=".4g") + "\n"])
    write_text_atomic(args.out_dir / f"{args.name}.md", text)
    print(text)
    return table


if __name__ == "__main__":
    main()
