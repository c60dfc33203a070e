"""Workflow-level checks of train_final / apply and of configs with any number of samples
(dry runs: the job graph each config asks for, and the fold check's advice)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow  # each test starts Snakemake (a dry run, ~10 s)

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def dry_run(workdir: Path, config: dict, *targets: str) -> tuple[int, str]:
    path = workdir / "test_config.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run([*SNAKEMAKE, *targets, "--directory", str(workdir), "-n",
                          "--configfile", str(path)], cwd=workdir, capture_output=True,
                         text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr


def jobs(output: str) -> dict[str, int]:
    """Job counts of a dry run's 'Job stats' table."""
    lines = output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path


def demo_config(**overrides) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(overrides)
    return config


def one_sample_sheet(workdir: Path) -> str:
    sheet = workdir / "one.tsv"
    pd.DataFrame({"sample": ["synA"], "patient": ["P1"], "platform": ["synthetic"],
                  "path": [""]}).to_csv(sheet, sep="\t", index=False)
    return str(sheet)


def test_apply_example_dry_run(workdir):
    """config/apply.yaml: one bundle trained on the three synthetic sections, applied to both
    H&E-only slides; no benchmark job."""
    config = demo_config(**yaml.safe_load((REPO / "config" / "apply.yaml").read_text()))
    code, out = dry_run(workdir, config)
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["train_final"] == 1 and counts["apply_dense"] == 2
    assert counts["apply_dense_tables"] == 2 and counts["apply_figure"] == 2
    assert counts["synthetic_he_slide"] == 2 and counts["normalise_st"] == 3
    assert counts["apply_spatialdata"] == 2
    assert not {"evaluate", "benchmark_tables", "train_pixnet"} & set(counts)
    for sample in ("heA", "heB"):
        assert f"results/spatialdata/apply/{sample}.zarr" in out
        for name in ("dense.zarr", "spots_55um.h5ad", "spots_16um.h5ad", "bins_16um.h5ad",
                     "map.png"):
            assert f"results/apply/pixnet/{sample}/{name}" in out


def test_one_sample_train_only(workdir):
    config = demo_config(samples=one_sample_sheet(workdir), benchmark=False, models=["pixnet"],
                         apply={"models": ["pixnet"]})
    code, out = dry_run(workdir, config)
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["train_final"] == 1 and "apply_dense" not in counts
    assert "results/bundles/pixnet/seed0/bundle.json" in out


def test_one_sample_benchmark_gives_advice(workdir):
    config = demo_config(samples=one_sample_sheet(workdir))
    code, out = dry_run(workdir, config)
    assert code != 0
    assert "at least two ST samples" in out and "benchmark: false" in out


def test_one_sample_apply_only_with_given_bundle(workdir):
    """A bundle made elsewhere (only its description is read at start-up), applied to the one
    ST sample of the sheet: nothing is trained."""
    bundle = workdir / "elsewhere" / "my_bundle"
    bundle.mkdir(parents=True)
    (bundle / "model.pt").write_bytes(b"weights")
    (bundle / "bundle.json").write_text(json.dumps({
        "format": "histomap.bundle/1", "name": "lab_pixnet", "architecture": "pixnet",
        "kind": "dense", "genes": ["G1"], "normalisation": {"target_sum": 1e4, "log1p": True},
        "input": {"mpp": 1.0}}))
    config = demo_config(samples=one_sample_sheet(workdir), benchmark=False,
                         apply={"bundle": str(bundle), "samples": ["synA"], "bin_um": [8]})
    code, out = dry_run(workdir, config)
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["apply_dense"] == 1 and "train_final" not in counts
    assert "select_genes" not in counts and "normalise_st" not in counts
    assert "results/apply/lab_pixnet/synA/bins_8um.h5ad" in out
    config["apply"]["bundle"] = str(workdir / "elsewhere")
    code, out = dry_run(workdir, config)
    assert code != 0 and "bundle.json" in out


def test_he_samples_stay_out_of_folds_and_panels(workdir):
    """The demo benchmark with an H&E-only slide in the sheet: folds and the gene panel use the
    ST samples only."""
    sheet = pd.read_csv(REPO / "config" / "samples.tsv", sep="\t", dtype=str).fillna("")
    extra = pd.DataFrame({"sample": ["heA"], "patient": ["H1"], "platform": ["he"],
                          "path": ["results/synthetic_he/heA.tif"]})
    path = workdir / "mixed.tsv"
    pd.concat([sheet, extra]).to_csv(path, sep="\t", index=False)
    config = demo_config(samples=str(path), models=["pixnet"], superres={"enabled": False},
                         cross_scale={"enabled": False})
    code, out = dry_run(workdir, config)
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["train_pixnet"] == 3 and counts["normalise_st"] == 3
    assert "results/st/heA.h5ad" not in out


def test_apply_target_skips_the_benchmark(workdir):
    """`snakemake apply` with a benchmark config: the bundle and its application only."""
    config = demo_config(**yaml.safe_load((REPO / "config" / "apply.yaml").read_text()))
    config["benchmark"] = True
    code, out = dry_run(workdir, config, "apply")
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["train_final"] == 1 and counts["apply_dense"] == 2
    assert not {"train_pixnet", "evaluate", "benchmark_tables"} & set(counts)
    code, out = dry_run(workdir, config)
    assert code == 0 and jobs(out)["train_pixnet"] == 3 and jobs(out)["apply_dense"] == 2


def test_apply_superres_dry_run(workdir):
    """apply.superres: an SR bundle trained on every ST sample (fold `final`, pairs of the
    `final` gene panel) and applied to a sample's measured spots; nothing of the SR benchmark."""
    config = demo_config(**yaml.safe_load((REPO / "config" / "apply.yaml").read_text()))
    config["apply"]["superres"] = {"methods": ["unet"], "factor": 5, "samples": ["synC"]}
    code, out = dry_run(workdir, config)
    assert code == 0, out[-3000:]
    counts = jobs(out)
    assert counts["build_sr_pairs"] == 3 and counts["train_sr_baseline"] == 1
    assert counts["apply_sr_inputs"] == 1 and counts["apply_sr"] == 1
    assert counts["apply_sr_figure"] == 1 and counts["train_final"] == 1
    assert not {"evaluate_sr", "sr_tables", "predict_sr_baseline"} & set(counts)
    for name in ("lr.zarr", "maps.zarr", "bins.h5ad", "map.png"):
        assert f"results/apply/superres/unet/x5/synC/{name}" in out
    assert "results/sr/models/unet/x5/final/model.pt" in out
    for sample in ("synA", "synB", "synC"):
        assert f"results/sr/pairs/final/{sample}_x5.zarr" in out
    config["apply"]["superres"] = {"methods": ["unet"], "factor": 3}
    code, out = dry_run(workdir, config)
    assert code != 0 and "apply.superres.factor 3" in out
    config["apply"]["superres"] = {"methods": ["unet"], "factor": 5, "samples": ["heA"]}
    code, out = dry_run(workdir, config)
    assert code != 0 and "H&E-only" in out
