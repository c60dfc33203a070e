"""Workflow-level tests: schema validation, lint, bad input leaves no partial output, and an
end-to-end run of the demo configuration (small settings) through every rule."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def run_snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def write_config(workdir: Path, **overrides) -> Path:
    """The demo config with absolute sample-sheet paths and the given top-level overrides."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = workdir / "test_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # Snakefile's `configfile: config/config.yaml` is read relative to the working directory
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path


def test_schema_rejects_unknown_key(workdir):
    cfg = write_config(workdir, tiling={"tile_pxx": 3})
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "tile_pxx" in res.stderr + res.stdout


def test_schema_rejects_bad_value(workdir):
    cfg = write_config(workdir, folds={"strategy": "random"})
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "random" in res.stderr + res.stdout


def test_sr_method_diffusion_overrides_are_validated(workdir):
    """A method's own `diffusion:` block (e.g. the paper's eps-prediction beside an x0 default)
    is accepted; a bad value in it is rejected by the schema before anything runs."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    sr = config["superres"]
    sr["diffusion"]["prediction"] = "x0"
    sr["ablations"] = ["diffst_eps"]
    sr["models"]["diffst_eps"] = {"based_on": "diffst", "diffusion": {"prediction": "eps"}}
    cfg = workdir / "sr_config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg), "--", "results/report/superres.md")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "results/sr/models/diffst_eps/x5/P1/model.pt" in res.stdout + res.stderr
    sr["models"]["diffst_eps"]["diffusion"]["prediction"] = "v_pred"
    cfg.write_text(yaml.safe_dump(config))
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg), "--", "results/report/superres.md")
    assert res.returncode != 0
    assert "v_pred" in res.stderr + res.stdout


def test_sample_sheet_unknown_platform(workdir):
    sheet = workdir / "bad.tsv"
    sheet.write_text("sample\tpatient\tplatform\tpath\nS1\tP\tnanostring\tx\nS2\tQ\tsynthetic\t\n")
    cfg = write_config(workdir, samples=str(sheet))
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "nanostring" in res.stderr + res.stdout


def test_lint_is_clean():
    res = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr


def _legacy_section(folder: Path, counts_text: str) -> None:
    from PIL import Image
    folder.mkdir(parents=True)
    tint = 10 * (sum(map(ord, folder.name)) % 5)  # one image per section (copies are refused)
    Image.new("RGB", (400, 400), (230, 150 + tint, 200)).save(folder / "he.jpg")
    (folder / "S1.tsv").write_text(counts_text)
    rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for i, (x, y) in enumerate([(1, 1), (2, 1), (1, 2), (2, 2)]):
        rows.append(f"{x}\t{y}\t{x}\t{y}\t{100 * x}\t{100 * y}\t1")
    (folder / "S1_selection.tsv").write_text("\n".join(rows) + "\n")


def test_bad_counts_fail_cleanly_without_partial_output(workdir):
    """Negative counts: the ingest job fails naming the file, and leaves no output behind."""
    counts = "\tGA\tGB\n1x1\t5\t3\n2x1\t-2\t1\n1x2\t4\t4\n2x2\t1\t1\n"
    _legacy_section(workdir / "data" / "S1", counts)
    _legacy_section(workdir / "data" / "S2", counts.replace("-2", "2"))
    (workdir / "data" / "S2" / "S1.tsv").rename(workdir / "data" / "S2" / "S2.tsv")
    (workdir / "data" / "S2" / "S1_selection.tsv").rename(
        workdir / "data" / "S2" / "S2_selection.tsv")
    sheet = workdir / "sheet.tsv"
    pd.DataFrame({"sample": ["S1", "S2"], "patient": ["A", "B"], "platform": "legacy_st",
                  "path": ["S1", "S2"], "mpp": "2.0"}).to_csv(sheet, sep="\t", index=False)
    cfg = write_config(workdir, samples=str(sheet), data_dir=str(workdir / "data"))
    res = run_snakemake(workdir, "results/ingest/S1/spots.h5ad", "--cores", "1",
                        "--configfile", str(cfg), timeout=300)
    assert res.returncode != 0
    log = (workdir / "logs" / "ingest_sample" / "S1.log").read_text()
    assert "S1.tsv" in log and "negative" in log.lower()
    assert not (workdir / "results" / "ingest" / "S1" / "spots.h5ad").exists()
    assert not (workdir / "results" / "ingest" / "S1" / "slide.tif").exists()


@pytest.mark.slow
def test_demo_end_to_end(workdir):
    """The demo configuration, shrunk: every rule runs for every model, the benchmark table is
    complete, PixNet's dense map and extra scales and the cross-scale scores exist."""
    import anndata as ad

    models = ["stnet", "histogene", "istar", "pixnet"]
    cfg = write_config(
        workdir,
        synthetic={"size_um": [700, 700], "n_genes": 40},
        genes={"name": "top20", "n_genes": 20},
        models=models,
        stnet={"backbone": "resnet10t", "crop_um": 64},
        histogene={"dim": 32, "depth": 1, "heads": 2, "train": {"epochs": 2}},
        istar={"window_px": 128, "hidden": [32], "train": {"epochs": 1}},
        pixnet={"window_px": 128, "decoder_channels": [8, 16, 32, 64, 64],
                "predict_spot_diameters_um": [8], "train": {"epochs": 1}},
        cross_scale={"diameters_um": [55, 8]},
        train={"epochs": 2, "batch_size": 16, "patience": 2},
        tiling={"tile_px": 128},
        report={"figure_genes": 2},
    )
    res = run_snakemake(workdir, "--cores", "2", "--configfile", str(cfg))
    assert res.returncode == 0, res.stderr[-5000:]
    bench = pd.read_csv(workdir / "results" / "report" / "benchmark.csv")
    assert {"task", "dataset", "model", "fold", "seed", "scale_um", "gene_set", "metric",
            "value"} <= set(bench.columns)
    spot = bench[bench["task"] == "spot"]
    assert set(spot["fold"]) == {"P1", "P2", "P3"}
    assert set(spot["model"]) == set(models)
    assert {"PCC@F", "PCC@S", "PCC@M", "MSE", "MAE"} <= set(spot["metric"])
    assert (spot["scale_um"] == 55).all()
    scales = bench[bench["task"] == "cross_scale"]
    assert set(scales["model"]) == {"istar", "pixnet"}
    assert set(scales["scale_um"]) == {55.0, 8.0}
    md = (workdir / "results" / "report" / "benchmark.md").read_text()
    assert all(m in md for m in models) and "Cross-scale" in md
    truth = ad.read_h5ad(workdir / "results/st/synA.h5ad")
    for model in models:
        for fold, sample in [("P1", "synA"), ("P2", "synB"), ("P3", "synC")]:
            png = workdir / "results" / "report" / "figures" / model / f"{fold}_{sample}.png"
            assert png.stat().st_size > 10_000
        pred = ad.read_h5ad(workdir / f"results/predictions/{model}/P1/seed0/synA/spots_55um.h5ad")
        assert list(pred.obs_names) == list(truth.obs_names)
        assert pred.n_vars == 20 and np.isfinite(pred.X).all()
    run = workdir / "results/predictions/pixnet/P1/seed0/synA"
    assert (run / "dense.zarr").is_dir()
    small = ad.read_h5ad(run / "spots_8um.h5ad")
    assert list(small.obs_names) == list(truth.obs_names)
    assert small.uns["histomap"]["spot_diameter_um"] == 8
    assert (workdir / "results" / "tiles" / "synA.parquet").exists()
    assert (workdir / "results" / "ingest" / "synA" / "sample.zarr").is_dir()
    _check_ecosystem_outputs(workdir, models)
    # the report: run description, the tables as HTML, dense maps, SR panels, curves, cross-scale
    report = workdir / "results" / "report" / "report.html"
    res = run_snakemake(workdir, "--configfile", str(cfg), "--report", str(report), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = report.read_text()
    for name in ("synthetic_demo", "benchmark.html", "Dense maps", "training_curves.png",
                 "cross_scale.png", "Super-resolution"):
        assert name in text, name
    # a second run has nothing to do
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert "Nothing to be done" in res.stdout + res.stderr


def _normalised_sample(workdir: Path, name: str, high_gene: str | None) -> None:
    """results/st/{name}.h5ad: log-normalised spots; ``high_gene`` is expressed far above the
    rest in this sample only."""
    import anndata as ad

    genes = [f"G{i}" for i in range(6)] + ["HIGH"]
    rng = np.random.default_rng(len(name))
    x = rng.uniform(0.5, 1.5, (20, len(genes))) * np.arange(len(genes), 0, -1)
    x[:, genes.index("HIGH")] = 50.0 if high_gene == "HIGH" else 0.01
    adata = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(20)]),
                       var=pd.DataFrame(index=genes))
    adata.uns["histomap"] = {"normalisation": {"target_sum": 1e4, "log1p": True}}
    path = workdir / "results" / "st" / f"{name}.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


@pytest.mark.slow
def test_gene_panel_comes_from_the_folds_training_samples(workdir):
    """A gene uniquely high in one test section enters the panels of the folds that train on
    that section, never the panel of the fold that holds it out (the old rule ranked genes over
    every sample of the run, test sections included)."""
    cfg = write_config(workdir, genes={"name": "top3", "method": "top_mean", "n_genes": 3})
    for name in ("synA", "synB", "synC"):
        _normalised_sample(workdir, name, "HIGH" if name == "synA" else None)
    targets = [f"results/genes/top3/{fold}.tsv" for fold in ("P1", "P2", "P3")]
    res = run_snakemake(workdir, *targets, "--cores", "1", "--configfile", str(cfg),
                        "--allowed-rules", "select_genes", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    panels = {fold: list(pd.read_csv(workdir / "results" / "genes" / "top3" / f"{fold}.tsv",
                                     sep="\t")["gene"]) for fold in ("P1", "P2", "P3")}
    assert "HIGH" not in panels["P1"], "synA is P1's test section"
    assert panels["P2"][0] == "HIGH" and panels["P3"][0] == "HIGH"
    assert panels["P1"] == ["G0", "G1", "G2"]


def _check_ecosystem_outputs(workdir: Path, models: list[str]) -> None:
    """SpatialData per sample, valid OME-Zarr dense maps, report figures and HTML tables."""
    import warnings

    import spatialdata as sd
    import zarr
    from ome_zarr_models.v05 import Image

    results = workdir / "results"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = sd.read_zarr(results / "spatialdata" / "synA.zarr")
    assert not caught, [str(w.message) for w in caught]
    assert {"he", "dense_pixnet_P1_seed0", "dense_istar_P1_seed0"} <= set(sdata.images)
    assert {f"pred_{m}_P1_seed0" for m in models} <= set(sdata.tables)
    assert set(sdata.coordinate_systems) == {"global", "pixels"}
    Image.from_zarr(zarr.open_group(results / "predictions/pixnet/P1/seed0/synA/dense.zarr",
                                    mode="r"))
    report = results / "report"
    assert "<table>" in (report / "benchmark.html").read_text()
    assert "<table>" in (report / "superres.html").read_text()
    for png in ("figures/dense/pixnet/P1_synA.png", "figures/dense/istar/P3_synC.png",
                "figures/training_curves.png", "figures/cross_scale.png",
                "figures/superres/diffst_x5.png"):
        assert (report / png).stat().st_size > 10_000, png
    log = (workdir / "logs" / "predict" / "pixnet" / "P1" / "seed0" / "synA_dense.log").read_text()
    assert "tiles (100%)" in log  # progress lines in the log, not only at the end
