"""Smoke test of benchmarks/pixnet_cost.py at tiny size (--quick): rows, times, ratios."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pixnet_cost.py"


@pytest.fixture(scope="module")
def pixnet_cost():
    spec = importlib.util.spec_from_file_location("pixnet_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.slow  # runs the whole cost benchmark (dense maps, crops at three scales): ~6 s idle
def test_pixnet_cost_quick(pixnet_cost, tmp_path):
    argv = ["--quick", "--threads", "1", "--scales-um", "100,16,2", "--out-dir",
            str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--device", "cpu"]
    csv_path, md_path = pixnet_cost.main(argv)
    assert csv_path == tmp_path / "out" / "pixnet_cost.csv" and md_path.is_file()
    assert not list((tmp_path / "out").glob("*.partial"))
    table = pd.read_csv(csv_path)
    assert list(table.columns) == pixnet_cost.COLUMNS

    scales = table[table["benchmark"] == "scales"].set_index("method")
    assert list(scales.index) == ["pixnet", "stnet", "stnet_fixed_px"]
    assert (scales["n_scales"] == 3).all() and (scales["scales_um"] == "100;16;2").all()
    assert (scales["n_spots"] > 0).all() and (scales["device"] == "cpu").all()
    for col in ("seconds_1_scale", "seconds_all_scales"):
        assert (scales[col] > 0).all() and np.isfinite(scales[col]).all()
    np.testing.assert_allclose(scales["ratio_all_to_1"],
                               scales["seconds_all_scales"] / scales["seconds_1_scale"],
                               rtol=1e-4)
    np.testing.assert_allclose(scales["ratio_to_stnet_all_scales"],
                               scales["seconds_all_scales"]
                               / scales.loc["stnet", "seconds_all_scales"], rtol=1e-4)
    np.testing.assert_allclose(scales["seconds_per_extra_scale"],
                               (scales["seconds_all_scales"] - scales["seconds_1_scale"]) / 2,
                               rtol=1e-4, atol=1e-6)
    # ST-Net crops: diameter / input mpp (2 um/px); the fixed variant keeps the first side
    assert scales.loc["stnet", "crop_px"] == "50;8;1"
    assert scales.loc["stnet_fixed_px", "crop_px"] == "50;50;50"
    assert scales.loc["stnet_fixed_px", "seconds_1_scale"] == scales.loc["stnet",
                                                                         "seconds_1_scale"]

    dense = table[table["benchmark"] == "dense"]
    assert list(dense["amp"]) == ["off"]  # CPU: no autocast row
    row = dense.iloc[0]
    assert row["seconds"] > 0 and row["tissue_mm2"] > 0 and row["n_model_tiles"] > 0
    assert row["map_covered_mm2"] >= row["tissue_mm2"] * 0.99
    np.testing.assert_allclose(row["mm2_per_s"], row["tissue_mm2"] / row["seconds"], rtol=1e-4)
    assert row["peak_rss_mib"] > row["rss_growth_mib"] > 0
    assert np.isnan(row["cuda_peak_mib"])

    md = md_path.read_text()
    assert "python benchmarks/pixnet_cost.py --quick --threads 1" in md
    assert "| pixnet |" in md and "torch threads | 1 |" in md


def test_pixnet_cost_rejects_bad_options(pixnet_cost):
    for argv in (["--methods", "stnet"], ["--scales-um", "100,100"], ["--methods", "foo"]):
        with pytest.raises(SystemExit):
            pixnet_cost.parse_args(argv)


def _load(name: str):
    """Import a benchmark script as its own command line would: with benchmarks/ importable, as
    it is for ``python benchmarks/NAME.py`` (the scripts share helpers such as tiling's
    ``write_slide``)."""
    path = SCRIPT.with_name(f"{name}.py")
    if str(SCRIPT.parent) not in sys.path:
        sys.path.append(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_whole_slide_quick(tmp_path):
    """Tiling, dense map and five spot tables on a tiny slide: every stage timed, throughput =
    tissue area / seconds, the total sums the stages, the md names the command and the load."""
    whole_slide = _load("whole_slide")
    try:
        table = whole_slide.main(["--quick", "--threads", "1", "--cpu-bf16", "false",
                                  "--out-dir", str(tmp_path / "out")])
    finally:
        sys.modules.pop("whole_slide", None)
    parts = table["part"].fillna(False).astype(bool)
    stages, per_table = table[~parts].iloc[:-1], table[parts]
    floor = "encoder floor (1 pass per tissue px)"
    tables = "tables (5 scales, one read of the map)"
    assert list(stages["stage"]) == ["tiling (index only)", floor, "dense_map", tables]
    assert list(per_table["stage"].str.strip()) == ["spots 100 um", "spots 55 um", "bins 16 um",
                                                    "bins 8 um", "bins 2 um"]
    assert (table.iloc[:-1]["seconds"] > 0).all() and (table.iloc[:-1]["items"] > 0).all()
    assert (stages["peak_rss_mib"] > 0).all()
    np.testing.assert_allclose(table["mm2_per_s"], table["tissue_mm2"] / table["seconds"])
    np.testing.assert_allclose(table["x_floor"],
                               table["seconds"] / stages.set_index("stage")["seconds"][floor])
    total = table.iloc[-1]
    np.testing.assert_allclose(total["seconds"], stages["seconds"].sum()
                               - stages.set_index("stage")["seconds"][floor])
    assert total["peak_rss_mib"] == stages["peak_rss_mib"].max()
    # the tables' own seconds are parts of the tables stage; their rows sum the stage's items
    assert per_table["seconds"].sum() <= stages.set_index("stage")["seconds"][tables]
    assert per_table["items"].sum() == stages.set_index("stage")["items"][tables]
    # every lattice point over the tissue: 2 um bins are 16 per 8 um bin, and far more than
    # the touching 100 um discs
    items = per_table.assign(stage=per_table["stage"].str.strip()).set_index("stage")["items"]
    assert items["spots 100 um"] < items["bins 16 um"] < items["bins 8 um"] < items["bins 2 um"]
    assert 12 * items["bins 8 um"] < items["bins 2 um"] <= 16 * items["bins 8 um"] * 1.2
    assert (per_table["file_mib"] > 0).all()
    md = (tmp_path / "out" / "whole_slide.md").read_text()
    assert "python benchmarks/whole_slide.py --quick" in md and "load average" in md
    assert "autocast None" in md and not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.slow
def test_bin_table_memory_quick(tmp_path):
    """Streamed bin tables of two sizes: every bin of the square written, the peak RSS and the
    file recorded, the md names the command."""
    bins = _load("bin_table_memory")
    try:
        table = bins.main(["--quick", "--out-dir", str(tmp_path / "out")])
    finally:
        sys.modules.pop("bin_table_memory", None)
    assert list(table["target_bins"]) == [20_000, 80_000]
    # a square of side sqrt(N) bins: whole bins whose centre lies in it
    side = np.sqrt(table["target_bins"])
    assert ((table["items"] >= (side - 1) ** 2) & (table["items"] <= (side + 1) ** 2)).all()
    assert (table["peak_rss_mib"] > 0).all() and (table["file_mib"] > 0).all()
    md = (tmp_path / "out" / "bin_table_memory.md").read_text()
    assert "python benchmarks/bin_table_memory.py --quick" in md


def test_cpu_bf16_quick(tmp_path):
    """The bf16 / batched-chains benchmark runs; batched fp32 chains equal sequential ones."""
    cpu_bf16 = _load("cpu_bf16")
    try:
        cpu_bf16.main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        sys.modules.pop("cpu_bf16", None)
    table = pd.read_csv(tmp_path / "cpu_bf16.csv").set_index(["benchmark", "case"])
    # batched and sequential chains sum in other orders (other CPUs pick other kernels): the
    # bound from float32, the demo network's longest dot product and its 20 sampler steps
    from histomap.models.diffst import DiffST
    from tolerances import reordering_atol

    atol = reordering_atol(DiffST(8, **cpu_bf16.DEMO_DIFFST), evaluations=20)  # --sr-genes 8
    assert table.loc[("sr", "batched fp32"), "max_abs_diff"] <= atol
    dense = table.loc["dense"]
    assert len(dense) == 5 and (dense["max_abs_diff"] > 0).all()   # bf16 really ran
    assert (dense["median_pcc"] > 0.9).all()   # (min over genes is noisy with 3-4 spots)
    assert (table.loc["cigc", "graph_mix_s"] > 0).all()


def test_generalisation_ratios_by_hand(tmp_path):
    """benchmarks/generalisation.py on a two-model, two-fold toy run: PCC@M per fold kind from
    the held-out section's rows only, cross / within, and val / train loss at the epoch of the
    lowest validation loss; the `mean` baseline (PCC 0) is left out; a missing run is an error."""
    gen = _load("generalisation")
    try:
        rows = []
        for model, within, cross in [("a", 0.4, 0.1), ("b", 0.2, 0.2), ("mean", 0.0, 0.0)]:
            for fold, kind, v in [("C2", "within_patient", within), ("B4", "cross_patient", cross)]:
                for seed in (0, 1):
                    rows.append(dict(task="spot", dataset="t", model=model, fold=fold,
                                     fold_kind=kind, seed=seed, sample=fold, scale_um=100.0,
                                     gene_set="g", metric="PCC@M", value=v + 0.01 * seed))
                    # another section's rows and other metrics must not count
                    rows.append({**rows[-1], "sample": "X", "value": 9.0})
                    rows.append({**rows[-2], "metric": "MSE", "value": 9.0})
                    log = tmp_path / "results" / "models" / model / fold / f"seed{seed}"
                    log.mkdir(parents=True)
                    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.0, 0.5],
                                  "val_loss": [3.0, 1.5, 2.0]}).to_csv(log / "train_log.csv")
        (tmp_path / "results" / "report").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(tmp_path / "results" / "report" / "benchmark.csv", index=False)
        assert gen.main(["--results", str(tmp_path / "results"), "--out-dir",
                         str(tmp_path / "out")]) == 0
        t = pd.read_csv(tmp_path / "out" / "generalisation.csv", index_col=0)
        assert list(t.index) == ["a", "b"]
        assert t.loc["a", "within_pcc"] == pytest.approx(0.405)
        assert t.loc["a", "cross_over_within"] == pytest.approx(0.105 / 0.405)
        assert t.loc["b", "val_over_train_cross"] == pytest.approx(1.5)   # epoch 2: 1.5 / 1.0
        assert t.loc["b", "best_epoch_within"] == 2
        assert "| a |" in (tmp_path / "out" / "generalisation.md").read_text()
        assert gen.main(["--results", str(tmp_path / "none"), "--out-dir",
                         str(tmp_path / "o2")]) == 2
    finally:
        sys.modules.pop("generalisation", None)


def test_feature_shift_by_hand():
    """benchmarks/feature_shift.py: the standardised mean difference of two tiny samples, a spot
    square and a disc averaged on a level's grid, and the between / within-patient table."""
    fs = _load("feature_shift")
    try:
        a = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])    # channel 3 constant in both
        b = np.array([[4.0, 1.0, 5.0], [6.0, 3.0, 5.0]])
        # channel 1: |1 - 5| / sqrt((2 + 2) / 2) = 2.83; channel 2: 0; channel 3 left out
        assert fs.shift(a, b) == pytest.approx((4 / np.sqrt(2) + 0) / 2)

        class Cache:                                       # one level, stride 2, 1 um/px
            path, mpp, strides, origin = "c", 1.0, [2], np.array([0, 0])
            levels = [np.arange(100, dtype=np.float16).reshape(1, 10, 10)]
        # a 4 um square at slide pixel (9, 9) of a 0.5 um/px slide: centre 2.25, half-side 1 in
        # level cells (2 um), so [1.25, 3.25] on both axes; cells 1, 2, 3 overlap it by 0.75,
        # 1 and 0.25: mean index 1.75, and a cell holds 10 x row + column
        (m,) = fs.spot_level_means(Cache(), np.array([[9.0, 9.0]]), 0.5, 4.0, square=True)
        assert m.shape == (1, 1) and m[0, 0] == pytest.approx(17.5 + 1.75, abs=1e-4)
        # a disc of radius 1 cell centred on the corner shared by cells (1, 1), (1, 2), (2, 1)
        # and (2, 2) (slide pixel 8 -> 2.0) puts a quarter of its area in each
        (d,) = fs.spot_level_means(Cache(), np.array([[8.0, 8.0]]), 0.5, 4.0)
        assert d[0, 0] == pytest.approx((11 + 12 + 21 + 22) / 4, abs=1e-3)
        with pytest.raises(ValueError, match="outside"):
            fs.spot_level_means(Cache(), np.array([[-40.0, 9.0]]), 0.5, 4.0)

        feats = {"B1": [a], "C1": [b], "C2": [b + 1.0]}
        t = fs.shift_table(feats, {"B1": "B", "C1": "C", "C2": "C"}, ["x"])
        within = fs.shift(b, b + 1.0)
        between = (fs.shift(a, b) + fs.shift(a, b + 1.0)) / 2
        assert t.loc["x", "within_patient"] == pytest.approx(within)
        assert t.loc["x", "between_patients"] == pytest.approx(between)
        assert t.loc["x", "ratio"] == pytest.approx(between / within)
    finally:
        sys.modules.pop("feature_shift", None)


def test_error_decomposition_reads_a_run(tmp_path):
    """benchmarks/error_decomposition.py on a tiny results tree: offset and spot-to-spot parts
    of a prediction that is the truth shifted by 1 in one gene and noisy in another."""
    import anndata as ad

    spec = importlib.util.spec_from_file_location(
        "error_decomposition", SCRIPT.parent / "error_decomposition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    spots, genes = [f"s{i}" for i in range(30)], ["g0", "g1", "g2"]
    y = rng.normal(size=(30, 3))
    noise = rng.normal(size=30)
    pred = y + np.array([1.0, 0.0, 0.0])
    pred[:, 1] += noise
    results = tmp_path / "results"
    for rel, x in (("st/S1.h5ad", y), ("predictions/m/F1/seed0/S1/spots_55um.h5ad", pred)):
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame(index=spots),
                   var=pd.DataFrame(index=genes)).write_h5ad(results / rel)
    (results / "genes" / "top3").mkdir(parents=True)
    pd.DataFrame({"gene": genes, "rank": [1, 2, 3]}).to_csv(
        results / "genes" / "top3" / "F1.tsv", sep="\t", index=False)
    table = module.main(["--results", str(results), "--models", "m", "--out",
                         str(tmp_path / "out" / "dec")])
    row = table.iloc[0]
    n = noise.astype(np.float32).astype(np.float64)
    # float32 storage of values of order 1: relative error ~ float32 eps
    tol = 8 * float(np.finfo(np.float32).eps)
    assert row["offset"] == pytest.approx((1.0 + n.mean() ** 2) / 3, rel=tol)
    assert row["spot_to_spot"] == pytest.approx(n.var() / 3, rel=tol)
    assert row["mse"] == pytest.approx(row["offset"] + row["spot_to_spot"], rel=tol)
    assert (tmp_path / "out" / "dec.md").read_text().startswith("# MSE")
