"""The report shows the maps: benchmark tables as HTML, dense maps over the H&E with measured
spots on the same colour scale, super-resolution panels, training curves, the cross-scale plot;
and the workflow's conventions (snakefmt, LICENSE)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histomap.evaluation.figures import (plot_cross_scale, plot_dense_maps, plot_sr_panels,
                                         plot_training_curves, shared_colour_range)
from histomap.evaluation.html import markdown_html

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "benchmarks" / "results" / "cross_scale"


def test_benchmark_tables_as_html():
    md = (RECORDED / "benchmark.md").read_text()
    page = markdown_html(md, "histomap benchmark")
    n_tables = len(re.findall(r"^\|[-:| ]+\|$", md, flags=re.M))
    assert n_tables > 3 and page.count("<table>") == n_tables
    assert "<h1>histomap benchmark</h1>" in page
    # numbers sit in right-aligned cells, exactly as in the markdown
    assert '<td class="num">0.6430 ± 0.0360</td>' in page
    assert "<b>signed</b>" in page and "<code>pooled</code>" in page
    assert "|" not in re.sub(r"<[^>]+>", "", page.split("<body>")[1]).replace("±", "")


def test_cross_scale_plot_values_are_the_recorded_table(tmp_path):
    """The plotted points are the README's cross-scale table (PCC@M, mean ± std over folds)."""
    bench = pd.read_csv(RECORDED / "benchmark.csv")
    shown = plot_cross_scale(bench, tmp_path / "cross.png")
    assert (tmp_path / "cross.png").stat().st_size > 10_000
    cell = shown[(shown["model"] == "pixnet") & (shown["scale_um"] == 100)].iloc[0]
    assert cell["mean"] == pytest.approx(0.6430, abs=5e-5)
    assert cell["std"] == pytest.approx(0.0360, abs=5e-5)
    cell = shown[(shown["model"] == "istar") & (shown["scale_um"] == 2)].iloc[0]
    assert cell["mean"] == pytest.approx(0.0426, abs=5e-5)
    assert set(shown["model"]) == {"istar", "mean", "pixnet"}
    with pytest.raises(ValueError, match="no cross_scale"):
        plot_cross_scale(bench[bench["task"] == "spot"], tmp_path / "none.png")


def _spots(n=12, mpp=0.5):
    rng = np.random.default_rng(0)
    xy = rng.uniform(100, 900, size=(n, 2))
    spots = ad.AnnData(X=rng.gamma(2.0, 1.0, size=(n, 2)).astype(np.float32),
                       obs=pd.DataFrame({"diameter_um": 55.0}, index=[f"s{i}" for i in range(n)]),
                       var=pd.DataFrame(index=["GA", "GB"]))
    spots.obsm["spatial"] = xy
    spots.uns["histomap"] = {"mpp": mpp}
    return spots


def test_dense_maps_and_measured_spots_share_one_colour_scale(tmp_path):
    spots = _spots()
    rng = np.random.default_rng(1)
    maps = {"GA": rng.gamma(2.0, 1.0, size=(50, 50)) + 5.0, "GB": rng.gamma(2.0, 1.0, (50, 50))}
    mask = np.ones((50, 50), np.uint8)
    mask[:, :5] = 0
    thumb = np.full((100, 100, 3), 230, np.uint8)
    limits = plot_dense_maps(maps, (0, 0, 1000, 1000), mask, spots, thumb, 10.0,
                             tmp_path / "dense.png", gene_pcc={"GA": 0.5})
    assert (tmp_path / "dense.png").stat().st_size > 10_000
    for gene in ("GA", "GB"):
        map_clim, spot_clim = limits[gene]
        assert map_clim == pytest.approx(spot_clim)
        values = spots[:, gene].X.ravel()
        expect = shared_colour_range(np.where(mask > 0, maps[gene], np.nan), values)
        assert map_clim == pytest.approx(expect)
    # GA's map is offset by +5: its scale spans both the map and the (lower) spots
    assert limits["GA"][0][0] < 5.0 < limits["GA"][0][1]


def test_training_curves_and_sr_panels_draw(tmp_path):
    logs = {"pixnet/P1": pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [3, 2, 1.5],
                                       "val_loss": [3.1, 2.4, 2.0]}),
            "pixnet/P2": pd.DataFrame({"epoch": [0, 1], "train_loss": [3, 2],
                                       "val_loss": [np.nan, np.nan]}),
            "SR bicubic x5/P1": pd.DataFrame()}
    plot_training_curves(logs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    rng = np.random.default_rng(0)
    panel = {"he": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
             "lr": rng.random((4, 4)), "hr": rng.random((16, 16)), "pred": rng.random((16, 16)),
             "mask": np.ones((16, 16), bool), "label": "patch 0, GA"}
    plot_sr_panels([{**panel, "std": rng.random((16, 16))}, {**panel, "std": None}],
                   tmp_path / "sr.png")
    assert (tmp_path / "sr.png").stat().st_size > 10_000


def test_sr_panels_pick_tissue_rich_patches(tmp_path):
    """Panels come from real pairs and maps: the patch with the most tissue first, the truth and
    prediction arrays are the stored ones."""
    from histomap.data.srmaps import read_sr_maps
    from histomap.data.srpairs import build_sr_pairs, read_sr_pairs
    from histomap.data.synthetic import simulate_sample
    from histomap.evaluation.figures import sr_panels
    from histomap.tasks import superres as sr_task

    simulate_sample(tmp_path / "syn", seed=2, size_um=(400.0, 400.0), n_genes=40)
    cells = ad.read_h5ad(tmp_path / "syn" / "cells.h5ad")
    genes = list(cells.var_names[:3])
    pairs = tmp_path / "pairs.zarr"
    build_sr_pairs(cells, tmp_path / "syn" / "he.tif", genes, pairs, patch_um=160, lr_um=20,
                   scale=4, stride_um=80, min_tissue=0.2, image_mpp=5.0, edge="ceil")
    sr_task.train_sr("bicubic", [pairs], model_cfg={}, train_cfg={"epochs": 1, "device": "cpu"},
                     validation={"fraction": 0.2, "block_um": 80}, seed=0,
                     out_model=tmp_path / "m.pt", out_log=tmp_path / "l.csv",
                     checkpoint_dir=tmp_path / "ckpt")
    sr_task.predict_sr(tmp_path / "m.pt", pairs, tmp_path / "maps.zarr", tmp_path / "b.h5ad",
                       device="cpu")
    panels = sr_panels(pairs, tmp_path / "maps.zarr", n_patches=2, n_genes=2)
    assert len(panels) == 4
    arrays, _ = read_sr_pairs(pairs)
    maps, _ = read_sr_maps(tmp_path / "maps.zarr")
    best = int(np.argmax(arrays["mask"].reshape(len(arrays["mask"]), -1).mean(axis=1)))
    first = panels[0]
    assert first["label"].startswith(f"patch {best},")
    g = genes.index(first["label"].split(", ")[1])
    np.testing.assert_array_equal(first["hr"], arrays["hr"][best, g])
    np.testing.assert_array_equal(first["pred"], maps["pred"][best, g])
    assert first["std"] is None and first["he"].dtype == np.uint8
    plot_sr_panels(panels, tmp_path / "sr.png")


def test_workflow_is_snakefmt_formatted():
    snakefmt = Path(sys.executable).with_name("snakefmt")
    if not snakefmt.exists():
        pytest.skip("snakefmt is not installed in this environment (requirements.txt pins it)")
    res = subprocess.run([str(snakefmt), "--check", "Snakefile", "workflow"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:] + "\nrun `make format`"


def test_license_is_apache():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_progress_logs_counts_rate_and_time_left_every_few_seconds(caplog):
    """Long steps say how far they are in their log: a line at most every `every_s` seconds of
    the step's clock (not every item), with count, rate and time left, and a final line."""
    import logging

    from histomap.logs import Progress

    now = [0.0]
    with caplog.at_level(logging.INFO, "histomap.progress"):
        with Progress(100, "dense map", "tiles", every_s=5.0, clock=lambda: now[0]) as bar:
            for _ in range(100):
                now[0] += 0.25  # 4 tiles/s: 25 s in all -> 5 periodic lines
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 + 1, lines
    assert lines[0] == "dense map: 20/100 tiles (20%), 4 tiles/s, 5 s, ~20 s left"
    assert lines[-1].startswith("dense map: 100/100 tiles (100%)") and lines[-1].endswith("(done)")


# --------------------------------------------------------------------------- maps on tissue
SLIDE_PX, SLIDE_MPP = 1024, 1.0
TISSUE_CENTRE, TISSUE_RADII = (512.0, 400.0), (300.0, 250.0)  # ellipse (y, x), level-0 px


def _ellipse_radius(y, x):
    """The ellipse's normalised radius at level-0 (y, x): <= 1 on the tissue."""
    return np.sqrt(((y - TISSUE_CENTRE[0]) / TISSUE_RADII[0]) ** 2
                   + ((x - TISSUE_CENTRE[1]) / TISSUE_RADII[1]) ** 2)


@pytest.fixture(scope="module")
def map_on_glass(tmp_path_factory):
    """A slide with an H&E-coloured ellipse of tissue on glass, and a dense map predicted over the
    whole slide (so the map's own mask covers the glass too) whose values are non-zero
    everywhere."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage
    from torch import nn

    from histomap.data.slide import write_pyramid
    from histomap.tasks.dense_map import predict_dense_map

    class ColourPlusOne(nn.Module):
        out_stride = 4

        def forward(self, images):
            pooled = F.avg_pool2d(images, 4).mean(dim=1, keepdim=True) + 1.0
            return torch.cat([pooled, 2.0 * pooled], dim=1)

    root = tmp_path_factory.mktemp("glass")
    rng = np.random.default_rng(0)
    img = rng.integers(240, 249, size=(SLIDE_PX, SLIDE_PX, 3), dtype=np.uint8)
    coarse = ndimage.gaussian_filter(rng.standard_normal((SLIDE_PX // 4,) * 2), 2)
    texture = ndimage.zoom(coarse / coarse.std(), 4, order=1)
    yy, xx = np.mgrid[:SLIDE_PX, :SLIDE_PX] + 0.5
    tissue = _ellipse_radius(yy, xx) <= 1
    blob = np.array([175, 95, 165], np.float32) + 40 * texture[tissue][:, None] * np.array(
        [1.0, 0.6, 0.5], np.float32)
    img[tissue] = np.clip(blob, 0, 255).astype(np.uint8)
    slide = write_pyramid(img, root / "slide.tif", SLIDE_MPP)
    dmap = predict_dense_map(ColourPlusOne(), slide, (0, 0, SLIDE_PX, SLIDE_PX), input_mpp=4.0,
                             tile_px=64, overlap_px=16, out_zarr=root / "dense.zarr",
                             device="cpu", genes=["GA", "GB"])
    assert (np.asarray(dmap.mask[...]) > 0).all() and (dmap.read() > 0.5).all()
    return root, slide, dmap


def _map_centres_radius(dmap, shape, step=1):
    s0 = dmap.mpp / dmap.slide_mpp
    iy, ix = np.mgrid[:shape[0], :shape[1]] * step + 0.5
    return _ellipse_radius(dmap.origin_px[1] + iy * s0, dmap.origin_px[0] + ix * s0)


def test_dense_map_figure_draws_the_map_on_tissue_only(map_on_glass, tmp_path, monkeypatch):
    """The report's dense-map figure (the rule's script, run as Snakemake runs it) draws the map
    where the slide has tissue, unchanged, and nothing over the glass the tissue tiles hold."""
    import runpy
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    root, slide, dmap = map_on_glass
    spots = _spots(n=8, mpp=SLIDE_MPP)
    spots.obsm["spatial"] = np.column_stack([np.linspace(300, 500, 8), np.full(8, 512.0)])
    spots.write_h5ad(tmp_path / "truth.h5ad")
    pd.DataFrame({"sample": "S1", "metric": "pcc", "gene": ["GA", "GB"], "value": [0.4, 0.2]}
                 ).to_parquet(tmp_path / "metrics.parquet")
    drawn = []
    imshow = Axes.imshow

    def record(self, X, *args, **kwargs):
        if kwargs.get("cmap") == "viridis":  # the map panels (the H&E has no colour map)
            drawn.append(np.ma.filled(np.ma.asarray(X, float), np.nan))
        return imshow(self, X, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", record)
    sm = SimpleNamespace(
        input=SimpleNamespace(dense=str(root / "dense.zarr"), truth=str(tmp_path / "truth.h5ad"),
                              slide=str(slide), metrics=str(tmp_path / "metrics.parquet")),
        output=[str(tmp_path / "dense.png")], params=SimpleNamespace(n_genes=2, mask_mpp=16.0),
        wildcards=SimpleNamespace(sample="S1", model="pixnet", fold="F1"),
        log=[str(tmp_path / "figure.log")], threads=1)
    runpy.run_path(str(REPO / "workflow" / "scripts" / "dense_map_figure.py"),
                   init_globals={"snakemake": sm})
    assert (tmp_path / "dense.png").stat().st_size > 10_000
    assert len(drawn) == 2
    level0 = dmap.read()
    radius = _map_centres_radius(dmap, level0.shape[1:])
    inside, outside = radius < 0.85, radius > 1.15
    assert inside.sum() > 100 and outside.sum() > 100
    for shown, values in zip(drawn, level0):  # GA, GB: the order of their PCC
        assert shown.shape == values.shape
        np.testing.assert_array_equal(shown[inside], values[inside])  # unchanged on tissue
        assert np.isnan(shown[outside]).all(), \
            f"{np.isfinite(shown[outside]).sum()} map pixels drawn on glass"


def test_map_on_tissue_is_one_mask_at_every_stride(map_on_glass):
    """The one mask every dense-map figure uses (the report's, the applied slides'): the map's
    mask and the slide's tissue, at any stride (pyramid level)."""
    from histomap.tasks.apply import map_on_tissue

    _, slide, dmap = map_on_glass
    full = map_on_tissue(dmap, slide)
    assert full.shape == tuple(dmap.mask.shape) and full.dtype == bool
    radius = _map_centres_radius(dmap, full.shape)
    assert full[radius < 0.85].all() and not full[radius > 1.15].any()
    np.testing.assert_array_equal(map_on_tissue(dmap, slide, step=2), full[::2, ::2])
