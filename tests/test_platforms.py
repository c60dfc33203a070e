"""Platforms users have now: Visium HD (square bins), HEST-1k samples, Xenium with its H&E, and
Visium as published (hires/lowres only). Synthetic sections are written in each platform's layout
(histomap.data.write_layouts) and read both by histomap's readers and by spatialdata-io's (a
reader this project did not write); the Visium reader is checked on a real Space Ranger folder
against scanpy.read_visium."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import SHARED_DATA
from histomap.data.ingest import ingest_sample
from histomap.data.io import hest, read_sample, visium, visium_hd, xenium
from histomap.data.sample import UNS_KEY, square_mask
from histomap.data.write_layouts import main as write_layouts_main
from histomap.data.write_layouts import write_layout
from histomap.errors import InputError
from histomap.evaluation.scales import truth_at_scale
from histomap.models.roi import roi_aggregate, square_pixel_areas
from PIL import Image

VISIUM_FIXTURE = SHARED_DATA / "visium_heart_fixture"
SIZE = {"size_um": (300.0, 300.0), "mpp": 0.5, "n_genes": 60, "tissue_margin_um": 20.0}
DATASET_SEED = 0  # one biology for every section written here, as in the configs


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """The synthetic layouts of one simulated section (seed 3) and, for the two-sample sheets of
    the workflow test, of a second one (seed 4), written once; both with one dataset seed."""
    root = tmp_path_factory.mktemp("layouts")
    for layout in ("visium_hd", "visium", "hest", "xenium"):
        write_layout(layout, root / layout / "S3", seed=3, dataset_seed=DATASET_SEED,
                     **SIZE)
    for layout in ("visium_hd", "visium", "hest"):
        write_layout(layout, root / layout / "S4", seed=4, dataset_seed=DATASET_SEED,
                     **SIZE)
    return root


# --------------------------------------------------------------------------- square ROI

def test_square_pixel_areas_are_exact():
    centres = torch.tensor([[2.0, 3.0], [2.5, 2.5], [1.3, 4.7]], dtype=torch.float64)
    half = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    areas, cols, rows = square_pixel_areas(centres, half, 2)
    np.testing.assert_allclose(areas.sum(dim=(1, 2)).numpy(), (2 * half) ** 2.0)
    # square [1, 3] x [2, 4] on the grid: four whole pixels, columns 1-2, rows 2-3
    whole = {(int(rows[0, i]), int(cols[0, j])): float(areas[0, i, j])
             for i in range(5) for j in range(5) if areas[0, i, j] > 0}
    assert whole == {(2, 1): 1.0, (2, 2): 1.0, (3, 1): 1.0, (3, 2): 1.0}
    # a unit square centred on a pixel centre lies in that one pixel
    assert float(areas[1].max()) == pytest.approx(1.0)


def test_roi_aggregate_square_matches_supersampling():
    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.random((1, 2, 12, 12)))
    centres = torch.tensor([[[5.3, 6.1], [4.0, 4.0], [7.7, 3.2]]], dtype=torch.float64)
    radii = torch.tensor([[2.2, 1.0, 0.4]], dtype=torch.float64)
    got = roi_aggregate(g, centres, radii, mode="mean", square=True)[0].numpy()
    # brute force: 200 x 200 sub-samples per unit of each square
    for n in range(3):
        (cx, cy), h = centres[0, n].numpy(), float(radii[0, n])
        s = np.linspace(-h, h, 401)[:-1] + h / 400
        xx, yy = np.meshgrid(cx + s, cy + s)
        values = g[0].numpy()[:, np.floor(yy).astype(int), np.floor(xx).astype(int)]
        np.testing.assert_allclose(got[n], values.mean(axis=(1, 2)), rtol=2e-3)
    discs = roi_aggregate(g, centres, radii, mode="mean")[0].numpy()
    assert not np.allclose(discs[0], got[0])  # the shape changes the read-out
    mixed = roi_aggregate(g, centres, radii, mode="mean",
                          square=torch.tensor([[True, False, True]]))[0].numpy()
    np.testing.assert_allclose(mixed[[0, 2]], got[[0, 2]])
    np.testing.assert_allclose(mixed[1], discs[1])


# --------------------------------------------------------------------------- Visium HD

def bins_from_cells(cells: ad.AnnData, bin_um: float, mpp: float) -> dict[tuple, np.ndarray]:
    """Expected counts per (row, col) bin: cells summed by the bin their centre falls in."""
    xy_um = np.asarray(cells.obsm["spatial"]) * mpp
    rc = np.floor(xy_um[:, ::-1] / bin_um).astype(int)
    X = dense(cells.X)
    out: dict[tuple, np.ndarray] = {}
    for key, row in zip(map(tuple, rc), X):
        out[key] = out.get(key, 0) + row
    return out


def test_visium_hd_reads_bins_with_known_truth(layouts):
    folder = layouts / "visium_hd" / "S3"
    smp = read_sample("visium_hd", "S3", folder / "outs", image=folder / "he.tif")
    cells = ad.read_h5ad(folder / "cells_truth.h5ad")
    assert smp.mpp == 0.5 and smp.spot_diameter_um == 16.0
    assert square_mask(smp.spots).all() and smp.spots.uns[UNS_KEY]["spot_shape"] == "square"
    expected = bins_from_cells(cells, 16.0, 0.5)
    spots = smp.spots
    for i in range(spots.n_obs):
        key = (int(spots.obs["array_row"].iloc[i]), int(spots.obs["array_col"].iloc[i]))
        np.testing.assert_array_equal(dense(spots.X[i]).ravel(),
                                      expected.get(key, np.zeros(spots.n_vars)))
        centre_um = (np.array(key[::-1]) + 0.5) * 16.0
        np.testing.assert_allclose(spots.obsm["spatial"][i] * smp.mpp, centre_um)
    # every cell lies in a bin under tissue: nothing is lost at any bin size
    sizes = smp.highres.obs["bin_size_um"]
    assert sorted(sizes.unique()) == [2.0, 8.0, 16.0]
    for um in (2.0, 8.0, 16.0):
        assert dense(smp.highres[sizes == um].X).sum() == dense(cells.X).sum()


def test_visium_hd_matches_spatialdata_io(layouts):
    import spatialdata_io

    folder = layouts / "visium_hd" / "S3"
    smp = read_sample("visium_hd", "S3", folder, image=folder / "he.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium_hd(folder / "outs", load_segmentations_only=False,
                                         fullres_image_file=folder / "he.tif")
    for um in (2, 8, 16):
        ours = smp.highres[smp.highres.obs["bin_size_um"] == um]
        table = sdata.tables[f"square_{um:03d}um"]
        table = table[ours.obs_names]
        assert list(table.var_names) == list(ours.var_names)
        np.testing.assert_array_equal(dense(table.X), dense(ours.X))
        np.testing.assert_allclose(np.asarray(table.obsm["spatial"], float) * smp.mpp,
                                   ours.obsm["spatial"] * smp.mpp)
        shapes = sdata.shapes[table.obs["region"].iloc[0]]
        side_px = shapes.geometry.iloc[0].bounds[2] - shapes.geometry.iloc[0].bounds[0]
        assert side_px * smp.mpp == pytest.approx(um)
        assert (ours.obs["diameter_um"] == um).all()


def test_visium_hd_pseudo_spots_from_2um_bins(layouts):
    folder = layouts / "visium_hd" / "S3"
    smp = read_sample("visium_hd", "S3", folder, image=folder / "he.tif",
                      spot_diameter_um=60.0, spot_shape="disc")
    assert not square_mask(smp.spots).any() and smp.spot_diameter_um == 60.0
    bins = smp.highres[smp.highres.obs["bin_size_um"] == 2.0]
    xy = np.asarray(bins.obsm["spatial"])
    for i in range(smp.spots.n_obs):
        inside = np.hypot(*(xy - smp.spots.obsm["spatial"][i]).T) <= 30.0 / smp.mpp
        np.testing.assert_array_equal(dense(smp.spots.X[i]).ravel(),
                                      dense(bins.X[np.flatnonzero(inside)]).sum(axis=0))


def test_visium_hd_truth_at_scale_uses_measured_bins(layouts):
    folder = layouts / "visium_hd" / "S3"
    smp = read_sample("visium_hd", "S3", folder, image=folder / "he.tif")
    for um in (8.0, 2.0):
        truth = truth_at_scale(smp.highres, smp.spots, um, min_spacing_um=10.0,
                               preprocess={"min_counts": 1, "min_genes": 1}, path="hd")
        measured = smp.highres[smp.highres.obs["bin_size_um"] == um]
        assert set(truth.obs_names) <= set(measured.obs_names)
        assert square_mask(truth).all() and (truth.obs["diameter_um"] == um).all()
        np.testing.assert_array_equal(dense(truth.layers["counts"]),
                                      dense(measured[truth.obs_names].X))
    discs = truth_at_scale(smp.highres, smp.spots, 30.0, min_spacing_um=10.0,
                           preprocess={"min_counts": 1, "min_genes": 1}, path="hd")
    assert not square_mask(discs).any()


def copy_hd(layouts: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "hd"
    shutil.copytree(layouts / "visium_hd" / "S3", folder)
    return folder


def ingest_error(tmp_path: Path, folder: Path, image: Path, **kwargs) -> str:
    """Ingest must fail with InputError and leave no output folder."""
    out = tmp_path / "results" / "ingest" / "S3"
    with pytest.raises(InputError) as err:
        ingest_sample(platform=kwargs.pop("platform", "visium_hd"), sample="S3", path=folder,
                      out_dir=out, image=image, spatialdata_mpp=None, **kwargs)
    assert not out.exists()
    return str(err.value)


def test_visium_hd_missing_bin_size_folder(layouts, tmp_path):
    folder = copy_hd(layouts, tmp_path)
    shutil.rmtree(folder / "outs" / "binned_outputs" / "square_016um")
    message = ingest_error(tmp_path, folder, folder / "he.tif")
    assert "square_016um" in message and "bin size folder missing" in message


def test_visium_hd_positions_not_matching_barcodes(layouts, tmp_path):
    folder = copy_hd(layouts, tmp_path)
    path = folder / "outs" / "binned_outputs" / "square_008um" / "spatial" / \
        "tissue_positions.parquet"
    positions = pd.read_parquet(path)
    positions["barcode"] = positions["barcode"].str.replace("-1", "-2")
    positions.to_parquet(path, index=False)
    message = ingest_error(tmp_path, folder, folder / "he.tif")
    assert str(path) in message and "do not match the matrix barcodes" in message


def test_visium_hd_microns_per_pixel_absent(layouts, tmp_path):
    folder = copy_hd(layouts, tmp_path)
    for path in (folder / "outs" / "binned_outputs").glob("*/spatial/scalefactors_json.json"):
        factors = json.loads(path.read_text())
        del factors["microns_per_pixel"]
        path.write_text(json.dumps(factors))
    message = ingest_error(tmp_path, folder, folder / "he.tif")
    assert "square_016um/spatial/scalefactors_json.json" in message
    assert "microns_per_pixel is absent" in message
    smp = read_sample("visium_hd", "S3", folder, image=folder / "he.tif", mpp=0.5)
    assert smp.mpp == 0.5  # the sheet's mpp is enough


def test_visium_hd_image_smaller_than_positions(layouts, tmp_path):
    folder = copy_hd(layouts, tmp_path)
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 300)).save(small)  # half the 600 px the positions need
    message = ingest_error(tmp_path, folder, small)
    assert str(small) in message and "outside the 300 x 300 px image" in message


def test_visium_hd_needs_the_full_resolution_image(layouts):
    with pytest.raises(InputError, match="full-resolution H&E"):
        read_sample("visium_hd", "S3", layouts / "visium_hd" / "S3")


# --------------------------------------------------------------------------- Xenium + H&E

def test_xenium_he_alignment_places_transcripts(layouts):
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    folder = layouts / "xenium" / "S3"
    he = folder / "S3_he_image.ome.tif"
    smp = read_sample("xenium", "S3", folder, image=he, spot_diameter_um=55.0)
    cells = ad.read_h5ad(folder / "cells_truth.h5ad")
    assert smp.mpp == pytest.approx(0.5, rel=1e-6)
    assert smp.highres.uns["xenium"]["he_alignment"].endswith("S3_he_imagealignment.csv")
    assert dense(smp.highres.X).sum() == dense(cells.X).sum()
    # spatialdata-io's reading of the same folder: transcripts in Xenium pixels, the H&E with
    # the alignment affine; its transcripts mapped onto the H&E and binned like ours agree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.xenium(folder, cells_boundaries=False, nucleus_boundaries=False,
                                      cells_labels=False, nucleus_labels=False,
                                      morphology_mip=False, morphology_focus=False,
                                      cells_table=False)
    points = sdata.points["transcripts"].compute()
    to_global = get_transformation(sdata.points["transcripts"]).to_affine_matrix(
        ("x", "y"), ("x", "y"))
    he_to_global = get_transformation(sdata.images["he_image"]).to_affine_matrix(
        ("x", "y"), ("x", "y"))
    xy = np.column_stack([points["x"], points["y"], np.ones(len(points))])
    he_px = (np.linalg.inv(he_to_global) @ to_global @ xy.T).T[:, :2]
    # their placement of every transcript equals ours (same transcripts, by id)
    table = pd.read_parquet(folder / "transcripts.parquet").set_index("transcript_id")
    order = table.index.get_indexer(points["transcript_id"].to_numpy())
    ours_px = xenium.he_pixels(table[["x_location", "y_location"]].to_numpy(np.float64),
                               xenium.read_he_alignment(folder / "S3_he_imagealignment.csv"),
                               0.2125)[order]
    np.testing.assert_allclose(he_px, ours_px, atol=1e-6)
    # and binning their positions gives our 2 um bins (up to transcripts within 1e-6 px of a
    # bin edge, where float rounding may fall either way)
    side = 2.0 / smp.mpp
    theirs = pd.DataFrame({"row": np.floor(he_px[:, 1] / side).astype(int),
                           "col": np.floor(he_px[:, 0] / side).astype(int),
                           "gene": points["feature_name"].astype(str).to_numpy()}
                          ).groupby(["row", "col", "gene"]).size()
    ours = smp.highres
    rows, cols = ours.obs["row"].to_numpy(), ours.obs["col"].to_numpy()
    coo = sp.coo_matrix(ours.X)
    mine = pd.Series(coo.data.astype(int), index=pd.MultiIndex.from_arrays(
        [rows[coo.row], cols[coo.row], np.asarray(ours.var_names)[coo.col]],
        names=["row", "col", "gene"]))
    both = pd.concat([mine, theirs], axis=1).fillna(0)
    edge = np.abs(he_px / side - np.round(he_px / side)) < 1e-6
    assert int((both[0] != both[1]).sum()) <= 2 * int(edge.any(axis=1).sum())
    assert both[0].sum() == both[1].sum() == len(points)
    assert smp.spots.n_obs > 0


@pytest.mark.parametrize("content, problem", [
    ("1,0,0\n0,1,0\n", "not a 3 x 3 affine"),
    ("1,0,0\n0,1,0\nx,0,1\n", "not a 3 x 3 affine"),
    ("1,0,0\n0,1,0\n0.1,0,1\n", "not an affine"),
])
def test_xenium_bad_alignment_file(layouts, tmp_path, content, problem):
    folder = tmp_path / "xe"
    shutil.copytree(layouts / "xenium" / "S3", folder)
    alignment = folder / "S3_he_imagealignment.csv"
    alignment.write_text(content)
    message = ingest_error(tmp_path, folder, folder / "S3_he_image.ome.tif", platform="xenium")
    assert str(alignment) in message and problem in message


# --------------------------------------------------------------------------- HEST

def test_hest_sample_reads(layouts):
    root = layouts / "hest" / "S3"
    smp = read_sample("hest", "S3", root)
    truth = ad.read_h5ad(root / "st" / "S3.h5ad")
    meta = json.loads((root / "metadata" / "S3.json").read_text())
    assert smp.mpp == meta["pixel_size_um_estimated"]
    assert smp.spot_diameter_um == meta["spot_diameter"] == 55.0
    assert smp.image_path == root / "wsis" / "S3.tif"
    np.testing.assert_array_equal(dense(smp.spots.X), dense(truth.X))
    np.testing.assert_allclose(smp.spots.obsm["spatial"],
                               truth.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    assert smp.spots.uns["hest"]["st_technology"] == "Visium"
    # the same sample under another sheet name, through `hest_id`
    assert read_sample("hest", "other", root, hest_id="S3").spots.n_obs == smp.spots.n_obs


def test_hest_legacy_st_sample_takes_its_spot_diameter(layouts, tmp_path):
    """A legacy-ST sample of HEST: 100 um spots said by its metadata, off-tissue spots dropped,
    positions from obsm["spatial"] when the obs columns are absent."""
    root = tmp_path / "hest"
    shutil.copytree(layouts / "hest" / "S3", root)
    path = root / "metadata" / "S3.json"
    meta = json.loads(path.read_text())
    meta.update(st_technology="Spatial Transcriptomics", spot_diameter=100.0,
                inter_spot_dist=200.0)
    path.write_text(json.dumps(meta))
    st = ad.read_h5ad(root / "st" / "S3.h5ad")
    st.obs["in_tissue"] = [0] + [1] * (st.n_obs - 1)
    st.obs = st.obs.drop(columns=["pxl_col_in_fullres", "pxl_row_in_fullres"])
    st.write_h5ad(root / "st" / "S3.h5ad")
    smp = read_sample("hest", "S3", root)
    assert smp.spot_diameter_um == 100.0
    assert smp.spots.uns["hest"]["st_technology"] == "Spatial Transcriptomics"
    assert list(smp.spots.obs_names) == list(st.obs_names[1:])
    np.testing.assert_allclose(smp.spots.obsm["spatial"], st.obsm["spatial"][1:])


def test_hest_metadata_without_pixel_size(layouts, tmp_path):
    root = tmp_path / "hest"
    shutil.copytree(layouts / "hest" / "S3", root)
    path = root / "metadata" / "S3.json"
    meta = json.loads(path.read_text())
    del meta["pixel_size_um_estimated"], meta["pixel_size_um_embedded"]
    path.write_text(json.dumps(meta))
    message = ingest_error(tmp_path, root, None, platform="hest")
    assert str(path) in message and "no pixel size" in message
    assert read_sample("hest", "S3", root, mpp=0.5).mpp == 0.5


@pytest.mark.parametrize("content, message", [
    (None, "HEST metadata file not found"),
    ("{not json", "cannot read HEST metadata"),
    ("[1, 2]", "HEST metadata must be a JSON object"),
])
def test_hest_metadata_unusable(layouts, tmp_path, content, message):
    """HEST metadata and Visium HD scale factors go through one JSON-object reader: the error
    names the user's file and what is wrong with it."""
    root = tmp_path / "hest"
    shutil.copytree(layouts / "hest" / "S3", root)
    path = root / "metadata" / "S3.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        hest.read_metadata(path)
    assert err.value.path == str(path)


@pytest.mark.parametrize("content, message", [
    (None, "scale factors file not found"),
    ("{not json", "cannot read scale factors"),
    ('"x"', "scale factors must be a JSON object"),
])
def test_visium_hd_scalefactors_unusable(layouts, tmp_path, content, message):
    folder = copy_hd(layouts, tmp_path)
    path = folder / "outs" / "binned_outputs" / "square_008um" / "spatial" / \
        "scalefactors_json.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        visium_hd.read_scalefactors(path, 8.0)
    assert err.value.path == str(path)


@pytest.mark.parametrize("content, message", [
    (None, "scale factors file not found \\(needed for tissue_hires_scalef\\)"),
    ("{not json", "cannot read scale factors"),
    ("[0.5]", "scale factors must be a JSON object"),
    ('{"tissue_lowres_scalef": 0.1}', "no tissue_hires_scalef: the downsampled image"),
])
def test_visium_scale_factor_unusable(tmp_path, content, message):
    path = tmp_path / "scalefactors_json.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        visium.read_scale_factor(path, "tissue_hires_scalef")
    assert err.value.path == str(path)


# --------------------------------------------------------------------------- Visium as published

@pytest.fixture(scope="module")
def visium_fixture() -> Path:
    if not (VISIUM_FIXTURE / "filtered_feature_bc_matrix.h5").is_file():
        pytest.skip(f"real Visium fixture not found at {VISIUM_FIXTURE} (developers' checkout "
                    "and CI only)")
    return VISIUM_FIXTURE


@pytest.mark.parametrize("image", ["hires", "lowres"])
def test_visium_downsampled_image_matches_scanpy(visium_fixture, image, caplog):
    import scanpy as sc

    smp = read_sample("visium", "heart", visium_fixture, image=image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.read_visium(visium_fixture)
    ref.var_names_make_unique()
    library = next(iter(ref.uns["spatial"]))
    factors = ref.uns["spatial"][library]["scalefactors"]
    scale = factors[f"tissue_{image}_scalef"]
    ref = ref[smp.spots.obs_names]
    assert list(smp.spots.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(dense(smp.spots.X), dense(ref.X))
    np.testing.assert_allclose(smp.spots.obsm["spatial"] / scale, ref.obsm["spatial"])
    mpp_full = 55.0 / factors["spot_diameter_fullres"]
    assert smp.mpp == pytest.approx(mpp_full / scale)
    assert smp.image_path.name == f"tissue_{image}_image.png"
    assert "downsampled" in smp.spots.uns[UNS_KEY]["note"]
    assert "downsampled image" in caplog.text


def shapes_in(sdata, name: str, coordinate_system: str) -> np.ndarray:
    """Centres of a spatialdata-io shapes element in one of its coordinate systems."""
    from spatialdata.transformations import get_transformation

    shapes = sdata.shapes[name]
    matrix = get_transformation(shapes, to_coordinate_system=coordinate_system
                                ).to_affine_matrix(("x", "y"), ("x", "y"))
    xy = np.column_stack([shapes.geometry.x, shapes.geometry.y, np.ones(len(shapes))])
    return (matrix @ xy.T).T[:, :2]


def test_visium_fixture_matches_spatialdata_io(visium_fixture):
    import spatialdata_io

    smp = read_sample("visium", "heart", visium_fixture, image="hires")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium(visium_fixture, dataset_id="heart")
    table = sdata.tables["table"]
    order = sdata.shapes["heart"].index.get_indexer(table.obs["spot_id"])
    assert (order >= 0).all()
    hires = shapes_in(sdata, "heart", "heart_downscaled_hires")[order]
    ours = pd.DataFrame(smp.spots.obsm["spatial"], index=smp.spots.obs_names)
    np.testing.assert_allclose(ours.loc[table.obs_names].to_numpy(), hires, atol=1e-6)
    np.testing.assert_array_equal(dense(smp.spots[table.obs_names].X), dense(table.X))


def test_visium_published_layout(layouts):
    import spatialdata_io

    outs = layouts / "visium" / "S3" / "outs"
    truth = ad.read_h5ad(layouts / "visium_hd" / "S3" / "cells_truth.h5ad")
    smp = read_sample("visium", "S3", outs, image="lowres")
    assert smp.mpp == pytest.approx(0.5 / 0.05)
    assert smp.spot_diameter_um == 55.0
    assert dense(smp.spots.X).sum() <= dense(truth.X).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium(outs, dataset_id="S3")
    table = sdata.tables["table"][smp.spots.obs_names]
    np.testing.assert_array_equal(dense(table.X), dense(smp.spots.X))
    np.testing.assert_allclose(np.asarray(table.obsm["spatial"], float) * 0.05,
                               smp.spots.obsm["spatial"])
    radius_px = float(sdata.shapes["S3"]["radius"].iloc[0])
    assert 2 * radius_px * 0.5 == pytest.approx(55.0)  # full-resolution px x mpp


def test_visium_without_opt_in_needs_full_resolution(visium_fixture):
    with pytest.raises(InputError, match="full-resolution H&E"):
        read_sample("visium", "heart", visium_fixture)


# --------------------------------------------------------------------------- command

def test_write_layouts_command(tmp_path, capsys):
    assert write_layouts_main(["hest", str(tmp_path / "out"), "--dataset-seed", "0",
                               "--seeds", "5", "--size-um", "200", "200"]) == 0
    assert (tmp_path / "out" / "S5" / "st" / "S5.h5ad").is_file()
    assert read_sample("hest", "S5", tmp_path / "out" / "S5").spots.n_obs > 0
    assert not list(tmp_path.glob("out/.*partial*"))


def test_write_layouts_needs_a_dataset_seed(tmp_path, capsys):
    """Without --dataset-seed each section would carry its own biology: argparse refuses."""
    with pytest.raises(SystemExit) as exc:
        write_layouts_main(["hest", str(tmp_path / "out"), "--seeds", "5"])
    assert exc.value.code == 2
    assert "--dataset-seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sections_of_one_dataset_seed_share_the_biology(layouts, tmp_path):
    """Two sections (seeds 3 and 4) of one dataset seed: the same genes, the same programme of
    each gene and the same cell-type profiles, different layouts; the same section seed with
    another dataset seed: the same layout, other profiles."""
    a = ad.read_h5ad(layouts / "visium_hd" / "S3" / "cells_truth.h5ad")
    b = ad.read_h5ad(layouts / "visium_hd" / "S4" / "cells_truth.h5ad")
    for cells, seed in ((a, 3), (b, 4)):
        assert cells.uns["synthetic"]["dataset_seed"] == DATASET_SEED
        assert cells.uns["synthetic"]["seed"] == seed
    assert list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.var, b.var)
    np.testing.assert_array_equal(a.varm["type_profile"], b.varm["type_profile"])
    assert a.n_obs != b.n_obs or not np.allclose(a.obsm["spatial"], b.obsm["spatial"])
    other = write_layout("visium_hd", tmp_path / "S3", seed=3, dataset_seed=DATASET_SEED + 1,
                         **SIZE)
    c = ad.read_h5ad(other / "cells_truth.h5ad")
    np.testing.assert_array_equal(c.obsm["spatial"], a.obsm["spatial"])  # same section layout
    assert not np.allclose(c.varm["type_profile"], a.varm["type_profile"])


def test_square_bins_read_out_of_a_dense_map():
    """16 um bins on a 4 um/px map aligned with it: the read-out is the plain mean of the 4 x 4
    map pixels under each bin (a disc of the same size would mix in partial pixels)."""
    from histomap.tasks.dense_windows import SlideSpots
    from histomap.tasks.dense_map import DenseMap, spots_from_dense

    rng = np.random.default_rng(2)
    values = rng.random((2, 40, 40)).astype(np.float32)
    dmap = DenseMap(Path("map.zarr"), values, np.ones((40, 40), np.float32), ["GA", "GB"],
                    4.0, (0.0, 0.0), 1.0, attrs={})
    centres = np.array([[80.0, 80.0], [48.0, 112.0]])  # level-0 px at 1 um/px
    got = spots_from_dense(dmap, centres, 16.0, 1.0, square=True)
    expected = np.array([values[:, 18:22, 18:22].mean(axis=(1, 2)),
                         values[:, 26:30, 10:14].mean(axis=(1, 2))])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    discs = spots_from_dense(dmap, centres, 16.0, 1.0)
    assert not np.allclose(discs, got)
    # training spots keep their shape through subset and concat
    spots = SlideSpots(Path("s.tif"), centres, 16.0, np.zeros((2, 2)), "s", [True, False])
    both = spots.concat(spots.subset(np.array([True, False])))
    assert both.square.tolist() == [True, False, True]


@pytest.mark.slow
def test_workflow_plans_the_new_platforms(layouts, tmp_path):
    """Dry runs: the schemas accept visium_hd (cross-scale on its bins), hest and Visium with
    `image: hires` (a keyword, not an input file)."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "config", tmp_path / "config")
    rows = {
        # two distinct sections (the sheet check refuses one section listed twice)
        "visium_hd": [f"hd{i}\tP{i}\tvisium_hd\tvisium_hd/S{s}/outs\tvisium_hd/S{s}/he.tif"
                      "\t\t16\t\t"
                      for i, s in ((1, 3), (2, 4))],
        "hest": [f"h{i}\tP{i}\thest\thest/S{s}\t\t\t\t\tS{s}" for i, s in ((1, 3), (2, 4))],
        "visium": [f"v{i}\tP{i}\tvisium\tvisium/S{s}/outs\thires\t\t\t\t"
                   for i, s in ((1, 3), (2, 4))],
    }
    for platform, lines in rows.items():
        sheet = tmp_path / f"{platform}.tsv"
        sheet.write_text("sample\tpatient\tplatform\tpath\timage\tmpp\tspot_diameter_um\t"
                         "spot_shape\thest_id\n" + "\n".join(lines) + "\n")
        config = yaml.safe_load((repo / "config" / "visium_hd_synthetic.yaml").read_text())
        config.update(samples=str(sheet), data_dir=str(layouts))
        path = tmp_path / f"{platform}.yaml"
        path.write_text(yaml.safe_dump(config))
        res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"),
                              "--directory", str(tmp_path), "-n", "--configfile", str(path)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
        cross_scale = "evaluate_cross_scale" in res.stdout
        assert cross_scale == (platform == "visium_hd"), platform
        # ST-Net and the probe predict at the 16 um truth bins, the dense models' bins
        assert ("predict_spot_scale" in res.stdout) == (platform == "visium_hd"), platform
        if platform == "visium":
            assert str(layouts / "hires") not in res.stdout  # a keyword, not a file


def test_hest_xenium_sample_has_transcript_bins(tmp_path):
    """A Xenium sample of HEST with transcripts/{id}_transcripts.parquet: its pseudo-Visium spots
    for training and its transcripts, in H&E pixels, binned as ground truth at other scales."""
    root = write_layout("hest", tmp_path / "X1", seed=4, dataset_seed=DATASET_SEED,
                        technology="Xenium", **SIZE)
    smp = read_sample("hest", "X1", root)
    cells = ad.read_h5ad(root / "cells_truth.h5ad")
    assert smp.spots.uns["hest"]["st_technology"] == "Xenium"
    assert smp.highres is not None and dense(smp.highres.X).sum() == dense(cells.X).sum()
    truth = truth_at_scale(smp.highres, smp.spots, 55.0, min_spacing_um=55.0,
                           preprocess={"min_counts": 1, "min_genes": 1}, path="hest")
    assert truth.n_obs > 0
    bad = pd.read_parquet(root / "transcripts" / "X1_transcripts.parquet").drop(columns="he_y")
    bad.to_parquet(root / "transcripts" / "X1_transcripts.parquet")
    with pytest.raises(InputError, match="he_y"):
        read_sample("hest", "X1", root)


def test_visium_hd_ingest_writes_square_bins(layouts, tmp_path):
    """Ingest of a Visium HD sample: spots.h5ad keeps the square shape, highres.h5ad every bin
    size, and sample.zarr draws the bins as squares of the bin's side."""
    import spatialdata as sd

    folder = layouts / "visium_hd" / "S3"
    out = tmp_path / "ingest"
    ingest_sample(platform="visium_hd", sample="S3", path=folder, out_dir=out,
                  image=folder / "he.tif", spot_diameter_um=8.0, spatialdata_mpp=4.0)
    spots = ad.read_h5ad(out / "spots.h5ad")
    assert square_mask(spots).all() and (spots.obs["diameter_um"] == 8.0).all()
    highres = ad.read_h5ad(out / "highres.h5ad")
    assert sorted(highres.obs["bin_size_um"].unique()) == [2.0, 8.0, 16.0]
    shapes = sd.read_zarr(out / "sample.zarr").shapes["spots"]
    bounds = shapes.geometry.bounds
    # shapes are in micrometres (the `global` coordinate system)
    np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], 8.0)
    np.testing.assert_allclose(bounds["maxy"] - bounds["miny"], 8.0)
