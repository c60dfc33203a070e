"""Platform readers: real HER2ST sections, a tiny fake Visium outs/, and bad-input errors."""
from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from histomap.data.io import legacy_st, read_sample, visium
from histomap.data.sample import UNS_KEY
from histomap.errors import InputError

# --- real HER2ST ---------------------------------------------------------------------------------

SECTIONS = ["B4", "C2", "C3", "C4"]
MISSING_COUNTS = {"B4": 1, "C2": 0, "C3": 2, "C4": 3}  # selected spots without a counts row


@pytest.fixture(scope="module")
def her2st_samples(her2st_dir):
    return {s: read_sample("legacy_st", s, her2st_dir / s) for s in SECTIONS}


@pytest.mark.parametrize("section", SECTIONS)
def test_her2st_section_reads(section, her2st_dir, her2st_samples):
    sample = her2st_samples[section]
    spots = sample.spots
    selection = pd.read_csv(her2st_dir / section / f"{section}_selection.tsv", sep="\t")
    assert spots.n_obs == len(selection) - MISSING_COUNTS[section]
    assert 0.66 <= sample.mpp <= 0.72
    assert spots.uns[UNS_KEY]["mpp"] == sample.mpp
    assert spots.uns[UNS_KEY]["spot_diameter_um"] == 100.0
    assert all(re.fullmatch(r"\d+x\d+", name) for name in spots.obs_names)
    assert list(spots.obs_names) == [f"{x}x{y}" for x, y in
                                     zip(spots.obs["array_x"], spots.obs["array_y"])]
    assert sp.isspmatrix_csr(spots.X) and np.issubdtype(spots.X.dtype, np.integer)
    assert spots.X.nnz > 0 and spots.X.data.min() > 0
    assert spots.var_names.is_unique and spots.n_vars > 15000
    width, height = Image.open(sample.image_path).size
    xy = spots.obsm["spatial"]
    assert xy.dtype == np.float64
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < width).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] < height).all()
    # centres are the selection's pixel coordinates of the same spots
    by_name = selection.set_index(selection["x"].astype(str) + "x" + selection["y"].astype(str))
    np.testing.assert_allclose(xy, by_name.loc[spots.obs_names, ["pixel_x", "pixel_y"]])


def glass_spot_marks(image_path: Path, *, spot_px: float, reduce: int = 8) -> np.ndarray:
    """(n, 2) level-0 (x, y) centres of the array's spot marks visible on bare glass.

    The legacy ST slide shows every spot of the array as a faint dark disc; off the tissue
    they are the only structure. Dark blobs of the spot's size are the maxima of a Laplacian
    of Gaussian (sigma = radius / sqrt 2) of the image reduced ``reduce`` times, kept where the
    neighbourhood is unsaturated glass (far from the tissue) and the response is strong."""
    from scipy import ndimage

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(image_path) as img:
        width = img.width
        img.draft("RGB", (img.width // reduce, img.height // reduce))  # JPEG: decode at 1/8
        if img.width == width:
            img = img.reduce(reduce)
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert width / rgb.shape[1] == pytest.approx(reduce, rel=1e-3)
    response = ndimage.gaussian_laplace(rgb.mean(axis=2), spot_px / 2 / reduce / np.sqrt(2))
    saturation = (rgb.max(axis=2) - rgb.min(axis=2)) / np.maximum(rgb.max(axis=2), 1)
    glass = ndimage.binary_erosion(ndimage.uniform_filter(saturation, 31) < 0.12, iterations=20)
    strong = response > 0.5 * np.quantile(response[glass], 0.99)
    peaks = response == ndimage.maximum_filter(response, int(1.5 * spot_px / reduce))
    return np.argwhere(peaks & glass & strong)[:, ::-1] * reduce + (reduce - 1) / 2


@pytest.mark.parametrize("section", SECTIONS)
def test_her2st_centres_sit_on_the_array_marks_of_the_image(section, her2st_samples):
    """Independent of the selection's pixel columns: the spot marks on the glass (found in the
    image) form a lattice whose pitch is 200 um at the reader's mpp, and the reader's centres
    lie on that lattice. The marks are only used through their lattice fit, with integer
    indices assigned from the spots' array coordinates ({x}x{y} names).

    Measured on the four sections: pitch 199.9-200.5 um; the centres' mean offset from the mark
    lattice 2-12 px (1.4-8.5 um), median distance 20-23 px (the selection's refined positions
    scatter about 17 px rms around any lattice). A centre shifted by a quarter spot (36 px) or
    an mpp off by 1% fails."""
    sample = her2st_samples[section]
    xy = sample.spots.obsm["spatial"]
    spot_px = 100.0 / sample.mpp
    marks = glass_spot_marks(sample.image_path, spot_px=spot_px)
    assert len(marks) > 300, f"{section}: only {len(marks)} spot marks found on the glass"
    array_xy = np.array([[int(v) for v in name.split("x")] for name in sample.spots.obs_names],
                        dtype=np.float64)
    design = np.c_[array_xy, np.ones(len(array_xy))]
    # integer lattice indices of the marks, from the spots' array coordinates
    guess, *_ = np.linalg.lstsq(design, xy, rcond=None)
    steps = guess[:2].T
    ij = np.linalg.solve(steps, (marks - guess[2]).T).T
    near = np.hypot(*((ij - np.round(ij)) @ steps.T).T) < 0.25 * np.hypot(*guess[0])
    assert near.mean() > 0.8, f"{section}: the marks do not form the spots' lattice"
    mark_design = np.c_[np.round(ij[near]), np.ones(near.sum())]
    lattice, *_ = np.linalg.lstsq(mark_design, marks[near], rcond=None)
    pitch_um = np.hypot(lattice[:2, 0], lattice[:2, 1]) * sample.mpp
    np.testing.assert_allclose(pitch_um, 200.0, rtol=0.005)
    offset = xy - design @ lattice
    assert np.hypot(*offset.mean(axis=0)) < 0.15 * spot_px     # ~22 px, 15 um
    assert np.median(np.hypot(*offset.T)) < 0.25 * spot_px     # ~36 px, 25 um


def test_her2st_counts_match_tsv(her2st_dir, her2st_samples):
    spots = her2st_samples["C2"].spots
    raw = pd.read_csv(her2st_dir / "C2" / "C2.tsv.gz", sep="\t", index_col=0)
    expected = raw.loc[spots.obs_names, spots.var_names].to_numpy()
    np.testing.assert_array_equal(spots.X.toarray(), expected)


def test_her2st_logs_spots_without_counts(her2st_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="histomap.data.io.legacy_st"):
        legacy_st.read("C4", her2st_dir / "C4", mpp=0.69)
    assert "3 selected spots have no row in C4.tsv.gz" in caplog.text


# --- small legacy ST folders ---------------------------------------------------------------------

PX_PER_STEP = 80.0  # -> mpp 200 / 80 = 2.5
GRID = [(x, y) for y in (1, 2, 3) for x in (1, 2, 3, 4)]


def write_legacy(folder: Path, *, sample: str = "S1", spots=GRID, genes=("GA", "GB", "GC"),
                 counts: np.ndarray | None = None, count_names=None, new_xy: bool = True,
                 selected=None, image_size=(400, 300), image: bool = True,
                 counts_text: str | None = None, pixel_offset=(20.0, 30.0)) -> Path:
    """A tiny HER2ST-style section: counts TSV.gz, selection TSV, JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{x}x{y}" for x, y in spots] if count_names is None else count_names
    if counts is None:
        counts = np.arange(len(names) * len(genes)).reshape(len(names), len(genes)) % 7
    if counts_text is None:
        lines = ["\t" + "\t".join(genes)]
        lines += [name + "\t" + "\t".join(str(v) for v in row) for name, row in zip(names, counts)]
        counts_text = "\n".join(lines) + "\n"
    with gzip.open(folder / f"{sample}.tsv.gz", "wt") as fh:
        fh.write(counts_text)
    rng = np.random.default_rng(1)
    rows = []
    for i, (x, y) in enumerate(spots):
        nx, ny = x + rng.normal(0, 0.02), y + rng.normal(0, 0.02)
        row = {"x": x, "y": y, "new_x": round(nx, 3), "new_y": round(ny, 3),
               "pixel_x": round(pixel_offset[0] + PX_PER_STEP * (nx - 1), 2),
               "pixel_y": round(pixel_offset[1] + PX_PER_STEP * (ny - 1), 2),
               "selected": 1 if selected is None else selected[i]}
        if not new_xy:
            del row["new_x"], row["new_y"]
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / f"{sample}_selection.tsv", sep="\t", index=False)
    if image:
        Image.new("RGB", image_size, (230, 200, 220)).save(folder / "he.jpg")
    return folder


def test_legacy_small_reads_and_infers_mpp(tmp_path, caplog):
    folder = write_legacy(tmp_path / "S1")
    with caplog.at_level(logging.INFO, logger="histomap.data.io.legacy_st"):
        sample = legacy_st.read("S1", folder)
    assert sample.mpp == pytest.approx(200.0 / PX_PER_STEP, rel=0.02)
    assert "inferred mpp" in caplog.text
    assert sample.platform == "legacy_st" and sample.image_path == folder / "he.jpg"
    assert list(sample.spots.obs_names) == [f"{x}x{y}" for x, y in GRID]
    assert list(sample.spots.var_names) == ["GA", "GB", "GC"]
    assert sample.spots.X.dtype == np.int32
    expected = np.arange(len(GRID) * 3).reshape(len(GRID), 3) % 7
    np.testing.assert_array_equal(sample.spots.X.toarray(), expected)
    # centres: the refined array positions (new_x, new_y) through the folder's known geometry
    # (80 px per 200 um step, spot 1x1 at (20, 30) px); the selection rounds pixel_x to 0.01 px
    # and new_x to 0.001 steps (0.04 px)
    selection = pd.read_csv(folder / "S1_selection.tsv", sep="\t")
    expected = np.c_[20.0 + PX_PER_STEP * (selection["new_x"] - 1),
                     30.0 + PX_PER_STEP * (selection["new_y"] - 1)]
    np.testing.assert_allclose(sample.spots.obsm["spatial"], expected, atol=0.06)
    assert sample.spot_diameter_um == 100.0
    assert (sample.spots.obs["diameter_um"] == 100.0).all()


def test_legacy_explicit_mpp_diameter_image_and_fallback_names(tmp_path):
    folder = write_legacy(tmp_path / "sec", sample="other_name", image=False)
    image = tmp_path / "elsewhere.png"
    Image.new("RGB", (400, 300)).save(image)
    sample = legacy_st.read("S1", folder, mpp=0.5, spot_diameter_um=80, image=image)
    assert sample.mpp == 0.5 and sample.spot_diameter_um == 80.0
    assert sample.image_path == image and sample.spots.n_obs == len(GRID)


def test_legacy_keeps_only_selected_spots(tmp_path):
    selected = [1] * len(GRID)
    selected[0] = 0
    sample = legacy_st.read("S1", write_legacy(tmp_path / "S1", selected=selected))
    assert sample.spots.n_obs == len(GRID) - 1 and "1x1" not in sample.spots.obs_names


def test_legacy_partial_mismatch_logs_dropped(tmp_path, caplog):
    names = [f"{x}x{y}" for x, y in GRID]
    names[0], names[1] = "9x9", "8x8"  # two count rows without a spot, two spots without counts
    folder = write_legacy(tmp_path / "S1", count_names=names)
    with caplog.at_level(logging.WARNING, logger="histomap.data.io.legacy_st"):
        sample = legacy_st.read("S1", folder)
    assert sample.spots.n_obs == len(GRID) - 2
    assert "2 selected spots have no row in S1.tsv.gz" in caplog.text
    assert "2 count rows have no selected spot" in caplog.text
    assert "1x1" in caplog.text and "9x9" in caplog.text


def error_of(func, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        func(*args, **kwargs)
    return str(info.value)


def test_legacy_missing_image(tmp_path):
    folder = write_legacy(tmp_path / "S1", image=False)
    message = error_of(legacy_st.read, "S1", folder)
    assert str(folder) in message and "no H&E image" in message
    message = error_of(legacy_st.read, "S1", folder, image=tmp_path / "nope.jpg")
    assert "nope.jpg" in message and "does not exist" in message


def test_legacy_unreadable_image(tmp_path):
    folder = write_legacy(tmp_path / "S1", image=False)
    (folder / "he.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    message = error_of(legacy_st.read, "S1", folder)
    assert "he.jpg" in message and "cannot read image" in message


def test_legacy_no_matching_spots(tmp_path):
    folder = write_legacy(tmp_path / "S1", count_names=[f"spot{i}" for i in range(len(GRID))])
    message = error_of(legacy_st.read, "S1", folder)
    assert "S1.tsv.gz" in message and "no count row name matches" in message


def test_legacy_spots_outside_image(tmp_path):
    folder = write_legacy(tmp_path / "S1", image_size=(200, 300))  # x reaches ~260 px
    message = error_of(legacy_st.read, "S1", folder)
    assert "he.jpg" in message and "outside the 200 x 300 px image" in message
    assert "4x1" in message


def test_legacy_non_integer_counts(tmp_path):
    counts = np.ones((len(GRID), 3))
    counts[2, 1] = 1.5
    message = error_of(legacy_st.read, "S1", write_legacy(tmp_path / "S1", counts=counts))
    assert "S1.tsv.gz" in message and "integers" in message and "3x1" in message


def test_legacy_non_numeric_counts(tmp_path):
    counts = np.ones((len(GRID), 3), dtype=object)
    counts[0, 2] = "abc"
    message = error_of(legacy_st.read, "S1", write_legacy(tmp_path / "S1", counts=counts))
    assert "S1.tsv.gz" in message and "non-numeric" in message and "GC" in message


def test_legacy_negative_counts(tmp_path):
    counts = np.ones((len(GRID), 3), dtype=int)
    counts[1, 0] = -2
    message = error_of(legacy_st.read, "S1", write_legacy(tmp_path / "S1", counts=counts))
    assert "S1.tsv.gz" in message and "non-negative" in message and "2x1" in message


def test_legacy_duplicate_gene_names(tmp_path):
    folder = write_legacy(tmp_path / "S1", genes=("GA", "GB", "GA"))
    message = error_of(legacy_st.read, "S1", folder)
    assert "S1.tsv.gz" in message and "duplicate gene names: GA" in message


def test_legacy_duplicate_spot_names(tmp_path):
    names = [f"{x}x{y}" for x, y in GRID]
    names[3] = names[2]
    message = error_of(legacy_st.read, "S1", write_legacy(tmp_path / "S1", count_names=names))
    assert "S1.tsv.gz" in message and f"duplicate spot names: {names[2]}" in message


def test_legacy_missing_mpp_when_not_inferable(tmp_path):
    folder = write_legacy(tmp_path / "S1", new_xy=False)
    message = error_of(legacy_st.read, "S1", folder)
    assert "S1_selection.tsv" in message and "missing mpp" in message
    assert legacy_st.read("S1", folder, mpp=2.5).mpp == 2.5
    few = write_legacy(tmp_path / "S2", sample="S2", spots=GRID[:2])
    message = error_of(legacy_st.read, "S2", few)
    assert "S2_selection.tsv" in message and "missing mpp" in message


def test_legacy_missing_files_and_bad_mpp(tmp_path):
    folder = write_legacy(tmp_path / "S1")
    (folder / "S1_selection.tsv").unlink()
    message = error_of(legacy_st.read, "S1", folder)
    assert str(folder) in message and "no spot selection file S1_selection.tsv" in message
    message = error_of(legacy_st.read, "S1", tmp_path / "absent")
    assert "absent" in message and "does not exist" in message
    good = write_legacy(tmp_path / "S2", sample="S2")
    message = error_of(legacy_st.read, "S2", good, mpp=-1)
    assert str(good) in message and "mpp must be a positive number" in message


# --- fake Visium outs/ ---------------------------------------------------------------------------

BARCODES = ["AAAC-1", "AAAG-1", "AACT-1", "AAGG-1", "ACGT-1"]
SYMBOLS = ["GA", "GB", "GA", "GD"]  # duplicate symbol, as 10x files have
DIAMETER_PX = 50.0  # -> mpp 55 / 50 = 1.1


def write_h5(path: Path, dense: np.ndarray, barcodes, symbols, types=None) -> None:
    """10x HDF5 layout: CSC matrix features x barcodes under /matrix."""
    csc = sp.csc_matrix(dense.T)  # features x barcodes, one column per barcode
    types = types or ["Gene Expression"] * len(symbols)
    with h5py.File(path, "w") as h5:
        m = h5.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        f = m.create_group("features")
        f.create_dataset("name", data=np.array(symbols, dtype="S"))
        f.create_dataset("id", data=np.array([f"ENSG{i:05d}" for i in range(len(symbols))],
                                             dtype="S"))
        f.create_dataset("feature_type", data=np.array(types, dtype="S"))
        f.create_dataset("genome", data=np.array(["GRCh38"] * len(symbols), dtype="S"))


def positions_table() -> pd.DataFrame:
    """Five matrix barcodes (the last off tissue) plus one in-tissue spot not in the matrix."""
    return pd.DataFrame({
        "barcode": BARCODES + ["TTTT-1"],
        "in_tissue": [1, 1, 1, 1, 0, 1],
        "array_row": [0, 0, 1, 1, 2, 2],
        "array_col": [0, 2, 1, 3, 0, 2],
        "pxl_row_in_fullres": [10.0, 10.0, 60.5, 60.5, 110.0, 110.0],
        "pxl_col_in_fullres": [20.0, 120.0, 70.0, 170.25, 20.0, 120.0],
    })


def write_visium(outs: Path, variant: str = "csv", *, dense=None, image_size=(200, 150),
                 scalefactors=True, types=None) -> tuple[Path, Path]:
    """A tiny Space Ranger outs/ folder and a full-resolution PNG; returns (outs, image)."""
    (outs / "spatial").mkdir(parents=True)
    if dense is None:
        dense = np.arange(len(BARCODES) * len(SYMBOLS)).reshape(len(BARCODES), -1) % 5
    write_h5(outs / "filtered_feature_bc_matrix.h5", dense, BARCODES, SYMBOLS, types)
    table = positions_table()
    if variant == "csv":
        table.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    elif variant == "list":
        table.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    else:
        table.to_parquet(outs / "spatial" / "tissue_positions.parquet", index=False)
    if scalefactors:
        (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
            {"spot_diameter_fullres": DIAMETER_PX, "tissue_hires_scalef": 0.5,
             "fiducial_diameter_fullres": 80.0, "tissue_lowres_scalef": 0.15}))
    Image.new("RGB", (100, 75)).save(outs / "spatial" / "tissue_hires_image.png")
    image = outs.parent / "fullres.png"
    Image.new("RGB", image_size, (240, 220, 230)).save(image)
    return outs, image


@pytest.mark.parametrize("variant", ["csv", "list", "parquet"])
def test_visium_reads(tmp_path, variant, caplog):
    if variant == "parquet":
        pytest.importorskip("pyarrow")
    outs, image = write_visium(tmp_path / "outs", variant)
    with caplog.at_level(logging.INFO, logger="histomap.data.io.visium"):
        sample = read_sample("visium", "V1", tmp_path, image=image)  # parent of outs/ works too
    spots = sample.spots
    assert list(spots.obs_names) == BARCODES[:4]  # off-tissue ACGT-1 dropped
    assert sample.mpp == pytest.approx(55.0 / DIAMETER_PX)
    assert sample.spot_diameter_um == 55.0 and sample.image_path == image
    table = positions_table().set_index("barcode").loc[BARCODES[:4]]
    np.testing.assert_allclose(spots.obsm["spatial"][:, 0], table["pxl_col_in_fullres"])
    np.testing.assert_allclose(spots.obsm["spatial"][:, 1], table["pxl_row_in_fullres"])
    np.testing.assert_array_equal(spots.obs["array_row"], table["array_row"])
    assert list(spots.var_names) == ["GA", "GB", "GA-1", "GD"]
    assert list(spots.var["gene_ids"]) == [f"ENSG{i:05d}" for i in range(4)]
    dense = np.arange(len(BARCODES) * len(SYMBOLS)).reshape(len(BARCODES), -1) % 5
    assert sp.isspmatrix_csr(spots.X) and spots.X.dtype == np.int32
    np.testing.assert_array_equal(spots.X.toarray(), dense[:4])
    assert "1 duplicate gene symbols renamed" in caplog.text
    assert "1 barcodes are not under tissue" in caplog.text
    assert "1 in-tissue spots have no column" in caplog.text and "TTTT-1" in caplog.text


def test_visium_explicit_mpp_and_non_gene_features(tmp_path, caplog):
    types = ["Gene Expression", "Gene Expression", "Antibody Capture", "Gene Expression"]
    outs, image = write_visium(tmp_path / "outs", scalefactors=False, types=types)
    with caplog.at_level(logging.INFO, logger="histomap.data.io.visium"):
        sample = visium.read("V1", outs, mpp=0.25, image=image)
    assert sample.mpp == 0.25 and list(sample.spots.var_names) == ["GA", "GB", "GD"]
    assert "dropped 1 non gene-expression features" in caplog.text


def test_visium_without_image(tmp_path):
    outs, _ = write_visium(tmp_path / "outs")
    message = error_of(visium.read, "V1", outs)
    assert str(outs) in message and "full-resolution H&E" in message


def test_visium_missing_mpp(tmp_path):
    outs, image = write_visium(tmp_path / "outs", scalefactors=False)
    message = error_of(visium.read, "V1", outs, image=image)
    assert "scalefactors_json.json" in message and "missing mpp" in message


def test_visium_spots_outside_image(tmp_path):
    outs, image = write_visium(tmp_path / "outs", image_size=(100, 75))  # the hires size
    message = error_of(visium.read, "V1", outs, image=image)
    assert "fullres.png" in message and "outside the 100 x 75 px image" in message


def test_visium_negative_and_non_integer_counts(tmp_path):
    dense = np.ones((len(BARCODES), len(SYMBOLS)), dtype=np.int32)
    dense[1, 1] = -3
    outs, image = write_visium(tmp_path / "a" / "outs", dense=dense)
    message = error_of(visium.read, "V1", outs, image=image)
    assert "filtered_feature_bc_matrix.h5" in message and "non-negative" in message
    path = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "r+") as h5:
        data = h5["matrix/data"][:].astype(np.float64)
        data[0] = 0.5
        del h5["matrix/data"]
        h5["matrix/data"] = data
    message = error_of(visium.read, "V1", outs, image=image)
    assert "filtered_feature_bc_matrix.h5" in message and "integers" in message


def test_visium_no_matching_barcodes(tmp_path):
    outs, image = write_visium(tmp_path / "outs")
    table = positions_table().assign(barcode=[f"X{i}-1" for i in range(6)])
    table.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    message = error_of(visium.read, "V1", outs, image=image)
    assert "filtered_feature_bc_matrix.h5" in message and "no barcode matches" in message
