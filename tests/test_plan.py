"""Workflow planning (histomap.plan) on small in-memory configs and sheets written to tmp_path:
config layering and validation messages, folds, variants and SR methods (`base` chains),
the benchmark's file lists, cross-scale, super-resolution runs and the apply targets."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from histomap.errors import InputError
from histomap.plan import Plan, load_config, resolve_base, validate_config
from histomap.plan.inherit import merge_settings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "config.yaml"


def write_sheet(folder: Path, rows: list[tuple[str, str, str, str]], name="samples.tsv") -> str:
    """A sample sheet of (sample, patient, platform, path) rows; its path."""
    path = folder / name
    path.write_text("sample\tpatient\tplatform\tpath\n"
                    + "".join("\t".join(r) + "\n" for r in rows))
    return str(path)


SYNTHETIC = [("synA", "P1", "synthetic", ""), ("synB", "P2", "synthetic", ""),
             ("synC", "P3", "synthetic", "")]


def tiny_config(tmp_path: Path, rows=SYNTHETIC, **overrides) -> dict:
    """The demo config (as the Snakefile loads it first) with a sheet of ``rows`` and the
    given top-level keys replaced; SR and cross-scale off unless asked for."""
    config = load_config([], defaults=DEMO)
    config.update(samples=write_sheet(tmp_path, rows), models=["mean", "pixnet"],
                  superres={"enabled": False},
                  cross_scale={"enabled": False, "models": [], "diameters_um": [100.0],
                               "min_spacing_um": 10})
    config.update(copy.deepcopy(overrides))
    return config


def plan_of(tmp_path: Path, **overrides) -> Plan:
    return validate_config(tiny_config(tmp_path, **overrides), tmp_path)


# --------------------------------------------------------------------------- load_config
def test_load_config_layers_files_key_by_key(tmp_path):
    defaults, a, b = tmp_path / "defaults.yaml", tmp_path / "a.yaml", tmp_path / "b.yaml"
    defaults.write_text(yaml.safe_dump({"seed": 0, "train": {"epochs": 10, "lr": 0.1},
                                        "models": ["stnet", "pixnet"], "dataset": "demo"}))
    a.write_text(yaml.safe_dump({"train": {"epochs": 3}, "models": ["pixnet"],
                                 "pixnet": {"loss": "mse"}}))
    b.write_text(yaml.safe_dump({"train": {"lr": 0.5}, "dataset": "her2st"}))
    config = load_config([a, b], defaults=defaults)
    assert config["train"] == {"epochs": 3, "lr": 0.5}  # nested blocks merge key by key
    assert config["models"] == ["pixnet"]  # a list is replaced, not extended
    assert config["dataset"] == "her2st" and config["seed"] == 0
    assert config["pixnet"] == {"loss": "mse"}
    assert load_config([b, a])["train"] == {"lr": 0.5, "epochs": 3}
    assert load_config([a], defaults=None) == yaml.safe_load(a.read_text())
    (tmp_path / "empty.yaml").write_text("")
    assert load_config([tmp_path / "empty.yaml"], defaults=defaults)["seed"] == 0


def test_load_config_rejects_a_file_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml.*mapping"):
        load_config([bad])


def test_load_config_layers_like_the_recorded_commands():
    config = load_config([REPO / "config" / "cross_scale.yaml",
                          REPO / "config" / "pixnet_ablation.yaml"], defaults=DEMO)
    assert config["variants"]["pixnet_mse"] == {"base": "pixnet", "loss": "mse"}
    assert config["cross_scale"]["enabled"] is True
    assert config["tiling"] == yaml.safe_load(DEMO.read_text())["tiling"]


# --------------------------------------------------------------------------- validate_config
def test_validate_config_reports_an_unknown_key(tmp_path):
    config = tiny_config(tmp_path)
    config["tiling"]["tile_pxx"] = 3
    with pytest.raises(Exception, match="tile_pxx"):
        validate_config(config, tmp_path)


def test_validate_config_fills_schema_defaults(tmp_path):
    config = tiny_config(tmp_path)
    config.pop("superres")
    config["tiling"].pop("write_tiles", None)
    validate_config(config, tmp_path)
    assert config["tiling"]["write_tiles"] is False
    assert config["superres"] == {"enabled": False, "normalisation": "log1p"}


def test_validate_config_names_the_sheet_and_the_sample(tmp_path):
    rows = [("S1", "P", "nanostring", "x"), ("S2", "Q", "synthetic", "")]
    with pytest.raises(InputError) as err:
        plan_of(tmp_path, rows=rows)
    assert str(tmp_path / "samples.tsv") in str(err.value)
    assert "sample 'S1'" in str(err.value) and "nanostring" in str(err.value)
    rows = [("S1", "P", "synthetic", ""), ("S1", "Q", "synthetic", "")]
    with pytest.raises(InputError, match=r"samples\.tsv: duplicate sample names \['S1'\]"):
        plan_of(tmp_path, rows=rows)


def test_validate_config_reads_relative_paths_from_the_workdir(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write_sheet(tmp_path / "config", SYNTHETIC)
    config = tiny_config(tmp_path, samples="config/samples.tsv")
    monkeypatch.chdir(REPO.parent)  # anywhere else
    plan = validate_config(config, tmp_path)
    assert plan.sheet.names == ["synA", "synB", "synC"]
    assert plan.sheet.path == "config/samples.tsv"  # messages name it as the config does


def test_one_st_sample_benchmark_gives_advice(tmp_path):
    with pytest.raises(InputError, match="at least two ST samples.*benchmark: false"):
        plan_of(tmp_path, rows=SYNTHETIC[:1])
    plan = plan_of(tmp_path, rows=SYNTHETIC[:1], benchmark=False, models=["pixnet"],
                   apply={"models": ["pixnet"]})
    assert plan.folds.names == []
    assert plan.all_targets() == ["results/tiles/synA.parquet",
                                  "results/bundles/pixnet/seed0/bundle.json"]


# --------------------------------------------------------------------------- folds
def test_folds_split_by_patient_and_leave_image_only_samples_out(tmp_path):
    rows = [("a1", "P1", "synthetic", ""), ("a2", "P1", "synthetic", ""),
            ("b1", "P2", "synthetic", ""), ("heA", "H", "he", "slides/heA.tif"),
            ("c1", "P3", "synthetic", "")]
    plan = plan_of(tmp_path, rows=rows)
    assert plan.folds.folds == {
        "P1": {"train": ["b1", "c1"], "test": ["a1", "a2"]},
        "P2": {"train": ["a1", "a2", "c1"], "test": ["b1"]},
        "P3": {"train": ["a1", "a2", "b1"], "test": ["c1"]},
    }
    assert set(plan.folds.kinds.values()) == {"cross_patient"}
    assert plan.folds.samples("final", "train") == ["a1", "a2", "b1", "c1"]
    assert plan.folds.samples("final", "test") == []
    assert plan.sheet.image_only_samples == ["heA"]
    # within-patient folds: a section of the test patient trains
    plan = plan_of(tmp_path, rows=rows, folds={"strategy": "leave_one_sample_out"})
    assert plan.folds.kinds["a1"] == "within_patient" and plan.folds.kinds["b1"] == "cross_patient"


def test_a_fold_may_not_be_named_final(tmp_path):
    rows = [("a", "final", "synthetic", ""), ("b", "P2", "synthetic", "")]
    with pytest.raises(ValueError, match="a fold may not be named 'final'"):
        plan_of(tmp_path, rows=rows)


# --------------------------------------------------------------------------- variants
VARIANTS = {"pixnet_mse": {"base": "pixnet", "loss": "mse", "train": {"epochs": 2}},
            "pixnet_mse_conv": {"base": "pixnet_mse", "fusion": "conv", "train": {"lr": 0.5}}}


def test_variants_resolve_along_a_chain(tmp_path):
    plan = plan_of(tmp_path, models=["mean", "pixnet", "pixnet_mse", "pixnet_mse_conv", "stnet"],
                   variants=VARIANTS)
    models, pixnet = plan.models, plan.config["pixnet"]
    assert models.family("pixnet_mse_conv") == "pixnet" and models.family("mean") == "mean"
    assert models.resolve("pixnet_mse_conv").chain == ("pixnet_mse_conv", "pixnet_mse", "pixnet")
    block = models.block("pixnet_mse_conv")
    assert block["loss"] == "mse" and block["fusion"] == "conv"
    assert block["encoder"] == pixnet["encoder"]
    assert block["train"] == {**pixnet.get("train", {}), "epochs": 2, "lr": 0.5}
    assert models.train("pixnet_mse_conv") == {**plan.config["train"], **pixnet.get("train", {}),
                                               "epochs": 2, "lr": 0.5}
    params = models.params("pixnet_mse_conv")
    assert "train" not in params and "predict_spot_diameters_um" not in params
    assert params["loss"] == "mse"
    assert models.block("mean") == {}
    assert models.runs("pixnet") == "pixnet|pixnet_mse|pixnet_mse_conv"
    assert models.runs("istar") == "(?!x)x"  # matches nothing
    assert models.dense_runs == "pixnet|pixnet_mse|pixnet_mse_conv"


@pytest.mark.parametrize("variants,models,message", [
    ({"v": {"base": "pixnett"}}, ["v"],
     "config variants.v: base 'pixnett' is neither a model (stnet, histogene, probe, pixnet, "
     "istar) nor another variants entry"),
    ({"v": {"base": "w"}, "w": {"base": "v"}}, ["v"],
     "config variants.w: base 'v' makes a cycle (v -> w -> v)"),
    ({"v": {"base": "mean"}}, ["v"], "base 'mean' is neither a model"),
    ({}, ["pixnet_mse"], "`models` entry 'pixnet_mse' is neither a model"),
    ({"i": {"base": "istar"}}, ["i"], "config: model 'i' needs a `istar:` block"),
])
def test_variant_errors_name_the_config_key(tmp_path, variants, models, message):
    config = tiny_config(tmp_path, models=models, variants=variants)
    config.pop("istar", None)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(config, tmp_path)


def test_resolve_base_merges_train_and_diffusion_one_level():
    entries = {"diffst": {"method": "diffst", "cam": True, "diffusion": {"T": 10},
                          "curriculum": {"at": [0.0], "values": [1.0], "mode": "fraction"}},
               "eps": {"base": "diffst", "diffusion": {"prediction": "eps"}},
               "eps_long": {"base": "eps", "train": {"epochs": 9}, "curriculum": {"at": [0.5]}}}
    resolved = resolve_base("eps_long", entries, where="superres.models")
    assert resolved.chain == ("eps_long", "eps", "diffst") and resolved.root == "diffst"
    assert resolved.settings == {"method": "diffst", "cam": True,
                                 "diffusion": {"T": 10, "prediction": "eps"},
                                 "train": {"epochs": 9}, "curriculum": {"at": [0.5]}}
    assert resolve_base("tesla", entries, where="superres.models").settings == {}
    with pytest.raises(ValueError, match="config superres.models.eps: base 'dfst' is not "
                                         "configured under superres.models"):
        resolve_base("eps", {**entries, "eps": {"base": "dfst"}}, where="superres.models")
    with pytest.raises(ValueError, match=r"superres.models.a: base 'a' makes a cycle \(a -> a\)"):
        resolve_base("a", {"a": {"base": "a"}}, where="superres.models")
    assert merge_settings({"train": {"a": 1}}, {"train": None}) == {"train": None}


# --------------------------------------------------------------------------- file lists
def test_file_lists_of_a_tiny_benchmark(tmp_path):
    pixnet = {**load_config([], defaults=DEMO)["pixnet"], "predict_spot_diameters_um": [16]}
    plan = plan_of(tmp_path, train_seeds=[0, 1], pixnet=pixnet)
    files, spot = plan.files, plan.sheet.spot_diameter_um("synA")
    um = f"{spot:g}"
    assert files.metric_files() == [f"results/metrics/spot/{m}/{f}/seed{t}.parquet"
                                    for m in ("mean", "pixnet") for f in ("P1", "P2", "P3")
                                    for t in (0, 1)]
    assert files.prediction_files("pixnet", "P2", 1) == [
        f"results/predictions/pixnet/P2/seed1/synB/spots_{um}um.h5ad"]
    assert files.train_inputs("pixnet", "P1") == {
        "st": ["results/st/synB.h5ad", "results/st/synC.h5ad"],
        "slides": ["results/ingest/synB/slide.tif", "results/ingest/synC/slide.tif"],
        "genes": f"results/genes/{plan.gene_panel}/P1.tsv",
        "extra": [],
        "features": (["results/features/efficientnet_lite0_imagenet/1/synB.zarr",
                      "results/features/efficientnet_lite0_imagenet/1/synC.zarr"]
                     if pixnet.get("feature_cache") else []),
    }
    assert files.training_logs() == [(f"pixnet/{f}", f"results/models/pixnet/{f}/seed0/"
                                      "train_log.csv") for f in ("P1", "P2", "P3")]
    assert files.extra_scale_files() == [
        f"results/predictions/pixnet/{f}/seed{t}/{s}/spots_16um.h5ad"
        for f, s in (("P1", "synA"), ("P2", "synB"), ("P3", "synC")) for t in (0, 1)]
    assert files.sample_dense_maps("synC") == {
        f"pixnet_P3_seed{t}": f"results/predictions/pixnet/P3/seed{t}/synC/dense.zarr"
        for t in (0, 1)}
    targets = plan.all_targets()
    for path in ("results/report/benchmark.md", "results/report/figures/mean/P1_synA.png",
                 "results/report/figures/dense/pixnet/P2_synB.png",
                 "results/report/figures/training_curves.png", "results/spatialdata/synC.zarr",
                 "results/tiles/synA.parquet"):
        assert path in targets
    assert "results/report/figures/dense/mean/P1_synA.png" not in targets
    assert not [t for t in targets if "superres" in t or "cross_scale" in t]


def test_sheet_values_for_ingest(tmp_path):
    rows = [("xe1", "P1", "xenium", "xe/S1"), ("syn", "P2", "synthetic", "")]
    sheet = write_sheet(tmp_path, rows, name="xenium.tsv")
    lines = Path(sheet).read_text().splitlines()
    lines[0] += "\timage\tmin_qv\torigin_um\tspot_diameter_um"
    lines[1] += "\txe/he.tif\t20\t1.5; 2\t"
    lines[2] += "\t\t\t\t30"
    Path(sheet).write_text("\n".join(lines) + "\n")
    plan = plan_of(tmp_path, data_dir="/data", samples=sheet)
    s = plan.sheet
    assert s.ingest_inputs("xe1") == {"source": "/data/xe/S1", "image": "/data/xe/he.tif"}
    assert s.ingest_inputs("syn") == {"source": "results/synthetic/syn"}
    assert s.reader_options("xe1") == {"min_qv": 20.0, "origin_um": [1.5, 2.0]}
    assert s.spot_diameter_um("xe1") == 55.0 and s.spot_diameter_um("syn") == 30.0
    assert s.has_highres("xe1") and s.value("syn", "image") is None


# --------------------------------------------------------------------------- cross-scale
def test_cross_scale_runs_and_training_diameters(tmp_path):
    cross = {"enabled": True, "models": ["pixnet", "mean", "stnet"], "diameters_um": [55, 8],
             "min_spacing_um": 10, "min_counts": 1}
    plan = plan_of(tmp_path, models=["mean", "pixnet", "stnet"], cross_scale=cross)
    assert plan.cross_scale.models() == ["mean", "pixnet", "stnet"]
    assert plan.cross_scale.labels == ["55", "8"]
    assert plan.cross_scale.preprocess["min_counts"] == 1
    assert plan.cross_scale.truth("pixnet", "P1", "synA") == [
        "results/scales/synA/truth_55um.h5ad", "results/scales/synA/truth_8um.h5ad"]
    # a spot model: scored at its training size only, on the same truth discs as the others
    assert plan.cross_scale.truth("stnet", "P1", "synA") == []
    assert plan.cross_scale.diameters("stnet", "P1") == [55]
    assert plan.cross_scale.pairs("P1", "stnet") == [("synA", "55")]
    assert plan.cross_scale.pairs("P1", "pixnet") == [("synA", "55"), ("synA", "8")]
    metric_files = plan.files.metric_files()
    assert "results/metrics/cross_scale/pixnet/P3/seed0.parquet" in metric_files
    assert "results/metrics/cross_scale/stnet/P3/seed0.parquet" in metric_files
    no_size = dict(cross, diameters_um=[8])  # the training size is not re-measured
    plan = plan_of(tmp_path, models=["mean", "pixnet", "stnet"], cross_scale=no_size)
    assert plan.cross_scale.diameters("stnet", "P1") == []
    assert not [f for f in plan.files.metric_files() if "cross_scale/stnet" in f]
    assert "results/report/figures/cross_scale.png" in plan.all_targets()
    variants = {"mixed": {"base": "pixnet", "train_diameters_um": [8]}}
    plan = plan_of(tmp_path, models=["mixed"], cross_scale=cross, variants=variants)
    assert plan.files.extra_train_spots("mixed", "P1") == [
        ["results/scales/synB/qc_8um.h5ad"], ["results/scales/synC/qc_8um.h5ad"]]
    variants["mixed"]["train_diameters_um"] = [16]
    with pytest.raises(ValueError, match=r"mixed.train_diameters_um has 16, which is not one of "
                                         r"cross_scale.diameters_um \[55, 8\]"):
        plan_of(tmp_path, models=["mixed"], cross_scale=cross, variants=variants)


# --------------------------------------------------------------------------- super-resolution
def sr_block(**overrides) -> dict:
    sr = copy.deepcopy(load_config([], defaults=DEMO)["superres"])
    sr.update(methods=["bicubic", "diffst"], ablations=["diffst_eps"],
              scales={"synthetic": [5], "xenium": [5]})
    sr["models"]["diffst_eps"] = {"base": "diffst", "diffusion": {"prediction": "eps"},
                                  "train": {"epochs": 1}}
    sr.update(overrides)
    return sr


def test_sr_runs_methods_and_settings(tmp_path):
    plan = plan_of(tmp_path, superres=sr_block())
    sr = plan.sr
    assert sr.runs() == [(m, 5, f) for m in ("bicubic", "diffst", "diffst_eps")
                         for f in ("P1", "P2", "P3")]
    assert sr.methods_of("diffst") == "diffst|diffst_eps" and sr.methods_of("baseline") == "bicubic"
    arch, settings = sr.method("diffst_eps")
    assert arch == "diffst" and settings["base_channels"] == plan.config["superres"][
        "models"]["diffst"]["base_channels"]
    assert "train" not in sr.model_config("diffst_eps")
    assert "method" not in sr.model_config("diffst_eps")
    assert sr.train_config("diffst_eps") == {**plan.config["train"],
                                             **plan.config["superres"]["train"], "epochs": 1}
    assert sr.diffusion_config("diffst_eps")["prediction"] == "eps"
    assert sr.train_inputs("P1", "5") == ["results/sr/pairs/P1/synB_x5.zarr",
                                          "results/sr/pairs/P1/synC_x5.zarr"]
    assert sr.pairs_inputs("P1", "synA", "g.tsv")["counts"] == "results/ingest/synA/highres.h5ad"
    assert sr.evaluate_inputs("diffst", "5")["maps"] == [
        f"results/sr/predictions/diffst/x5/{f}/{s}/maps.zarr"
        for f, s in (("P1", "synA"), ("P2", "synB"), ("P3", "synC"))]
    assert sr.figure_files() == ["results/report/figures/superres/bicubic_x5.png",
                                 "results/report/figures/superres/diffst_x5.png"]
    assert "results/report/superres.md" in plan.all_targets()
    assert ("SR diffst_eps x5/P2", "results/sr/models/diffst_eps/x5/P2/train_log.csv") in \
        plan.files.training_logs()


def test_sr_training_samples_get_the_training_stride_and_chains_find_their_architecture(
        tmp_path):
    grid = {"patch_spots": 8, "stride_spots": None, "min_measured": 0.25, "image_mpp": 4.0,
            "train_stride_spots": 2}
    sr = sr_block(spot_grid=grid)
    sr["models"]["unet"] = {"base_channels": 8}
    sr["models"]["unet_small"] = {"base": "unet", "train": {"max_patches": 4}}
    sr["ablations"] = ["unet_small"]
    plan = plan_of(tmp_path, superres=sr)
    train, test = plan.folds.samples("P1", "train")[0], plan.folds.samples("P1", "test")[0]
    assert plan.sr.pair_settings("P1", train)["spot_grid"]["stride_spots"] == 2
    assert plan.sr.pair_settings("P1", test)["spot_grid"]["stride_spots"] is None
    assert "train_stride_spots" not in plan.sr.pair_settings("P1", test)["spot_grid"]
    assert plan.sr.method("unet_small")[0] == "unet"   # the end of its `base` chain
    assert plan.sr.train_config("unet_small")["max_patches"] == 4


def test_sr_errors_name_the_config_key(tmp_path):
    with pytest.raises(ValueError, match="no fold has training and test samples at a scale"):
        plan_of(tmp_path, superres=sr_block(scales={"xenium": [5]}))
    with pytest.raises(ValueError, match="method 'unett' is neither configured under "
                                         "superres.models nor one of diffst, guided"):
        plan_of(tmp_path, superres=sr_block(methods=["unett"]))
    bad = sr_block()
    bad["models"]["diffst_eps"]["base"] = "diffst_x0"
    with pytest.raises(ValueError, match="config superres.models.diffst_eps: base 'diffst_x0' "
                                         "is not configured under superres.models"):
        plan_of(tmp_path, superres=bad)
    old = sr_block()
    old["models"]["diffst_eps"] = {"based_on": "diffst"}
    with pytest.raises(ValueError, match="superres.models.diffst_eps: `based_on` is now `base`"):
        plan_of(tmp_path, superres=old)


def test_sr_architectures_are_the_registries():
    from histomap.models.srnets import SR_BASELINES
    from histomap.plan import SCHEMAS
    from histomap.plan.superres import sr_architectures
    from histomap.tasks.superres import DIFFUSION_METHODS

    assert sr_architectures() == (*DIFFUSION_METHODS, *SR_BASELINES)
    schema = yaml.safe_load(SCHEMAS["superres"].read_text())
    method = schema["properties"]["models"]["additionalProperties"]["properties"]["method"]
    assert set(method["enum"]) == set(sr_architectures())


def test_model_families_have_one_definition():
    import histomap.models as models
    from histomap.plan import models as plan_models
    from histomap.tasks import dense

    assert dense.DENSE_MODELS is models.DENSE_MODELS
    assert plan_models.DENSE_MODELS is models.DENSE_MODELS
    assert set(models.MODEL_CLASSES) == set(models.SPOT_MODELS + models.DENSE_MODELS)
    assert set(models.MODELS) == set(models.MODEL_CLASSES)
    assert models.MODELS["pixnet"] is models.PixNet


# --------------------------------------------------------------------------- apply
HE = [*SYNTHETIC, ("heA", "H1", "he", "slides/heA.tif"), ("heB", "H2", "he", "slides/heB.tif")]


def test_apply_targets_of_train_final_bundles(tmp_path):
    apply = {"models": ["pixnet", "stnet"], "spot_diameters_um": [55], "bin_um": [8]}
    plan = plan_of(tmp_path, rows=HE, models=["pixnet", "stnet"], apply=apply, benchmark=False)
    assert plan.apply.samples == ["heA", "heB"]
    assert plan.apply.bundles == {"pixnet": ("results/bundles/pixnet/seed0", "pixnet", False),
                                  "stnet": ("results/bundles/stnet/seed0", "stnet", False)}
    assert plan.apply.runs(dense=True) == "pixnet" and plan.apply.runs(dense=False) == "stnet"
    assert plan.apply_targets() == [
        "results/bundles/pixnet/seed0/bundle.json", "results/bundles/stnet/seed0/bundle.json",
        *[p for s in ("heA", "heB") for p in (
            f"results/apply/pixnet/{s}/spots_55um.h5ad", f"results/apply/pixnet/{s}/bins_8um.h5ad",
            f"results/apply/pixnet/{s}/map.png", f"results/apply/pixnet/{s}/dense.zarr")],
        *[p for s in ("heA", "heB") for p in (f"results/apply/stnet/{s}/spots_55um.h5ad",
                                              f"results/apply/stnet/{s}/map.png")],
        "results/spatialdata/apply/heA.zarr", "results/spatialdata/apply/heB.zarr",
    ]
    assert plan.apply.sample_tables("heA") == {
        "pixnet_spots_55um": "results/apply/pixnet/heA/spots_55um.h5ad",
        "pixnet_bins_8um": "results/apply/pixnet/heA/bins_8um.h5ad",
        "stnet_spots_55um": "results/apply/stnet/heA/spots_55um.h5ad"}
    assert plan.files.final_inputs("pixnet")["st"] == [f"results/st/{s}.h5ad"
                                                       for s in ("synA", "synB", "synC")]
    with pytest.raises(ValueError, match=r"apply.models \['istar'\] are not in `models`"):
        plan_of(tmp_path, rows=HE, apply={"models": ["istar"]})
    with pytest.raises(ValueError, match="apply.samples names 'heC', which is not in"):
        plan_of(tmp_path, rows=HE, apply={"models": ["pixnet"], "samples": ["heC"]})
    with pytest.raises(ValueError, match="apply.spot_diameters_um is empty, but spot models"):
        plan_of(tmp_path, rows=HE, models=["stnet"],
                apply={"models": ["stnet"], "spot_diameters_um": []})


def test_apply_reads_a_bundle_made_elsewhere(tmp_path):
    bundle = tmp_path / "elsewhere" / "lab"
    bundle.mkdir(parents=True)
    (bundle / "model.pt").write_bytes(b"weights")
    (bundle / "bundle.json").write_text(json.dumps({
        "format": "histomap.bundle/1", "name": "lab_pixnet", "architecture": "pixnet",
        "kind": "dense", "genes": ["G1"], "normalisation": {"target_sum": 1e4, "log1p": True},
        "input": {"mpp": 1.0}}))
    plan = plan_of(tmp_path, rows=HE, benchmark=False,
                   apply={"bundle": str(bundle), "samples": ["heA"]})
    assert plan.apply.bundles == {"lab_pixnet": (str(bundle), "pixnet", False)}
    assert "results/apply/lab_pixnet/heA/dense.zarr" in plan.apply_targets()
    assert not [t for t in plan.apply_targets() if t.startswith("results/bundles/")]
    with pytest.raises(ValueError, match=r"config apply.bundle: .*bundle\.json"):
        plan_of(tmp_path, rows=HE, benchmark=False, apply={"bundle": str(bundle.parent)})


def test_apply_superres_targets_and_errors(tmp_path):
    sr = sr_block(enabled=False)
    apply = {"superres": {"methods": ["unet"], "factor": 5, "samples": ["synC"]}}
    plan = plan_of(tmp_path, rows=HE, superres=sr, apply=apply)
    assert plan.apply_sr.train_samples() == ["synA", "synB", "synC"]
    assert plan.apply_targets() == ["results/sr/models/unet/x5/final/model.pt",
                                    "results/apply/superres/unet/x5/synC/maps.zarr",
                                    "results/apply/superres/unet/x5/synC/bins.h5ad",
                                    "results/apply/superres/unet/x5/synC/map.png"]
    assert plan.sr.runs() == [] and plan.sr.all_method_names() == [
        "bicubic", "diffst", "diffst_eps", "unet"]
    for superres, message in [
        ({"methods": ["unet"], "factor": 3}, "apply.superres.factor 3: no ST sample of"),
        ({"methods": ["unet"], "factor": 5, "samples": ["heA"]}, "'heA', an H&E-only sample"),
        ({"methods": ["unet"]}, "apply.superres.factor is not"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_of(tmp_path, rows=HE, superres=sr, apply={"superres": superres})
