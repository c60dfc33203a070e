"""Xenium reader: the real 10x breast crop, small hand-made folders, and bad-input errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from histomap.data.io import read_sample, xenium
from histomap.data.sample import UNS_KEY
from histomap.errors import InputError

CROP_MPP = 0.2125
CROP_SIZE = (2400, 1800)  # (width, height) px of morphology_mip_small.tif


# --- the real crop -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crop_table(xenium_crop_dir) -> pd.DataFrame:
    return pd.read_csv(xenium_crop_dir / "transcripts_small.csv", index_col=0)


@pytest.fixture(scope="module")
def crop(xenium_crop_dir):
    return read_sample("xenium", "crop", xenium_crop_dir, mpp=CROP_MPP)


def _expected_kept(table: pd.DataFrame) -> pd.DataFrame:
    control = table["feature_name"].map(lambda f: xenium.control_category(f) is not None)
    return table[(table["qv"] >= 20) & ~control]


def test_crop_transcripts_and_genes(crop, crop_table):
    kept = _expected_kept(crop_table)
    assert len(kept) == len(crop_table) == 186_146  # README: every row has qv >= 20
    info = crop.highres.uns["xenium"]
    assert info["n_transcripts_read"] == len(crop_table)
    assert info["n_transcripts_kept"] == len(kept)
    genes = sorted(kept["feature_name"].unique())
    assert crop.highres.n_vars == crop.spots.n_vars == len(genes) == 313
    assert list(crop.highres.var_names) == genes
    # total counts of the 2 um bins == kept transcripts, gene by gene
    per_gene = np.asarray(crop.highres.X.sum(axis=0)).ravel()
    np.testing.assert_array_equal(per_gene, kept["feature_name"].value_counts()[genes].to_numpy())
    assert crop.highres.obs["n_points"].sum() == len(kept)


def test_crop_geometry(crop):
    assert crop.mpp == CROP_MPP and crop.platform == "xenium"
    assert crop.spots.uns[UNS_KEY]["mpp"] == CROP_MPP
    assert crop.highres.uns["xenium"]["origin_um"] == [1062.0, 212.0]
    for adata in (crop.highres, crop.spots):
        xy = adata.obsm["spatial"]
        assert xy.dtype == np.float64
        assert (xy >= 0).all()
        assert (xy[:, 0] < CROP_SIZE[0]).all() and (xy[:, 1] < CROP_SIZE[1]).all()
    bins = crop.highres
    assert (bins.obs["diameter_um"] == 2.0).all()
    side = 2.0 / CROP_MPP
    np.testing.assert_allclose(bins.obsm["spatial"], np.column_stack(
        [(bins.obs["col"] + 0.5) * side, (bins.obs["row"] + 0.5) * side]))


def test_crop_alignment_puts_nuclear_transcripts_on_dapi(crop, crop_table, xenium_crop_dir):
    """With the inferred origin, transcripts flagged as in a nucleus sit on bright DAPI; moving
    the transcripts by 10 um destroys that contrast."""
    dapi = tifffile.imread(xenium_crop_dir / "morphology_mip_small.tif").astype(np.float64)
    ox, oy = crop.highres.uns["xenium"]["origin_um"]
    nuclear = crop_table["overlaps_nucleus"].to_numpy() == 1

    def contrast(shift_um: float) -> float:
        col = ((crop_table["x_location"] - ox - shift_um) / CROP_MPP).astype(int).clip(0, 2399)
        row = ((crop_table["y_location"] - oy) / CROP_MPP).astype(int).clip(0, 1799)
        value = dapi[row.to_numpy(), col.to_numpy()]
        return value[nuclear].mean() / value[~nuclear].mean()

    assert contrast(0.0) > 2.0
    assert contrast(10.0) < 1.5


def test_crop_pseudo_spots_sum_transcripts_in_discs(crop, crop_table):
    spots = crop.spots
    assert sp.isspmatrix_csr(spots.X) and np.issubdtype(spots.X.dtype, np.integer)
    assert (spots.obs["diameter_um"] == 55.0).all()
    assert spots.uns[UNS_KEY]["spot_diameter_um"] == 55.0
    assert ((spots.obs["array_row"] + spots.obs["array_col"]) % 2 == 0).all()
    xy = spots.obsm["spatial"]
    # neighbours on a row are 100 um apart
    same_row = spots.obs["array_row"].to_numpy() == spots.obs["array_row"].iloc[0]
    np.testing.assert_allclose(np.diff(np.sort(xy[same_row, 0])) * CROP_MPP, 100.0)
    ox, oy = crop.highres.uns["xenium"]["origin_um"]
    t_xy = np.column_stack([crop_table["x_location"] - ox, crop_table["y_location"] - oy])
    genes = list(spots.var_names)
    for i in (0, len(xy) // 2, len(xy) - 1):
        inside = np.hypot(*(t_xy - xy[i] * CROP_MPP).T) <= 27.5
        expected = crop_table["feature_name"][inside].value_counts().reindex(genes, fill_value=0)
        np.testing.assert_array_equal(spots.X[i].toarray().ravel(), expected.to_numpy())
    assert spots.obs["n_transcripts"].sum() == spots.X.sum()


def test_crop_needs_mpp(xenium_crop_dir):
    with pytest.raises(InputError, match="missing mpp") as err:
        xenium.read("crop", xenium_crop_dir)
    assert "morphology_mip_small.tif" in str(err.value)


# --- hand-made folders ---------------------------------------------------------------------------

MPP = 0.5
IMAGE_WH = (200, 120)  # px: 100 x 60 um


def _image(path: Path, *, resolution: bool = False, ome: bool = False) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, (IMAGE_WH[1], IMAGE_WH[0]), dtype=np.uint16)
    if ome:
        tifffile.imwrite(path, img, ome=True, metadata={"axes": "YX", "PhysicalSizeX": MPP,
                                                        "PhysicalSizeXUnit": "µm",
                                                        "PhysicalSizeY": MPP,
                                                        "PhysicalSizeYUnit": "µm"})
    elif resolution:
        tifffile.imwrite(path, img, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    else:
        tifffile.imwrite(path, img)
    return path


def _transcripts(n: int = 400, seed: int = 1, offset=(0.0, 0.0)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    features = np.array(["ERBB2", "KRT8", "PTPRC", "NegControlProbe_00042", "BLANK_0007",
                         "antisense_ERBB2", "Intergenic_Region_12", "UnassignedCodeword_0003",
                         "DeprecatedCodeword_0001", "NegControlCodeword_0500"])
    return pd.DataFrame({
        "transcript_id": np.arange(n) + 10**14, "cell_id": rng.integers(-1, 50, n),
        "overlaps_nucleus": rng.integers(0, 2, n),
        "feature_name": features[rng.integers(0, len(features), n)],
        "x_location": offset[0] + rng.uniform(0, 99.9, n),
        "y_location": offset[1] + rng.uniform(0, 59.9, n),
        "z_location": rng.uniform(5, 20, n), "qv": rng.choice([10.0, 19.9, 20.0, 40.0], n)})


def _folder(tmp_path: Path, table: pd.DataFrame, *, name: str = "transcripts.csv",
            **image) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        table.to_parquet(tmp_path / name, index=False)
    else:
        table.to_csv(tmp_path / name)  # 10x CSVs carry a leading unnamed index column
    _image(tmp_path / "morphology_mip.tif", **image)
    return tmp_path


@pytest.mark.parametrize("name", ["transcripts.csv", "transcripts.csv.gz", "transcripts.parquet"])
def test_filters_qv_and_controls_with_logged_counts(tmp_path, caplog, name):
    table = _transcripts()
    folder = _folder(tmp_path, table, name=name)
    with caplog.at_level(logging.INFO, logger="histomap.data.io.xenium"):
        sample = xenium.read("toy", folder, mpp=MPP)
    genes = ["ERBB2", "KRT8", "PTPRC"]
    assert list(sample.highres.var_names) == genes
    kept = table[table["feature_name"].isin(genes) & (table["qv"] >= 20)]
    assert sample.highres.X.sum() == len(kept) == sample.highres.uns["xenium"]["n_transcripts_kept"]
    dropped = sample.highres.uns["xenium"]["dropped"]
    low_qv = int((table["feature_name"].isin(genes) & (table["qv"] < 20)).sum())
    assert dropped["qv < 20"] == low_qv
    for prefix, category in [("NegControlProbe_", "negative control probe"),
                             ("BLANK_", "blank codeword"), ("antisense_", "antisense probe"),
                             ("Intergenic", "intergenic probe"),
                             ("UnassignedCodeword_", "unassigned codeword"),
                             ("DeprecatedCodeword_", "deprecated codeword"),
                             ("NegControlCodeword_", "negative control codeword")]:
        n = int(table["feature_name"].str.startswith(prefix).sum())
        assert dropped[category] == n
        assert f"{n} {category}" in caplog.text
    assert f"{low_qv} qv < 20" in caplog.text


def test_min_qv_is_configurable(tmp_path):
    table = _transcripts()
    sample = xenium.read("toy", _folder(tmp_path, table), mpp=MPP, min_qv=0)
    genes = table["feature_name"].isin(["ERBB2", "KRT8", "PTPRC"])
    assert sample.highres.X.sum() == int(genes.sum())


@pytest.mark.parametrize("kind", ["resolution", "ome"])
def test_mpp_from_image_metadata(tmp_path, kind):
    folder = _folder(tmp_path, _transcripts(), **{kind: True})
    sample = xenium.read("toy", folder)
    assert sample.mpp == pytest.approx(MPP, rel=1e-6)


def test_origin_default_inferred_and_alignment_json(tmp_path, caplog):
    table = _transcripts(offset=(1000.0, 500.0))
    table.loc[0, ["x_location", "y_location"]] = [1000.3, 500.4]  # the smallest coordinates
    folder = _folder(tmp_path / "inferred", table)
    with caplog.at_level(logging.WARNING, logger="histomap.data.io.xenium"):
        sample = xenium.read("toy", folder, mpp=MPP)
    assert sample.highres.uns["xenium"]["origin_um"] == [1000.0, 500.0]
    assert "INFERRED" in caplog.text and "(1000, 500)" in caplog.text
    # an explicit origin wins and is not logged as inferred
    folder = _folder(tmp_path / "explicit", table)
    (folder / "alignment.json").write_text(json.dumps({"origin_um": [999.5, 499.0]}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histomap.data.io.xenium"):
        sample = xenium.read("toy", folder, mpp=MPP)
    assert "INFERRED" not in caplog.text
    assert sample.highres.uns["xenium"]["origin_source"] == "alignment.json"
    kept = table[table["feature_name"].isin(["ERBB2", "KRT8", "PTPRC"]) & (table["qv"] >= 20)]
    first_px = (kept[["x_location", "y_location"]].to_numpy() - [999.5, 499.0]) / MPP
    # the bins holding the transcripts moved with the origin
    bins = sample.highres
    side = 2.0 / MPP
    expected = {f"bin_{int(y // side)}x{int(x // side)}" for x, y in first_px}
    assert set(bins.obs_names) == expected
    # no shift needed: origin (0, 0)
    sample = xenium.read("toy", _folder(tmp_path / "zero", _transcripts()), mpp=MPP)
    assert sample.highres.uns["xenium"]["origin_um"] == [0.0, 0.0]


def test_pseudo_spot_size_is_configurable(tmp_path):
    big = np.random.default_rng(3)
    n = 3000
    table = pd.DataFrame({"feature_name": big.choice(["A", "B"], n),
                          "x_location": big.uniform(0, 99.9, n),
                          "y_location": big.uniform(0, 59.9, n), "qv": 30.0})
    folder = _folder(tmp_path, table)
    sample = xenium.read("toy", folder, mpp=MPP, spot_diameter_um=20, spot_pitch_um=25)
    assert (sample.spots.obs["diameter_um"] == 20).all()
    xy_um = sample.spots.obsm["spatial"] * MPP
    for i in range(sample.spots.n_obs):
        dist = np.hypot(table["x_location"] - xy_um[i, 0], table["y_location"] - xy_um[i, 1])
        inside = dist <= 10
        assert sample.spots.X[i].sum() == inside.sum()


# --- bad input -----------------------------------------------------------------------------------

def test_missing_transcripts_file(tmp_path):
    _image(tmp_path / "morphology_mip.tif")
    with pytest.raises(InputError, match="transcripts file not found") as err:
        xenium.read("toy", tmp_path, mpp=MPP)
    assert str(tmp_path) in str(err.value)


def test_missing_mpp(tmp_path):
    folder = _folder(tmp_path, _transcripts())
    with pytest.raises(InputError, match="missing mpp") as err:
        xenium.read("toy", folder)
    assert "morphology_mip.tif" in str(err.value)


def test_missing_image(tmp_path):
    _transcripts().to_csv(tmp_path / "transcripts.csv")
    with pytest.raises(InputError, match="no morphology image"):
        xenium.read("toy", tmp_path, mpp=MPP)


@pytest.mark.parametrize("value, problem", [(-3.0, "negative x_location"),
                                            (np.nan, "missing or non-numeric")])
def test_bad_coordinates(tmp_path, value, problem):
    table = _transcripts()
    table.loc[5, "x_location"] = value
    folder = _folder(tmp_path, table)
    with pytest.raises(InputError, match=problem) as err:
        xenium.read("toy", folder, mpp=MPP)
    assert "transcripts.csv" in str(err.value) and "data row 6" in str(err.value)


def test_missing_column(tmp_path):
    folder = _folder(tmp_path, _transcripts().drop(columns="y_location"))
    with pytest.raises(InputError, match="lacks column.*y_location") as err:
        xenium.read("toy", folder, mpp=MPP)
    assert "transcripts.csv" in str(err.value)


def test_transcripts_that_do_not_fit_the_image(tmp_path):
    table = _transcripts()
    table["x_location"] *= 3  # spans 300 um: a wrong mpp or image
    with pytest.raises(InputError, match="does not fit") as err:
        xenium.read("toy", _folder(tmp_path, table), mpp=MPP)
    assert "transcripts.csv" in str(err.value)
