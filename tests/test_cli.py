"""The `histomap` command: `apply` writes what the workflow's apply rules write for the same
bundle and slide, `info` describes a bundle, `validate` gives the workflow's messages; bad input
exits 1 with one line naming the file, a bad command line exits 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from histomap.cli import bundle_summary, main
from histomap.data.ingest import ingest_sample
from histomap.data.preprocess import normalise_spots
from histomap.data.synthetic import simulate_sample
from histomap.data.tiling import tile_slide
from histomap.tasks.apply_slide import ApplySettings, apply_to_slide
from histomap.tasks.bundle import train_bundle
from histomap.tasks.dense_map import read_dense

REPO = Path(__file__).resolve().parents[1]
HISTOMAP = [sys.executable, "-m", "histomap.cli"]
TINY_PIXNET = {"encoder": "test_resnet", "decoder_channels": [8, 8, 16, 16, 16], "out_stride": 4,
               "input_mpp": 2.0, "window_px": 64, "loss": "joint", "checkpoint": None}
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "patience": None, "amp": False,
         "device": "cpu"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny PixNet bundle trained on one synthetic section; a second section's H&E alone."""
    root = tmp_path_factory.mktemp("cli")
    for i, name in enumerate(["synA", "synB"]):
        simulate_sample(root / "synthetic" / name, seed=20 + i, size_um=(400.0, 400.0))
    out = root / "ingest" / "synA"
    ingest_sample(platform="synthetic", sample="synA", path=root / "synthetic" / "synA",
                  out_dir=out, spatialdata_mpp=None)
    tile_slide(out / "slide.tif", None, root / "synA.parquet", tile_px=64, tile_mpp=2.0,
               mask_mpp=8.0, min_tissue=0.01)
    norm = normalise_spots(ad.read_h5ad(out / "spots.h5ad"), min_counts=10, min_genes=5,
                           target_sum=1e4)
    norm.write_h5ad(root / "synA.h5ad")
    genes = list(norm.var_names[np.argsort(-np.asarray(norm.X.mean(axis=0)).ravel())[:4]])
    bundle = train_bundle("pixnet", [root / "synA.h5ad"], [out / "slide.tif"], genes,
                          name="pixnet", model_cfg=TINY_PIXNET, train_cfg=TRAIN,
                          validation={"fraction": 0.2, "block_um": 150}, seed=0,
                          out_dir=root / "bundle", checkpoint_dir=root / "checkpoints")
    return {"root": root, "bundle": bundle, "slide": root / "synthetic" / "synB" / "he.tif"}


def test_info_describes_the_bundle(trained, capsys):
    assert main(["info", str(trained["bundle"].path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == json.loads(json.dumps(bundle_summary(trained["bundle"].path)))
    assert shown["name"] == "pixnet" and shown["kind"] == "dense"
    assert shown["genes"] == 4 and shown["training_samples"] == ["synA"]
    assert main(["info", str(trained["bundle"].path)]) == 0
    assert "architecture" in capsys.readouterr().out


def test_bad_input_exits_1_naming_the_file(tmp_path):
    res = subprocess.run([*HISTOMAP, "info", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1
    assert str(tmp_path / "nowhere" / "bundle.json") in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_command_line_exits_2(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(trained["bundle"].path), "a.tif", "b.tif", "--out", str(tmp_path),
              "--name", "one"])
    assert exc.value.code == 2 and "--name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(trained["bundle"].path)])
    assert exc.value.code == 2


def test_apply_of_a_slide_without_mpp_fails_cleanly(trained, tmp_path):
    """A PNG has no trustworthy pixel size: exit 1, a message naming it, no output folder."""
    from PIL import Image

    png = tmp_path / "slide.png"
    Image.new("RGB", (64, 64), (230, 180, 200)).save(png)
    out = tmp_path / "out"
    assert main(["apply", str(trained["bundle"].path), str(png), "--out", str(out)]) == 1
    assert not (out / "slide" / "dense.zarr").exists()
    assert not (out / "slide" / "ingest").exists()


def test_apply_writes_every_output(trained, tmp_path):
    """Dense map, pseudo-spots and bins (scanpy-ready), SpatialData, the figure."""
    import spatialdata

    out = tmp_path / "out"
    assert main(["apply", str(trained["bundle"].path), str(trained["slide"]), "--out", str(out),
                 "--name", "heB", "--spot-um", "55", "--bin-um", "16", "--tile-px", "64",
                 "--tile-mpp", "2", "--min-tissue", "0.01", "--device", "cpu"]) == 0
    folder = out / "heB"
    dmap = read_dense(folder / "dense.zarr")
    assert dmap.genes == trained["bundle"].genes and np.asarray(dmap.mask).any()
    for name, shape in (("spots_55um", "disc"), ("bins_16um", "square")):
        table = ad.read_h5ad(folder / f"{name}.h5ad")
        assert table.n_obs > 0 and (table.obs["shape"] == shape).all()
        assert "heB" in table.uns["spatial"] and np.isfinite(table.X).all()
    assert (folder / "map.png").stat().st_size > 1000
    sdata = spatialdata.read_zarr(folder / "spatialdata.zarr")
    assert set(sdata.images) == {"he", "dense_pixnet"}
    assert set(sdata.shapes) == {"pixnet_spots_55um", "pixnet_bins_16um"}


def test_a_stain_normalised_bundle_normalises_the_applied_slide(trained, tmp_path):
    """A bundle with a stain reference (its training slides') normalises every slide it is
    applied to before the model reads it; the tissue mask still comes from the slide as
    scanned."""
    import shutil

    from histomap.data.stain import fit_slides

    folder = tmp_path / "bundle"
    shutil.copytree(trained["bundle"].path, folder)
    meta = json.loads((folder / "bundle.json").read_text())
    reference = fit_slides("macenko", [trained["root"] / "ingest" / "synA" / "slide.tif"])
    meta["stain"] = {"method": "macenko", "reference": reference.to_json()}
    (folder / "bundle.json").write_text(json.dumps(meta))
    assert bundle_summary(folder)["stain_normalisation"] == "macenko"
    args = [str(trained["slide"]), "--name", "heB", "--spot-um", "55", "--tile-px", "64",
            "--tile-mpp", "2", "--min-tissue", "0.01", "--device", "cpu"]
    assert main(["apply", str(folder), *args[:1], "--out", str(tmp_path / "n"), *args[1:]]) == 0
    assert main(["apply", str(trained["bundle"].path), *args[:1], "--out", str(tmp_path / "p"),
                 *args[1:]]) == 0
    stained = tmp_path / "n" / "heB" / "ingest" / "slide_stain_normalised.tif"
    assert stained.is_file() and (stained.parent / "stain_source.json").is_file()
    normalised, plain = (read_dense(tmp_path / k / "heB" / "dense.zarr").read()
                         for k in ("n", "p"))
    assert normalised.shape == plain.shape and not np.array_equal(normalised, plain)
    masks = (np.asarray(read_dense(tmp_path / k / "heB" / "dense.zarr").mask) for k in "np")
    np.testing.assert_array_equal(*masks)
    meta["stain"]["reference"]["method"] = "vahadane"
    (folder / "bundle.json").write_text(json.dumps(meta))
    assert main(["apply", str(folder), *args[:1], "--out", str(tmp_path / "bad"), *args[1:]]) == 1


def _tables_equal(a: Path, b: Path) -> None:
    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    assert list(x.obs_names) == list(y.obs_names) and list(x.var_names) == list(y.var_names)
    np.testing.assert_array_equal(np.asarray(x.X), np.asarray(y.X))
    np.testing.assert_array_equal(x.obsm["spatial"], y.obsm["spatial"])
    pd.testing.assert_frame_equal(x.obs, y.obs)


@pytest.mark.slow
def test_apply_equals_the_workflows_apply(trained, tmp_path):
    """The workflow (config/apply.yaml with this bundle and one `he` slide) and `histomap apply`
    with the same settings write the same dense map and tables, and the same elements."""
    import spatialdata

    workdir = tmp_path / "wf"
    shutil.copytree(REPO / "config", workdir / "config")
    slide = tmp_path / "heB.tif"
    shutil.copy(trained["slide"], slide)
    sheet = workdir / "samples.tsv"
    pd.DataFrame({"sample": ["heB"], "patient": ["H1"], "platform": ["he"],
                  "path": [str(slide)]}).to_csv(sheet, sep="\t", index=False)
    config = yaml.safe_load((REPO / "config" / "apply.yaml").read_text())
    config.update(samples=str(sheet))
    config["apply"].update(bundle=str(trained["bundle"].path), models=[])
    (workdir / "apply.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                          "--directory", str(workdir), "--cores", "1", "--configfile",
                          str(workdir / "apply.yaml")], cwd=workdir, capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    wf = workdir / "results" / "apply" / "pixnet" / "heB"

    settings = ApplySettings(spot_diameters_um=config["apply"]["spot_diameters_um"],
                             bin_um=config["apply"]["bin_um"])
    cli = tmp_path / "cli"
    console = Path(sys.executable).parent / "histomap"  # the installed console script
    code = subprocess.run([str(console), "apply", str(trained["bundle"].path), str(slide), "--out",
                           str(cli), *[a for um in settings.spot_diameters_um
                                       for a in ("--spot-um", str(um))],
                           *[a for um in settings.bin_um for a in ("--bin-um", str(um))]],
                          capture_output=True, text=True, timeout=1500)
    assert code.returncode == 0, code.stderr[-4000:]
    mine = cli / "heB"
    a, b = read_dense(wf / "dense.zarr"), read_dense(mine / "dense.zarr")
    assert a.origin_px == b.origin_px and a.mpp == b.mpp and a.genes == b.genes
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_array_equal(a.read(), b.read())
    names = sorted(p.name for p in wf.glob("*.h5ad"))
    assert names == sorted(p.name for p in mine.glob("*.h5ad")) and len(names) == 3
    for name in names:
        _tables_equal(wf / name, mine / name)
    assert (mine / "map.png").is_file()
    x = spatialdata.read_zarr(workdir / "results" / "spatialdata" / "apply" / "heB.zarr")
    y = spatialdata.read_zarr(mine / "spatialdata.zarr")
    assert set(x.images) == set(y.images) and set(x.shapes) == set(y.shapes)
    assert set(x.tables) == set(y.tables)
    # the same function, called from a notebook
    done = apply_to_slide(trained["bundle"], slide, tmp_path / "nb", settings=settings)
    np.testing.assert_array_equal(read_dense(done.dense).read(), a.read())


def test_validate_gives_the_workflows_messages(tmp_path, capsys):
    """A recorded config plans (exit 0, a summary); a typo in a key and a sheet naming an unknown
    platform fail with the workflow's start-up messages (exit 1, no traceback)."""
    demo = REPO / "config" / "config.yaml"
    assert main(["validate", "-d", str(REPO), str(REPO / "config" / "apply.yaml")]) == 0
    out = capsys.readouterr().out
    assert "sample sheet" in out and "apply: pixnet" in out
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian: {epochs: 3}\n")
    assert main(["validate", "-d", str(REPO), str(typo)]) == 1
    err = capsys.readouterr().err
    assert "trian" in err and "Traceback" not in err
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample\tpatient\tplatform\tpath\nS1\tP1\tvisum\tdata/S1\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"samples": str(sheet)}))
    assert main(["validate", "-d", str(REPO), "--no-defaults", str(demo), str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(sheet) in err and "visum" in err


def test_wheel_ships_the_package_schemas_and_command(tmp_path):
    """`pip wheel .` builds a wheel with every module, the config schemas `histomap validate`
    reads, and the `histomap` console script."""
    import zipfile

    project = tmp_path / "project"  # a copy: the build leaves build/ and egg-info beside it
    shutil.copytree(REPO / "workflow" / "scripts" / "histomap",
                    project / "workflow" / "scripts" / "histomap",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, project / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist"), str(project)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("histomap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    source = REPO / "workflow" / "scripts"
    modules = {str(p.relative_to(source)) for p in (source / "histomap").rglob("*.py")}
    assert modules <= set(names)
    assert {"histomap/plan/schemas/config.schema.yaml",
            "histomap/plan/schemas/samples.schema.yaml"} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "histomap = histomap.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
