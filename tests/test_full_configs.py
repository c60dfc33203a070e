"""Every GPU / full-size config the README and the config headers offer RUNS, end to end on the
CPU: Snakemake executes (not plans, that is tests/test_configs.py) each one to its tables,
through one shrink layer, ``tests/shrink.yaml``, layered last. The shrink changes sizes only
(epochs, seeds, threads, section and patch sizes, sampling steps): the same encoders, feature
cache mode, losses, samplers, networks and methods run, so a config that fails at run time (a
shape the paper-sized network cannot take, a key a rule ignores, an encoder without weights)
fails here instead of an hour into a GPU job.

Besides the shrink, each case keeps a few of its config's sections (``SECTIONS``): the first rows
of its sample sheet, and the folds that name them. HER2ST runs need the four sections at
``../shared/data/her2st`` (skipped with the reason when absent). The CPU-sized configs
(``her2st.yaml`` alone, the demo) are recorded benchmarks and run elsewhere.

Both run in CI (``.ci/run``: ``make test-full``). Measured on an otherwise idle 2-core machine:
the synthetic SR case 6 min (88 jobs), her2st + her2st_full 19 min (134 jobs on two sections cropped to 2.4 mm: encode_slide at
0.5 um/px, one epoch of every model at the paper's widths, dense maps at 0.5 um/px, seven SR
methods and ablations at 2x; about 16 GB of results, deleted when the test passes).
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHRINK = REPO / "tests" / "shrink.yaml"
HER2ST = REPO.parent / "shared" / "data" / "her2st"

CROP_STEPS = 12  # HER2ST sections are cropped to 12 x 12 spot-grid steps (2.4 mm; about half
                 # the spots, a seventh of the image): crop_her2st

# per config: the sections kept (sample sheet rows by name) and config overrides that name them
SECTIONS = {
    # leave_one_sample_out over two sections of two patients: folds B4 and C2, cross-patient;
    # data_dir is set to the cropped copies (crop_her2st)
    "her2st": {"keep": ["B4", "C2"], "config": {}},
    # one test section a fold (F1 tests synA, F2 synD), synB trains in both
    "synthetic_sr": {"keep": ["synA", "synB", "synD"],
                     "config": {"folds": {"explicit": {"F1": ["synA"], "F2": ["synD"]}}}},
}


def crop_her2st(section: str, out_dir: Path, steps: int = CROP_STEPS) -> Path:
    """A smaller copy of a HER2ST section in its own format (a size change only): the square of
    ``steps`` x ``steps`` spot-grid positions holding the most spots, those spots' counts and
    selection rows (pixel centres shifted), and the H&E cropped to them plus one grid step."""
    from PIL import Image

    src, dst = HER2ST / section, out_dir / section
    dst.mkdir(parents=True, exist_ok=True)
    sel = pd.read_csv(src / f"{section}_selection.tsv", sep="\t")
    windows = [sel.x.between(x0, x0 + steps - 1) & sel.y.between(y0, y0 + steps - 1)
               for x0 in range(sel.x.min(), sel.x.max() + 1)
               for y0 in range(sel.y.min(), sel.y.max() + 1)]
    sel = sel[max(windows, key=lambda inside: int(inside.sum()))]  # the first of the fullest
    step_px = float(sel.pixel_x.max() - sel.pixel_x.min()) / max(1, sel.x.max() - sel.x.min())
    image_path = next(src.glob("*.jpg"))
    Image.MAX_IMAGE_PIXELS = None  # a known 92 Mpx section image, not a decompression bomb
    with Image.open(image_path) as image:
        left = max(0, int(sel.pixel_x.min() - step_px))
        top = max(0, int(sel.pixel_y.min() - step_px))
        right = min(image.width, int(sel.pixel_x.max() + step_px) + 1)
        bottom = min(image.height, int(sel.pixel_y.max() + step_px) + 1)
        image.crop((left, top, right, bottom)).save(dst / image_path.name, quality=95)
    sel = sel.assign(pixel_x=sel.pixel_x - left, pixel_y=sel.pixel_y - top)
    sel.to_csv(dst / f"{section}_selection.tsv", sep="\t", index=False)
    counts = pd.read_csv(src / f"{section}.tsv.gz", sep="\t", index_col=0)
    names = {f"{x}x{y}" for x, y in zip(sel.x, sel.y)}
    counts[counts.index.isin(names)].to_csv(dst / f"{section}.tsv.gz", sep="\t")
    return dst


def layer_names(layers: list[str]) -> str:
    return " + ".join(Path(f).stem for f in layers)


def run_config(workdir: Path, layers: list[str], sections: str, targets: list[str],
               timeout: int = 1500) -> float:
    """Snakemake on ``layers`` + the shrink + the kept sections in ``workdir``; returns seconds."""
    configs = [REPO / f for f in layers]
    first = yaml.safe_load(configs[0].read_text())
    sheet = pd.read_csv(REPO / first["samples"], sep="\t", dtype=str, keep_default_na=False)
    keep = SECTIONS[sections]["keep"]
    sheet = sheet[sheet["sample"].isin(keep)]
    assert list(sheet["sample"]) == keep, f"{first['samples']} lacks some of {keep}"
    sheet.to_csv(workdir / f"samples_{sections}.tsv", sep="\t", index=False)
    kept = workdir / f"sections_{sections}.yaml"
    kept.write_text(yaml.safe_dump({"samples": f"samples_{sections}.tsv",
                                    **SECTIONS[sections]["config"]}))
    for name in ("config", "benchmarks"):  # the configs' relative paths (sample sheets)
        if not (workdir / name).exists():
            (workdir / name).symlink_to(REPO / name)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--cores", "2", "--configfile", *map(str, configs), str(SHRINK),
           str(kept), "--", *targets]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                         check=False)
    seconds = time.perf_counter() - start
    out = res.stdout + res.stderr
    (workdir / f"snakemake_{layer_names(layers).replace(' + ', '_')}.log").write_text(out)
    assert res.returncode == 0, _failed_job_logs(workdir, out)
    print(f"{layer_names(layers)}: {seconds:.0f} s")
    return seconds


def _failed_job_logs(workdir: Path, out: str) -> str:
    """The Snakemake output's end and the tail of every failed job's log."""
    logs = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("log:") and "(check log file" in line:
            path = workdir / line.split()[1]
            if path.is_file():
                logs.append(f"--- {path}\n" + path.read_text()[-3000:])
    return out[-4000:] + "\n" + "\n".join(logs)


def check_benchmark_table(workdir: Path, config: dict) -> None:
    """Every model of the config is in benchmark.csv, each with finite scores."""
    table = pd.read_csv(workdir / "results" / "report" / "benchmark.csv")
    missing = set(config["models"]) - set(table["model"])
    assert not missing, f"models without rows in benchmark.csv: {sorted(missing)}"
    for model, rows in table.groupby("model"):
        assert rows["value"].map(math.isfinite).any(), f"{model}: no finite value"


def check_superres_table(workdir: Path, config: dict) -> None:
    """superres.md lists every method and ablation of the config."""
    md = (workdir / "results" / "report" / "superres.md").read_text()
    sr = config["superres"]
    for method in [*sr["methods"], *sr.get("ablations", [])]:
        assert method in md, f"{method} missing from superres.md"


def merged(layers: list[str]) -> dict:
    from histomap.plan import load_config

    return load_config([REPO / f for f in layers] + [SHRINK],
                       defaults=REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def her2st_workdir(tmp_path_factory) -> Path:
    if not (HER2ST / "B4" / "B4.tsv.gz").is_file():
        pytest.skip(f"HER2ST sections not found at {HER2ST} (the shared data folder: developers' "
                    "checkout and CI only)")
    workdir = tmp_path_factory.mktemp("her2st")
    for section in SECTIONS["her2st"]["keep"]:
        crop_her2st(section, workdir / "her2st_cropped")
    SECTIONS["her2st"]["config"]["data_dir"] = str(workdir / "her2st_cropped")
    return workdir


def test_shrink_changes_only_sizes():
    """The shrink layer's keys are sizes: no encoder, loss, sampler, method list, cache mode or
    model list, so the configs run their own code path."""
    shrink = yaml.safe_load(SHRINK.read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    allowed = {"train_seeds", "train.epochs", "train.patience", "train.torch_threads",
               "synthetic.size_um", "superres.scales.synthetic", "superres.patch_um",
               "superres.validation.block_um", "superres.train.epochs",
               "superres.train.patience", "superres.sampling.steps",
               "superres.sampling.n_samples", "superres.diffusion.T",
               "superres.spot_grid.patch_spots"}
    allowed |= {f"{m}.train.{k}" for m in ("stnet", "histogene", "istar", "pixnet")
                for k in ("epochs", "patience")}
    assert set(keys(shrink)) <= allowed, set(keys(shrink)) - allowed
    for line in SHRINK.read_text().splitlines():   # every key says what it shrinks
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"uncommented shrink key: {line}"


@pytest.mark.slow
@pytest.mark.full
def test_superres_synthetic_paper_layout_runs(tmp_path):
    """benchmarks/superres/synthetic.yaml (the paper-sized Diff-ST, GPU config) to superres.md."""
    layers = ["benchmarks/superres/synthetic.yaml"]
    run_config(tmp_path, layers, "synthetic_sr", ["results/report/superres.md"])
    check_superres_table(tmp_path, merged(layers))
    shutil.rmtree(tmp_path / "results")  # passed: free the disk (a failure keeps its files)


@pytest.mark.slow
@pytest.mark.full
def test_her2st_full_runs(her2st_workdir):
    """config/her2st.yaml + config/her2st_full.yaml (the GPU config: paper-width PixNet at
    0.5 um/px, 512 px windows, ST-Net-sized crops, the large HisToGene, iStar's filter bank at
    0.5 um/px; the paper-sized Diff-ST and every SR baseline and ablation at 2x on the spot
    grid, with the DDPM sampler) to its benchmark tables, on two cropped sections."""
    layers = ["config/her2st.yaml", "config/her2st_full.yaml"]
    run_config(her2st_workdir, layers, "her2st",
               ["results/report/benchmark.csv", "results/report/superres.md"])
    config = merged(layers)
    check_benchmark_table(her2st_workdir, config)
    check_superres_table(her2st_workdir, config)
    shutil.rmtree(her2st_workdir / "results")  # passed: free ~16 GB (a failure keeps its files)
