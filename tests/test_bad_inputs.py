"""A catalogue of bad inputs and faults: each must stop with a message that names the user's file
(or the store to delete) and the problem, and leave nothing partial in the output folder.

Each case builds one bad input in a fresh folder and returns ``(run, named, out)``: the step to
run, the path its message must name, and the output folder that must hold nothing partial (no
``*.partial`` or ``*.old`` temporary, none of the step's outputs). ``docs/checks.md`` ("Bad
inputs and faults") lists the same cases: input -> message -> what is left.
"""
from __future__ import annotations

import errno
import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image
from test_readers import GRID, write_legacy, write_visium

from histomap.checked_io import (load_torch_checked, read_h5ad_checked, read_parquet_checked,
                                 sidecar_path)
from histomap.compat import torch
from histomap.data.ingest import ingest_sample
from histomap.data.sheet import validate_sample_sheet
from histomap.data.srpairs.store import pair_specs, read_sr_pairs, write_pairs_zarr
from histomap.data.write_layouts import write_layout
from histomap.errors import InputError
from histomap.outputs import atomic_output
from histomap.plan import SCHEMAS
from histomap.plan.config import load_config, read_config_file, validate_schemas

REPO = Path(__file__).resolve().parents[1]
SIZE = {"size_um": (300.0, 300.0), "mpp": 0.5, "n_genes": 60, "tissue_margin_um": 20.0}
NO_TISSUE_CHECK = {"min_spots_on_tissue": 0.0, "spatialdata_mpp": None}


# --------------------------------------------------------------------------- shared inputs

@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """Visium HD, Xenium and HEST layouts of one small synthetic section (about a second)."""
    root = tmp_path_factory.mktemp("bad_layouts")
    for layout in ("visium_hd", "xenium", "hest"):
        write_layout(layout, root / layout / "S3", seed=3, dataset_seed=0, **SIZE)
    return root


class MeanColour(torch.nn.Module):
    out_stride = 4
    n_genes = 3

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images, 4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """A real dense map, SR pairs zarr, feature cache, model.pt, spots.h5ad and parquet table,
    each written once; cases copy the one they corrupt."""
    from histomap.data.slide import write_pyramid
    from histomap.models import STNet
    from histomap.tasks.dense_map import predict_dense_map
    from histomap.tasks.feature_cache import FORMAT as FEATURES
    from histomap.train import save_model

    root = tmp_path_factory.mktemp("bad_stores")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(160, 200, 3), dtype=np.uint8)
    write_pyramid(image, root / "slide.tif", 1.0)
    predict_dense_map(MeanColour(), root / "slide.tif", (0, 0, 200, 160), input_mpp=1.0,
                      tile_px=32, overlap_px=8, out_zarr=root / "dense.zarr", device="cpu",
                      genes=["GA", "GB", "GC"])
    spots = ad.AnnData(np.ones((4, 3), np.float32))
    spots.obs_names = [f"s{i}" for i in range(4)]
    spots.var_names = ["GA", "GB", "GC"]
    spots.obsm["spatial"] = np.array([[50.0, 40], [100, 80], [150, 120], [60, 100]])
    spots.uns["histomap"] = {"mpp": 1.0, "spot_diameter_um": 20.0, "sample": "S1"}
    spots.write_h5ad(root / "spots.h5ad")
    pd.DataFrame({"x0_px": np.arange(50.0), "y0_px": np.arange(50.0)}).to_parquet(
        root / "tiles.parquet")
    n, genes = 3, 2
    specs = pair_specs(genes, (10, 10), (2, 2), (20, 20), "none")
    items = ({"lr": np.full((genes, 2, 2), i, np.float32),
              "hr": rng.random((genes, 10, 10)).astype(np.float32),
              "he": rng.integers(0, 255, (3, 20, 20), dtype=np.uint8),
              "mask": np.ones((10, 10), bool), "origin_px": np.zeros(2),
              "origin_um": np.zeros(2), "grid_index": np.array([0, i]),
              "tissue_fraction": np.float32(1.0)} for i in range(n))
    write_pairs_zarr(root / "pairs.zarr", n, specs, items,
                     {"format": "histomap-srpairs/1", "genes": ["GA", "GB"], "scale": 5,
                      "normalisation": "none"})
    cache = zarr.open_group(str(root / "features.zarr"), mode="w")
    cache.create_array("level0", data=rng.random((4, 8, 8)).astype(np.float16), chunks=(4, 4, 4))
    cache.create_array("level1", data=rng.random((6, 4, 4)).astype(np.float16), chunks=(6, 2, 2))
    cache.create_array("spots", data=rng.random((4, 6)).astype(np.float16))
    names = cache.create_array("spot_names", shape=(4,), dtype=str)
    names[:] = np.asarray(spots.obs_names, dtype=object)
    cache.create_array("encoded", data=np.ones((1, 1), np.uint8))
    cache.attrs.update({"format": FEATURES, "encoder": "test_resnet", "checkpoint": None,
                        "mpp": 1.0, "slide_mpp": 1.0, "strides": [4, 8], "channels": [4, 6],
                        "origin_px": [0, 0], "tile_px": 32, "margin_px": 0, "crop_um": 20.0})
    torch.manual_seed(0)
    save_model(root / "model.pt", STNet(3, backbone="test_resnet"), model_name="stnet",
               genes=["GA", "GB", "GC"])
    return root


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        if sidecar_path(src).exists():
            shutil.copy2(sidecar_path(src), sidecar_path(dst))
    return dst


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def flip(path: Path, start: int, n: int = 32) -> Path:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the catalogue

@dataclass
class Ctx:
    tmp: Path
    layouts: Path
    stores: Path

    @property
    def out(self) -> Path:
        return self.tmp / "results" / "S1"


@dataclass
class Case:
    build: Callable[[Ctx], tuple[Callable[[], object], Path | str, Path]]
    fragments: tuple[str, ...]
    error: type[Exception] = InputError


CASES: dict[str, Case] = {}


def case(name: str, *fragments: str, error: type[Exception] = InputError):
    def register(build):
        CASES[name] = Case(build, fragments, error)
        return build
    return register


def ingest(ctx: Ctx, platform: str, path: Path, **kwargs) -> Callable[[], object]:
    return lambda: ingest_sample(platform=platform, sample="S1", path=path, out_dir=ctx.out,
                                 **{**NO_TISSUE_CHECK, **kwargs})


# sample sheets --------------------------------------------------------------

SHEET_COLUMNS = ["sample", "patient", "platform", "path", "image", "mpp"]


def sheet(ctx: Ctx, rows, columns=SHEET_COLUMNS):
    table = pd.DataFrame([dict(zip(columns, r)) for r in rows], columns=columns).fillna("")
    name = ctx.tmp / "my_sheet.tsv"
    return lambda: validate_sample_sheet(table, SCHEMAS["samples"], name), name, ctx.out


@case("sheet: a required column missing", "sample 'A': 'platform' column is missing")
def _(ctx):
    return sheet(ctx, [("A", "P1", "a")], columns=["sample", "patient", "path"])


@case("sheet: duplicate samples", "duplicate sample names ['A']")
def _(ctx):
    return sheet(ctx, [("A", "P1", "legacy_st", "a", "", ""), ("A", "P2", "legacy_st", "b",
                                                                  "", "")])


@case("sheet: unknown platform", "sample 'C': platform 'visum' is not one of")
def _(ctx):
    return sheet(ctx, [("C", "P1", "visum", "c", "", "")])


@case("sheet: empty path", "sample 'A': path")
def _(ctx):
    return sheet(ctx, [("A", "P1", "legacy_st", "", "", "")])


@case("sheet: mpp not a number", "sample 'B': mpp 'half' is not valid")
def _(ctx):
    return sheet(ctx, [("B", "P1", "legacy_st", "b", "", "half")])


@case("sheet: visium without its full-resolution image", "sample 'D': image")
def _(ctx):
    return sheet(ctx, [("D", "P1", "visium", "d", "", "")])


# legacy ST (HER2ST layout) --------------------------------------------------

@case("legacy ST: counts file missing", "no counts file S1.tsv.gz")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1")
    (folder / "S1.tsv.gz").unlink()
    return ingest(ctx, "legacy_st", folder), folder, ctx.out


@case("legacy ST: counts file truncated (gzip cut)", "cannot parse counts table",
      "truncated or corrupt: replace it with an intact copy")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", counts=np.ones((len(GRID), 3), int) * 3)
    data = gzip.compress(gzip.decompress((folder / "S1.tsv.gz").read_bytes()) * 40)
    (folder / "S1.tsv.gz").write_bytes(data[:len(data) // 2])
    return ingest(ctx, "legacy_st", folder), folder / "S1.tsv.gz", ctx.out


@case("legacy ST: non-numeric count", "non-numeric count value 'x'")
def _(ctx):
    names = [f"{x}x{y}" for x, y in GRID]
    text = "\tGA\tGB\n" + "".join(f"{n}\t1\t{'x' if i == 3 else 2}\n" for i, n in enumerate(names))
    folder = write_legacy(ctx.tmp / "S1", counts_text=text)
    return ingest(ctx, "legacy_st", folder), folder / "S1.tsv.gz", ctx.out


@case("legacy ST: negative count", "counts must be non-negative")
def _(ctx):
    counts = np.ones((len(GRID), 3), int)
    counts[2, 1] = -4
    folder = write_legacy(ctx.tmp / "S1", counts=counts)
    return ingest(ctx, "legacy_st", folder), folder / "S1.tsv.gz", ctx.out


@case("legacy ST: selection file missing", "no spot selection file S1_selection.tsv")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1")
    (folder / "S1_selection.tsv").unlink()
    return ingest(ctx, "legacy_st", folder), folder, ctx.out


@case("legacy ST: selection lacks pixel columns", "spot selection table lacks column(s)")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1")
    path = folder / "S1_selection.tsv"
    pd.read_csv(path, sep="\t").drop(columns=["pixel_x"]).to_csv(path, sep="\t", index=False)
    return ingest(ctx, "legacy_st", folder), path, ctx.out


@case("legacy ST: no spot selected", "selected = 0")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", selected=[0] * len(GRID))
    return ingest(ctx, "legacy_st", folder), folder / "S1_selection.tsv", ctx.out


@case("legacy ST: image missing", "no H&E image")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", image=False)
    return ingest(ctx, "legacy_st", folder), folder, ctx.out


@case("legacy ST: image unreadable", "cannot read image")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", image=False)
    (folder / "he.jpg").write_bytes(b"not a jpeg" * 20)
    return ingest(ctx, "legacy_st", folder), folder / "he.jpg", ctx.out


@case("legacy ST: image truncated", "cannot read image: image file is truncated")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", image=False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(folder / "he.png")
    truncate(folder / "he.png", 0.3)
    return ingest(ctx, "legacy_st", folder), folder / "he.png", ctx.out


@case("H&E: image too small for the spots (tiny or wrong image)",
      "spot centres lie outside the 40 x 30 px image")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", image_size=(40, 30))
    return ingest(ctx, "legacy_st", folder), folder / "he.jpg", ctx.out


@case("H&E: image not matching the spots (transposed)", "fall on background", "transposed")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", image=False, pixel_offset=(420.0, 30.0))
    rng = np.random.default_rng(0)
    image = np.full((800, 900, 3), 245, dtype=np.uint8)
    image[:300, 380:720] = rng.normal((170, 90, 160), 12, size=(300, 340, 3)).clip(0, 255)
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))).save(folder / "he.png")
    run = ingest(ctx, "legacy_st", folder, min_spots_on_tissue=0.5)
    return run, folder / "he.png", ctx.out


@case("H&E: no mpp and none inferable", "missing mpp")
def _(ctx):
    folder = write_legacy(ctx.tmp / "S1", spots=[(1, 1)], counts=np.ones((1, 3), int))
    return ingest(ctx, "legacy_st", folder), folder / "S1_selection.tsv", ctx.out


@case("H&E: `he` slide without mpp metadata", "no pixel size")
def _(ctx):
    image = ctx.tmp / "slide.png"
    Image.new("RGB", (64, 48), (200, 100, 150)).save(image)
    return ingest(ctx, "he", image), image, ctx.out


@case("H&E: `he` slide file missing", "slide file does not exist")
def _(ctx):
    return ingest(ctx, "he", ctx.tmp / "slide.svs"), ctx.tmp / "slide.svs", ctx.out


# Visium ---------------------------------------------------------------------

@case("Visium: tissue positions missing", "tissue_positions")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs")
    (outs / "spatial" / "tissue_positions.csv").unlink()
    return ingest(ctx, "visium", outs, image=image), outs, ctx.out


@case("Visium: tissue positions parquet truncated", "truncated Parquet file",
      "replace it with an intact copy")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs", "parquet")
    path = truncate(outs / "spatial" / "tissue_positions.parquet")
    return ingest(ctx, "visium", outs, image=image), path, ctx.out


@case("Visium: scale factors unreadable", "cannot read scale factors")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs")
    path = outs / "spatial" / "scalefactors_json.json"
    path.write_text("{not json")
    return ingest(ctx, "visium", outs, image=image), path, ctx.out


@case("Visium: matrix .h5 truncated", "cannot read 10x HDF5 matrix", "intact copy")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs")
    path = truncate(outs / "filtered_feature_bc_matrix.h5", 0.6)
    return ingest(ctx, "visium", outs, image=image), path, ctx.out


@case("Visium: matrix .h5 not HDF5", "not an HDF5 file")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs")
    path = outs / "filtered_feature_bc_matrix.h5"
    path.write_bytes(b"barcode,gene,count\n" * 10)
    return ingest(ctx, "visium", outs, image=image), path, ctx.out


@case("Visium: image smaller than the spot positions", "outside the 60 x 40 px image")
def _(ctx):
    outs, image = write_visium(ctx.tmp / "outs", image_size=(60, 40))
    return ingest(ctx, "visium", outs, image=image), image, ctx.out


# Visium HD ------------------------------------------------------------------

def hd(ctx: Ctx) -> Path:
    return copy(ctx.layouts / "visium_hd" / "S3", ctx.tmp / "hd")


def hd_bins(folder: Path, um: int = 8) -> Path:
    return folder / "outs" / "binned_outputs" / f"square_{um:03d}um"


@case("Visium HD: a bin size folder missing", "bin size folder missing")
def _(ctx):
    folder = hd(ctx)
    shutil.rmtree(hd_bins(folder, 16))
    return ingest(ctx, "visium_hd", folder, image=folder / "he.tif"), "square_016um", ctx.out


@case("Visium HD: bin matrix truncated", "cannot read 10x HDF5 matrix")
def _(ctx):
    folder = hd(ctx)
    path = truncate(hd_bins(folder) / "filtered_feature_bc_matrix.h5", 0.5)
    return ingest(ctx, "visium_hd", folder, image=folder / "he.tif"), path, ctx.out


@case("Visium HD: bin positions parquet truncated", "truncated Parquet file")
def _(ctx):
    folder = hd(ctx)
    path = truncate(hd_bins(folder) / "spatial" / "tissue_positions.parquet", 0.7)
    return ingest(ctx, "visium_hd", folder, image=folder / "he.tif"), path, ctx.out


@case("Visium HD: microns_per_pixel absent", "microns_per_pixel is absent")
def _(ctx):
    folder = hd(ctx)
    for path in (folder / "outs" / "binned_outputs").glob("*/spatial/scalefactors_json.json"):
        factors = json.loads(path.read_text())
        del factors["microns_per_pixel"]
        path.write_text(json.dumps(factors))
    return (ingest(ctx, "visium_hd", folder, image=folder / "he.tif"),
            "scalefactors_json.json", ctx.out)


# Xenium ---------------------------------------------------------------------

def xe(ctx: Ctx) -> Path:
    return copy(ctx.layouts / "xenium" / "S3", ctx.tmp / "xe")


def xe_run(ctx: Ctx, folder: Path):
    return ingest(ctx, "xenium", folder, image=folder / "S3_he_image.ome.tif")


@case("Xenium: transcripts lack a column", "transcripts table lacks column(s) feature_name")
def _(ctx):
    folder = xe(ctx)
    path = folder / "transcripts.parquet"
    pd.read_parquet(path).drop(columns=["feature_name"]).to_parquet(path)
    return xe_run(ctx, folder), path, ctx.out


@case("Xenium: transcript locations in pixels or negative", "Xenium locations are >= 0 um")
def _(ctx):
    folder = xe(ctx)
    path = folder / "transcripts.parquet"
    table = pd.read_parquet(path)
    table.loc[table.index[5], "x_location"] = -12.0
    table.to_parquet(path)
    return xe_run(ctx, folder), path, ctx.out


@case("Xenium: transcripts parquet truncated", "transcripts.parquet: truncated Parquet file")
def _(ctx):
    folder = xe(ctx)
    return xe_run(ctx, folder), truncate(folder / "transcripts.parquet", 0.8), ctx.out


@case("Xenium: H&E alignment not an affine", "not a 3 x 3 affine")
def _(ctx):
    folder = xe(ctx)
    (folder / "S3_he_imagealignment.csv").write_text("1,0,0\n0,1,0\n")
    return xe_run(ctx, folder), folder / "S3_he_imagealignment.csv", ctx.out


# HEST -----------------------------------------------------------------------

def hest_copy(ctx: Ctx) -> Path:
    return copy(ctx.layouts / "hest" / "S3", ctx.tmp / "hest")


@case("HEST: metadata missing", "HEST metadata file not found")
def _(ctx):
    root = hest_copy(ctx)
    (root / "metadata" / "S3.json").unlink()
    return (ingest(ctx, "hest", root, reader_options={"hest_id": "S3"}),
            root / "metadata" / "S3.json", ctx.out)


@case("HEST: metadata without pixel size", "no pixel size")
def _(ctx):
    root = hest_copy(ctx)
    path = root / "metadata" / "S3.json"
    meta = json.loads(path.read_text())
    del meta["pixel_size_um_estimated"], meta["pixel_size_um_embedded"]
    path.write_text(json.dumps(meta))
    return ingest(ctx, "hest", root, reader_options={"hest_id": "S3"}), path, ctx.out


@case("HEST: expression h5ad truncated", "not an HDF5 file", "intact copy")
def _(ctx):
    root = hest_copy(ctx)
    path = root / "st" / "S3.h5ad"
    path.write_bytes(path.read_bytes()[4:2000])
    return ingest(ctx, "hest", root, reader_options={"hest_id": "S3"}), path, ctx.out


@case("HEST: expression h5ad cut short", "cannot read the HEST expression file")
def _(ctx):
    root = hest_copy(ctx)
    path = truncate(root / "st" / "S3.h5ad", 0.5)
    return ingest(ctx, "hest", root, reader_options={"hest_id": "S3"}), path, ctx.out


# configs --------------------------------------------------------------------

def config_run(ctx: Ctx, text: str):
    path = ctx.tmp / "my_config.yaml"
    path.write_text(text)

    def run():
        validate_schemas(load_config([path], defaults=REPO / "config" / "config.yaml"))
    return run, "", ctx.out


@case("config: unknown key", "'tile_pixels' was unexpected", error=Exception)
def _(ctx):
    return config_run(ctx, "tiling:\n  tile_pixels: 224\n")


@case("config: bad value", "'big' is not of type 'integer'", error=Exception)
def _(ctx):
    return config_run(ctx, "tiling:\n  tile_px: big\n")


@case("config: bad enum value", "'float64' is not one of", error=Exception)
def _(ctx):
    return config_run(ctx, "predict:\n  dense_dtype: float64\n")


@case("config: not YAML", "cannot read the config file", error=ValueError)
def _(ctx):
    path = ctx.tmp / "my_config.yaml"
    path.write_text("tiling: [unclosed\n")
    return lambda: read_config_file(path), path, ctx.out


# corrupt files histomap wrote (checkpoints, model files, stores, tables) -------

@case("model.pt truncated", "cannot read as a histomap model: corrupt or truncated",
      "delete it and rerun")
def _(ctx):
    from histomap.train import load_model

    path = copy(ctx.stores / "model.pt", ctx.tmp / "model.pt")
    sidecar_path(path).unlink()  # written by an older histomap: no checksum to compare
    truncate(path, 0.5)
    return lambda: load_model(path), path, ctx.out


@case("model.pt with flipped bytes (checksum sidecar)", "does not match its checksum",
      "model.pt.sha256", "delete it and rerun")
def _(ctx):
    from histomap.train import load_model

    path = copy(ctx.stores / "model.pt", ctx.tmp / "model.pt")
    flip(path, path.stat().st_size // 2, 8)
    return lambda: load_model(path), path, ctx.out


@case("checkpoint truncated", "cannot read as a checkpoint: corrupt or truncated")
def _(ctx):
    path = ctx.tmp / "checkpoints" / "best.pt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(100)}, "epoch": 3}, path)
    truncate(path, 0.5)
    return lambda: load_torch_checked(path, what="checkpoint"), path, ctx.out


@case("dense map: a chunk fails to decode", "failed to decode", "delete it and rerun")
def _(ctx):
    from histomap.tasks.dense import dense_spot_table

    store = copy(ctx.stores / "dense.zarr", ctx.tmp / "dense.zarr")
    for chunk in chunk_files(store, "0"):
        flip(chunk, 4, 64)
    out = ctx.out / "spots_20um.h5ad"
    return (lambda: dense_spot_table(store, ctx.stores / "spots.h5ad", 20.0, out), store,
            ctx.out)


@case("dense map: metadata corrupt", "cannot open the dense map: its metadata is corrupt")
def _(ctx):
    from histomap.tasks.dense_map import read_dense

    store = copy(ctx.stores / "dense.zarr", ctx.tmp / "dense.zarr")
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_')
    return lambda: read_dense(store), store, ctx.out


@case("dense map: mask missing", "dense map lacks the array(s) labels/mask/0")
def _(ctx):
    from histomap.tasks.dense_map import read_dense

    store = copy(ctx.stores / "dense.zarr", ctx.tmp / "dense.zarr")
    shutil.rmtree(store / "labels" / "mask" / "0")
    return lambda: read_dense(store), store, ctx.out


@case("dense map: genes and map disagree", "level 0 has shape", "for 4 genes")
def _(ctx):
    from histomap.tasks.dense_map import read_dense

    store = copy(ctx.stores / "dense.zarr", ctx.tmp / "dense.zarr")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["histomap"]["genes"].append("GD")
    (store / "zarr.json").write_text(json.dumps(meta))
    return lambda: read_dense(store), store, ctx.out


@case("feature cache: a level array missing", "feature cache lacks the array(s) level1")
def _(ctx):
    from histomap.tasks.feature_cache import FeaturePyramid

    store = copy(ctx.stores / "features.zarr", ctx.tmp / "features.zarr")
    shutil.rmtree(store / "level1")
    return lambda: FeaturePyramid(store), store, ctx.out


@case("feature cache: level shapes inconsistent", "feature cache is inconsistent",
      "level1 has shape")
def _(ctx):
    from histomap.tasks.feature_cache import FeaturePyramid

    store = copy(ctx.stores / "features.zarr", ctx.tmp / "features.zarr")
    root = zarr.open_group(str(store), mode="a")
    root.attrs["strides"] = [4, 16]
    return lambda: FeaturePyramid(store), store, ctx.out


@case("feature cache: a chunk fails to decode", "failed to decode")
def _(ctx):
    from histomap.tasks.feature_cache import FeaturePyramid

    store = copy(ctx.stores / "features.zarr", ctx.tmp / "features.zarr")
    for chunk in chunk_files(store, "level0"):
        truncate(chunk, 0.3)
    return lambda: FeaturePyramid(store), store, ctx.out


@case("SR pairs: arrays of different patch counts", "SR pairs zarr is inconsistent",
      "different numbers of patches")
def _(ctx):
    store = copy(ctx.stores / "pairs.zarr", ctx.tmp / "pairs.zarr")
    root = zarr.open_group(str(store), mode="a")
    del root["tissue_fraction"]
    root.create_array("tissue_fraction", shape=(2,), dtype="float32")
    return lambda: read_sr_pairs(store), store, ctx.out


@case("SR pairs: a chunk fails to decode", "failed to decode", "delete it and rerun")
def _(ctx):
    store = copy(ctx.stores / "pairs.zarr", ctx.tmp / "pairs.zarr")
    flip(chunk_files(store, "hr")[1], 2, 48)
    return lambda: read_sr_pairs(store), store, ctx.out


@case("SR pairs: the HR array missing", "SR pairs zarr lacks the array(s) hr")
def _(ctx):
    store = copy(ctx.stores / "pairs.zarr", ctx.tmp / "pairs.zarr")
    shutil.rmtree(store / "hr")
    return lambda: read_sr_pairs(store), store, ctx.out


@case("h5ad truncated", "cannot read the spot table: corrupt or truncated", "delete it")
def _(ctx):
    from histomap.tasks.dense import dense_spot_table

    spots = truncate(copy(ctx.stores / "spots.h5ad", ctx.tmp / "spots.h5ad"), 0.5)
    out = ctx.out / "spots_20um.h5ad"
    return (lambda: dense_spot_table(ctx.stores / "dense.zarr", spots, 20.0, out), spots,
            ctx.out)


@case("h5ad with a flipped header", "not an HDF5 file")
def _(ctx):
    spots = flip(copy(ctx.stores / "spots.h5ad", ctx.tmp / "spots.h5ad"), 0, 8)
    return lambda: read_h5ad_checked(spots), spots, ctx.out


@case("parquet truncated", "truncated Parquet file", "delete it and rerun")
def _(ctx):
    path = truncate(copy(ctx.stores / "tiles.parquet", ctx.tmp / "tiles.parquet"), 0.6)
    return lambda: read_parquet_checked(path, what="tile index"), path, ctx.out


@case("parquet with a corrupt footer", "cannot read the tile index's footer")
def _(ctx):
    path = copy(ctx.stores / "tiles.parquet", ctx.tmp / "tiles.parquet")
    flip(path, path.stat().st_size - 60, 40)
    return lambda: read_parquet_checked(path, what="tile index"), path, ctx.out


# disk -----------------------------------------------------------------------

@case("disk full while writing (ENOSPC)", "no space left on the device",
      "nothing partial was kept")
def _(ctx):
    path = ctx.out / "table.parquet"

    def run():
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    return run, path, ctx.out


@case("disk full when saving model.pt", "no space left on the device")
def _(ctx):
    from histomap.models import STNet
    from histomap.train import save_model

    path = ctx.out / "model.pt"

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def run():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "save", full)
            save_model(path, STNet(3, backbone="test_resnet"), model_name="stnet",
                       genes=["A", "B", "C"])
    return run, path, ctx.out


def _little_disk(monkeypatch, free: int = 10 * 2**20):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: type(usage)(usage.total, usage.total - free, free))


@case("disk too small for a dense map", "not enough disk space for the dense map",
      "predict.dense_dtype: float16")
def _(ctx):
    from histomap.tasks.dense_map import predict_dense_map

    class Wide(MeanColour):
        n_genes = 4000

        def forward(self, images):
            return super().forward(images).repeat(1, 1334, 1, 1)[:, :4000]

    out = ctx.out / "dense.zarr"

    def run():
        with pytest.MonkeyPatch.context() as mp:
            _little_disk(mp)
            predict_dense_map(Wide(), ctx.stores / "slide.tif", (0, 0, 200, 160),
                              input_mpp=1.0, tile_px=32, overlap_px=8, out_zarr=out,
                              device="cpu")
    return run, out, ctx.out


@case("disk too small for a tile store", "not enough disk space for the tile store")
def _(ctx):
    from histomap.data.tiling import tile_slide

    slide = ctx.layouts / "visium_hd" / "S3" / "he.tif"

    def run():
        with pytest.MonkeyPatch.context() as mp:
            _little_disk(mp, free=2**10)
            tile_slide(slide, ctx.out / "tiles.zarr", ctx.out / "tiles.parquet", tile_px=32,
                       tile_mpp=1.0, min_tissue=0.0)
    return run, ctx.out / "tiles.zarr", ctx.out


@case("disk too small for a 2 um bin table", "not enough disk space for the 2 um bin table")
def _(ctx):
    folder = xe(ctx)

    def run():
        with pytest.MonkeyPatch.context() as mp:
            _little_disk(mp, free=2**10)
            xe_run(ctx, folder)()
    return run, ctx.out / "highres.h5ad", ctx.out


# bundles --------------------------------------------------------------------

def bundle(ctx: Ctx) -> Path:
    from histomap.checked_io import sha256_file
    from histomap.tasks.bundle import BUNDLE_FORMAT

    folder = ctx.tmp / "bundle"
    copy(ctx.stores / "model.pt", folder / "model.pt")
    meta = {"format": BUNDLE_FORMAT, "name": "stnet", "architecture": "stnet", "kind": "spot",
            "genes": ["GA", "GB", "GC"], "normalisation": {"target_sum": 1e4, "log1p": True},
            "input": {"mpp": 1.0, "crop_um": 20.0},
            "model_file": {"name": "model.pt", "sha256": sha256_file(folder / "model.pt")}}
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


def bundle_run(ctx: Ctx, folder: Path):
    from histomap.tasks.bundle import read_bundle

    return lambda: read_bundle(folder)


@case("bundle: model.pt missing", "the bundle's model file is missing",
      "copy the bundle folder as a whole")
def _(ctx):
    folder = bundle(ctx)
    (folder / "model.pt").unlink()
    return bundle_run(ctx, folder), folder / "model.pt", ctx.out


@case("bundle: model.pt of another SHA-256", "SHA-256 mismatch")
def _(ctx):
    folder = bundle(ctx)
    flip(folder / "model.pt", 200, 4)
    return bundle_run(ctx, folder), folder / "model.pt", ctx.out


@case("bundle: bundle.json missing", "bundle description missing")
def _(ctx):
    folder = bundle(ctx)
    (folder / "bundle.json").unlink()
    return bundle_run(ctx, folder), folder / "bundle.json", ctx.out


@case("bundle: bundle.json corrupt", "cannot read the bundle description")
def _(ctx):
    folder = bundle(ctx)
    truncate(folder / "bundle.json", 0.5)
    return bundle_run(ctx, folder), folder / "bundle.json", ctx.out


@case("bundle: bundle.json lacks keys", "bundle description lacks genes")
def _(ctx):
    folder = bundle(ctx)
    meta = json.loads((folder / "bundle.json").read_text())
    del meta["genes"]
    (folder / "bundle.json").write_text(json.dumps(meta))
    return bundle_run(ctx, folder), folder / "bundle.json", ctx.out


# --------------------------------------------------------------------------- the test

def assert_nothing_partial(out: Path) -> None:
    """No temporary and no output of the failed step: the folder is absent or holds nothing."""
    if not out.exists():
        return
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not left, f"the failed step left {left} in {out}"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, layouts, stores):
    entry = CASES[name]
    run, named, out = entry.build(Ctx(tmp_path, layouts, stores))
    with pytest.raises(entry.error) as info:
        run()
    message = str(info.value)
    for fragment in entry.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert str(named) in message, f"{named} not named in {message!r}"
    if isinstance(info.value, InputError) and named:
        assert str(named) in info.value.path or info.value.path in str(named) \
            or Path(info.value.path).name in str(named), info.value.path
    assert_nothing_partial(out)


def test_disk_space_estimates_and_resumed_writes(tmp_path, monkeypatch):
    """The estimates are shape x dtype size x the stated factors; a partial output that a
    resumed write continues counts as already written."""
    from histomap import disk_space

    assert disk_space.dense_map_bytes(10, 30, 40, "float32") == int(np.ceil((41) * 1200 * 4 / 3))
    assert disk_space.dense_map_bytes(10, 30, 40, "float16") < \
        disk_space.dense_map_bytes(10, 30, 40, "float32") * 0.52
    assert disk_space.tile_store_bytes(10, 32, "none") == 10 * 32 * 32 * 3
    assert disk_space.bin_table_bytes(100, 1000) == 8 * 1000 + 8 * 101 + 64 * 100
    _little_disk(monkeypatch, free=1000)
    out = tmp_path / "dense.zarr"
    with pytest.raises(InputError, match="needs about 2.0 KiB"):
        disk_space.check_disk_space(out, 2048, "dense map", "test")
    (tmp_path / "dense.zarr.partial").mkdir()
    (tmp_path / "dense.zarr.partial" / "chunk").write_bytes(b"x" * 1500)
    assert disk_space.check_disk_space(out, 2048, "dense map", "test") == 1000
