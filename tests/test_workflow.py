"""Workflow-level tests: schema validation, lint, bad input leaves no partial output, and an
end-to-end run of the demo configuration (small settings) through every rule."""
from __future__ import annotations

import hashlib
import json
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


@pytest.mark.slow
def test_schema_rejects_unknown_key(workdir):
    cfg = write_config(workdir, tiling={"tile_pxx": 3})
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "tile_pxx" in res.stderr + res.stdout


@pytest.mark.slow
def test_schema_rejects_bad_value(workdir):
    cfg = write_config(workdir, folds={"strategy": "random"})
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "random" in res.stderr + res.stdout


@pytest.mark.slow
def test_sr_method_diffusion_overrides_are_validated(workdir):
    """A method's own `diffusion:` block (e.g. the paper's eps-prediction beside an x0 default)
    is accepted; a bad value in it is rejected by the schema before anything runs."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    sr = config["superres"]
    sr["diffusion"]["prediction"] = "x0"
    sr["ablations"] = ["diffst_eps"]
    sr["models"]["diffst_eps"] = {"base": "diffst", "diffusion": {"prediction": "eps"}}
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


@pytest.mark.slow
def test_sample_sheet_unknown_platform(workdir):
    sheet = workdir / "bad.tsv"
    sheet.write_text("sample\tpatient\tplatform\tpath\nS1\tP\tnanostring\tx\nS2\tQ\tsynthetic\t\n")
    cfg = write_config(workdir, samples=str(sheet))
    res = run_snakemake(workdir, "-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert "nanostring" in res.stderr + res.stdout


@pytest.mark.slow
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


def test_keep_dense_maps_false_makes_benchmark_dense_maps_temporary(workdir):
    """`predict.keep_dense_maps: false`: Snakemake deletes a benchmark run's dense map once its
    consumers are done (--delete-temp-output lists it), and the SpatialData does not ask for
    it; by default it is kept."""
    from histomap.plan import validate_config

    dense = workdir / "results/predictions/pixnet/P1/seed0/synA/dense.zarr"
    dense.mkdir(parents=True)
    (dense / "zarr.json").write_text("{}")
    listed = {}
    for keep in (True, False):
        cfg = write_config(workdir, predict={"keep_dense_maps": keep})
        res = run_snakemake(workdir, "--delete-temp-output", "--dry-run", "--configfile",
                            str(cfg), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        listed[keep] = "Would delete results/predictions/pixnet/P1/seed0/synA/dense.zarr" in (
            res.stdout + res.stderr)
        plan = validate_config(yaml.safe_load(cfg.read_text()), workdir)
        assert bool(plan.files.sample_dense_maps("synA")) is keep
    assert listed == {True: False, False: True}
    assert dense.is_dir()  # a dry run deletes nothing


@pytest.mark.slow
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


SPOT_METRIC_RANGE = {"PCC@F": (-1, 1), "PCC@S": (-1, 1), "PCC@M": (-1, 1), "MSE": (0, np.inf),
                     "MAE": (0, np.inf), "n_genes_scored": (0, np.inf),
                     "n_constant_truth": (0, np.inf), "n_spots_scored": (1, np.inf),
                     "n_genes": (1, np.inf)}
SR_METRIC_RANGE = {"PCC": (-1, 1), "RMSE": (0, np.inf), "Spearman_std_error": (-1, 1),
                   "mass_ratio": (0, np.inf),
                   "edge_error_ratio": (0, 1.1)}  # the patch-border band's bound: no seams
TRIVIAL_SR = "bicubic"  # the upsampled LR map: nothing learned


def range_failures(table: pd.DataFrame, ranges: dict, what: str) -> list[str]:
    """Rows of a long table whose value is not finite or outside its metric's range."""
    failures = []
    unknown = sorted(set(table["metric"]) - set(ranges))
    if unknown:
        failures.append(f"{what}: metrics without a known range {unknown}")
    for metric, (lo, hi) in ranges.items():
        rows = table[table["metric"] == metric]
        bad = rows[~(np.isfinite(rows["value"]) & (rows["value"] >= lo) & (rows["value"] <= hi))]
        if len(bad):
            failures.append(f"{what}: {len(bad)} {metric} values not finite or outside "
                            f"[{lo}, {hi}]:\n{bad.head(12).to_string()}")
    return failures


def spot_value_failures(spot: pd.DataFrame, learned: list[str], trivial: str = "mean"
                        ) -> tuple[list[str], pd.DataFrame]:
    """Each learned model against the trivial one on the table's headline numbers (per-slide
    averaged, mean over folds): MSE below the trivial model's, PCC@M above 0."""
    head = spot[spot["sample"] == "mean_over_slides"]
    table = head.groupby(["model", "metric"])["value"].mean().unstack("metric")
    failures = []
    for model in learned:
        mse, pcc = table.loc[model, "MSE"], table.loc[model, "PCC@M"]
        if not mse < table.loc[trivial, "MSE"]:
            failures.append(f"spot: {model} MSE {mse:.4f} is not below {trivial}'s "
                            f"{table.loc[trivial, 'MSE']:.4f}")
        if not pcc > 0:
            failures.append(f"spot: {model} PCC@M {pcc:.4f} is not above 0")
    return failures, table


def sr_value_failures(sr: pd.DataFrame, scale: int, reference: str = "diffst"
                      ) -> list[str]:
    """Every learned SR method's PCC above 0 in every unit; the reference (Diff-ST) at least
    bicubic's in the benchmark's units (the counts view, predictions turned into counts with
    LR-patch statistics, is for inspection and is not where the methods are ranked)."""
    from histomap.evaluation.srreport import SR_COUNTS_UNITS

    failures = []
    pcc = sr[(sr["metric"] == "PCC") & (sr["scale"] == scale)]
    if "units" not in pcc.columns:
        pcc = pcc.assign(units="-")
    # one comparison per units x fold kind x with / without the mass projection
    keys = ["units", *(k for k in ("fold_kind", "mass_projection") if k in pcc.columns)]
    for key, part in pcc.groupby(keys):
        units, where = key[0], ", ".join(map(str, key))
        by_method = part.set_index("method")["value"]
        for method, value in by_method.items():
            if method != TRIVIAL_SR and not value > 0:
                failures.append(f"SR {scale}x ({where}): {method} PCC {value:.4f} is not above 0")
        if units != SR_COUNTS_UNITS and not by_method[reference] >= by_method[TRIVIAL_SR]:
            failures.append(f"SR {scale}x ({where}): {reference} PCC {by_method[reference]:.4f} "
                            f"is below {TRIVIAL_SR}'s {by_method[TRIVIAL_SR]:.4f}")
    return failures


def test_value_checks_catch_broken_results():
    """The end-to-end value checks fail on broken tables: a learned model no better than the
    mean baseline, a PCC with its sign flipped, an out-of-range value, Diff-ST below bicubic."""
    rows = [("mean", "MSE", 2.0), ("mean", "PCC@M", 0.0), ("stnet", "MSE", 1.5),
            ("stnet", "PCC@M", 0.3), ("pixnet", "MSE", 1.8), ("pixnet", "PCC@M", 0.2)]
    spot = pd.DataFrame([{"model": m, "fold": f, "sample": "mean_over_slides", "metric": k,
                          "value": v} for f in ("P1", "P2") for m, k, v in rows])
    assert spot_value_failures(spot, ["stnet", "pixnet"])[0] == []
    assert range_failures(spot, SPOT_METRIC_RANGE, "t") == []
    flipped = spot.copy()
    flipped.loc[(flipped["model"] == "pixnet") & (flipped["metric"] == "PCC@M"), "value"] *= -1
    assert spot_value_failures(flipped, ["stnet", "pixnet"])[0] == [
        "spot: pixnet PCC@M -0.2000 is not above 0"]
    worse = spot.copy()
    worse.loc[(worse["model"] == "stnet") & (worse["metric"] == "MSE"), "value"] = 2.5
    assert "stnet MSE 2.5000 is not below mean's 2.0000" in spot_value_failures(
        worse, ["stnet", "pixnet"])[0][0]
    bad = spot.copy()
    bad.loc[0, "value"], bad.loc[1, "value"] = -0.1, np.nan  # an MSE < 0, a NaN PCC@M
    failures = range_failures(bad, SPOT_METRIC_RANGE, "t")
    assert len(failures) == 2 and "1 MSE values" in failures[1] and "1 PCC@M" in failures[0]
    sr = pd.DataFrame({"method": ["bicubic", "unet", "diffst"] * 2,
                       "metric": ["PCC"] * 3 + ["RMSE"] * 3, "scale": 5,
                       "units": "normalised", "value": [0.45, 0.40, 0.46, 0.3, 0.3, 0.3]})
    assert sr_value_failures(sr, 5) == [] and range_failures(sr, SR_METRIC_RANGE, "t") == []
    sr.loc[2, "value"] = -0.003
    assert sr_value_failures(sr, 5) == [
        "SR 5x (normalised): diffst PCC -0.0030 is not above 0",
        "SR 5x (normalised): diffst PCC -0.0030 is below bicubic's 0.4500"]


@pytest.mark.slow
def test_demo_end_to_end(workdir):
    """The demo configuration, shrunk: every rule runs for every model, the benchmark table is
    complete and its values are in range, every learned model beats the trivial baselines
    (`mean` for spots, bicubic for SR), PixNet's dense map and extra scales and the cross-scale
    scores exist."""
    import anndata as ad

    learned = ["stnet", "histogene", "istar", "pixnet"]
    models = ["mean", *learned]
    folds = ["P1", "P2", "P3"]
    cfg = write_config(
        workdir,
        synthetic={"size_um": [700, 700], "n_genes": 40},
        genes={"name": "top20", "n_genes": 20},
        models=models,
        # the demo's pretrained encoders (frozen and cached for istar and pixnet, so their
        # epochs are cheap); smaller crops, windows and networks than the demo
        stnet={"crop_um": 64},
        histogene={"dim": 32, "depth": 1, "heads": 2, "train": {"epochs": 3}},
        istar={"window_px": 128, "hidden": [32]},
        pixnet={"window_px": 128, "decoder_channels": [8, 16, 32, 64, 64],
                "predict_spot_diameters_um": [8]},
        cross_scale={"models": ["mean", "istar", "pixnet"], "diameters_um": [55, 8]},
        train={"epochs": 3, "batch_size": 16, "patience": 3},  # istar, pixnet: the demo's 20
        tiling={"tile_px": 128},
        report={"figure_genes": 2},
    )
    # generous: the run takes minutes on 2 free cores, much longer on a shared machine
    res = run_snakemake(workdir, "--cores", "2", "--configfile", str(cfg), timeout=5400)
    assert res.returncode == 0, res.stderr[-5000:]
    bench = pd.read_csv(workdir / "results" / "report" / "benchmark.csv")
    assert {"task", "dataset", "model", "fold", "seed", "scale_um", "gene_set", "metric",
            "value"} <= set(bench.columns)
    spot = bench[bench["task"] == "spot"]
    pairs = set(spot[["model", "fold"]].itertuples(index=False, name=None))
    assert pairs == {(m, f) for m in models for f in folds}
    for (model, fold), part in spot.groupby(["model", "fold"]):
        assert {"PCC@F", "PCC@S", "PCC@M", "MSE", "MAE"} <= set(part["metric"]), (model, fold)
        assert set(part["sample"]) >= {"pooled", "mean_over_slides"}, (model, fold)
    assert (spot["scale_um"] == 55).all()
    scales = bench[bench["task"] == "cross_scale"]
    triples = set(scales[["model", "fold", "scale_um"]].itertuples(index=False, name=None))
    assert triples == {(m, f, um) for m in ["mean", "istar", "pixnet"] for f in folds
                       for um in (55.0, 8.0)}
    md = (workdir / "results" / "report" / "benchmark.md").read_text()
    assert all(m in md for m in models) and "Cross-scale" in md and "trivial baseline" in md
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

    # values: every failing check is collected, so one (slow) run reports all of them
    sr = pd.read_csv(workdir / "results" / "report" / "superres.csv")
    sr_cfg = yaml.safe_load(cfg.read_text())["superres"]
    sr_scale = int(sr_cfg["scales"]["synthetic"][0])
    assert set(sr["method"]) == set(sr_cfg["methods"])
    assert (sr["n_folds"] == len(folds)).all(), sr[["method", "metric", "n_folds"]]
    failures = range_failures(bench, SPOT_METRIC_RANGE, "benchmark.csv")
    failures += range_failures(sr, SR_METRIC_RANGE, "superres.csv")
    spot_failures, headline = spot_value_failures(spot, learned)
    failures += spot_failures
    failures += sr_value_failures(sr, sr_scale, reference=sr_cfg["reference"])
    print("spot headline (mean over folds of per-slide averages):\n" + headline.to_string())
    print("superres.csv:\n" + sr.to_string())
    assert not failures, "\n".join(failures)
    _check_ecosystem_outputs(workdir, models)
    # the run manifest: every output with its hash; `histomap verify` agrees with the folder
    manifest = json.loads((workdir / "results" / "manifest.json").read_text())
    entry = manifest["outputs"]["report/benchmark.csv"]
    assert entry["sha256"] == hashlib.sha256(
        (workdir / "results" / "report" / "benchmark.csv").read_bytes()).hexdigest()
    assert manifest["config"]["models"] == models and manifest["code"]["source_sha256"]
    verify = subprocess.run([sys.executable, "-m", "histomap.cli", "verify", "results"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
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

    import ome_zarr.writer  # noqa: F401 (its import warns of a deprecated default argument:
    import spatialdata as sd  # imported here so that only warnings of reading the file count)
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
