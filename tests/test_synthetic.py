"""The synthetic platform: generator, ground-truth aggregation helpers and reader."""
from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import openslide
import pytest
import scipy.sparse as sp
import tifffile

from histomap.data import synthetic
from histomap.data.aggregate import aggregate_bins, aggregate_discs
from histomap.data.io import read_sample
from histomap.data.io.synthetic import read
from histomap.data.synthetic import CELL_TYPES, simulate_sample
from histomap.data.synthetic_config import INDUCTIONS
from histomap.errors import InputError

SIZE_UM = (500.0, 500.0)   # small: ~1k cells, < 1 s to generate
SEED = 3                   # a seed whose small sample holds every cell type


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "s1"
    simulate_sample(out, seed=SEED, size_um=SIZE_UM)
    return out


@pytest.fixture(scope="module")
def cells(sample_dir) -> ad.AnnData:
    return ad.read_h5ad(sample_dir / "cells.h5ad")


@pytest.fixture(scope="module")
def spots(sample_dir) -> ad.AnnData:
    return ad.read_h5ad(sample_dir / "spots.h5ad")


@pytest.fixture(scope="module")
def image(sample_dir) -> np.ndarray:
    return tifffile.imread(sample_dir / "he.tif", key=0)


def test_files_and_every_cell_type(sample_dir, cells, spots, image):
    assert sorted(p.name for p in sample_dir.iterdir()) == ["cells.h5ad", "he.tif", "meta.json",
                                                           "spots.h5ad"]
    assert not list(sample_dir.parent.glob(".*partial*"))
    counts = cells.obs["cell_type"].value_counts()
    assert list(cells.obs["cell_type"].cat.categories) == list(CELL_TYPES)
    missing = [t for t in CELL_TYPES if counts[t] == 0]
    assert not missing, f"seed {SEED} no longer yields {missing}; pick another SEED"
    assert image.shape == (1000, 1000, 3) and image.dtype == np.uint8
    assert sp.issparse(cells.X) and np.issubdtype(cells.X.dtype, np.integer)
    assert cells.layers["rate"].dtype == np.float32
    np.testing.assert_allclose(cells.obsm["spatial"], cells.obs[["x_px", "y_px"]].to_numpy())
    meta = json.loads((sample_dir / "meta.json").read_text())
    assert meta["seed"] == SEED and meta["mpp"] == 0.5 and meta["spot_diameter_um"] == 55.0
    assert meta["n_cells"] == cells.n_obs and meta["n_spots"] == spots.n_obs
    assert cells.var_names.is_unique and "GENE060" in cells.var_names and "PTPRC" in cells.var_names


def test_same_seed_same_sample_other_seed_differs(tmp_path, sample_dir, cells):
    again, other = tmp_path / "again", tmp_path / "other"
    simulate_sample(again, seed=SEED, size_um=SIZE_UM)
    simulate_sample(other, seed=SEED + 1, size_um=SIZE_UM)
    assert _sha(again / "he.tif") == _sha(sample_dir / "he.tif")
    cells2 = ad.read_h5ad(again / "cells.h5ad")
    assert (cells2.X != cells.X).nnz == 0
    np.testing.assert_array_equal(cells2.obsm["spatial"], cells.obsm["spatial"])
    assert (ad.read_h5ad(again / "spots.h5ad").X != ad.read_h5ad(sample_dir / "spots.h5ad").X
            ).nnz == 0
    assert _sha(other / "he.tif") != _sha(sample_dir / "he.tif")
    cells3 = ad.read_h5ad(other / "cells.h5ad")
    assert cells3.shape != cells.shape or (cells3.X != cells.X).nnz > 0


def test_sections_of_a_dataset_share_one_biology():
    """Sections of one dataset (same dataset_seed, their own seeds) express the same cell-type
    profiles, background genes included, and the same neighbourhood effects; they differ in
    layout, composition, staining and depth. The old generator drew the profiles from each
    section's own seed, so the H&E-to-expression map changed between train and test sections."""
    size = (300.0, 300.0)
    one = synthetic.simulate(synthetic.SyntheticConfig(seed=11, dataset_seed=0, size_um=size))
    two = synthetic.simulate(synthetic.SyntheticConfig(seed=12, dataset_seed=0, size_um=size))
    np.testing.assert_array_equal(one.cells.varm["type_profile"], two.cells.varm["type_profile"])
    background = one.cells.var["programme"].to_numpy() == "background"
    assert background.sum() > 10
    cfg = synthetic.SyntheticConfig(seed=11, dataset_seed=0, size_um=size)
    other = synthetic.SyntheticConfig(seed=12, dataset_seed=0, size_um=size)
    b1, b2 = synthetic.dataset_biology(cfg), synthetic.dataset_biology(other)
    for programme in INDUCTIONS:
        np.testing.assert_array_equal(b1.induction[programme], b2.induction[programme])
    # ... and they are different sections
    assert one.cells.n_obs != two.cells.n_obs or not np.array_equal(
        one.cells.obsm["spatial"], two.cells.obsm["spatial"])
    s1, s2 = one.meta["section"], two.meta["section"]
    assert s1["depth"] != s2["depth"] and s1["stain"] != s2["stain"]
    assert s1["region_bias"] != s2["region_bias"]
    # another dataset has another biology
    third = synthetic.dataset_biology(synthetic.SyntheticConfig(seed=11, dataset_seed=1))
    assert not np.allclose(third.profiles, b1.profiles)


def test_batch_effect_is_a_named_knob_off_by_default():
    size = (300.0, 300.0)
    assert synthetic.SyntheticConfig().batch_effect_sd == 0.0
    base = synthetic.simulate(synthetic.SyntheticConfig(seed=11, dataset_seed=0, size_um=size))
    one = synthetic.simulate(synthetic.SyntheticConfig(seed=11, dataset_seed=0, size_um=size,
                                                       batch_effect_sd=0.3))
    two = synthetic.simulate(synthetic.SyntheticConfig(seed=12, dataset_seed=0, size_um=size,
                                                       batch_effect_sd=0.3))
    p0, p1, p2 = (d.cells.varm["type_profile"] for d in (base, one, two))
    assert not np.allclose(p1, p2) and not np.allclose(p0, p1)
    np.testing.assert_allclose(p1.sum(axis=0), 1.0, rtol=1e-9)  # fractions per cell type
    # a moderate effect: the same biology underneath
    assert np.corrcoef(np.log(p0).ravel(), np.log(p1).ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="batch_effect_sd"):
        synthetic.SyntheticConfig(batch_effect_sd=-1.0)


def test_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_pyramid", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        simulate_sample(tmp_path / "s", seed=1, size_um=(300, 300))
    assert list(tmp_path.iterdir()) == []


def test_spots_are_exact_sums_of_the_cells_inside(cells, spots):
    radius = 55.0 / 2 / 0.5
    X = cells.X.toarray()
    xy = cells.obsm["spatial"]
    assert spots.n_obs > 5
    for name, centre, row in zip(spots.obs_names, spots.obsm["spatial"], spots.X.toarray()):
        inside = np.hypot(xy[:, 0] - centre[0], xy[:, 1] - centre[1]) <= radius
        assert inside.sum() == spots.obs.loc[name, "n_cells"] >= 1
        np.testing.assert_array_equal(row, X[inside].sum(axis=0))
    assert np.issubdtype(spots.X.dtype, np.integer)
    assert all(n.startswith("spot_") and "x" in n for n in spots.obs_names)
    np.testing.assert_allclose(spots.layers["rate"].sum(),
                               sum(cells.layers["rate"][np.hypot(*(xy - c).T) <= radius].sum()
                                   for c in spots.obsm["spatial"]), rtol=1e-4)


def test_spot_grid_is_hexagonal_at_the_spacing(spots):
    xy = spots.obsm["spatial"] * 0.5   # um
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 100.0, atol=1e-6)


def test_library_sizes_are_realistic_for_st(spots):
    totals = np.asarray(spots.X.sum(axis=1)).ravel()
    full = spots.obs["n_cells"].to_numpy() >= 10
    assert full.sum() >= 5
    assert 800 <= np.median(totals[full]) <= 6000


def test_aggregate_discs_matches_brute_force(cells):
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1000, (40, 2))
    radius = 23.7
    got = aggregate_discs(cells, centres, radius)
    assert sp.issparse(got) and got.shape == (40, cells.n_vars)
    X, xy = cells.X.toarray(), cells.obsm["spatial"]
    want = np.stack([X[np.hypot(*(xy - c).T) <= radius].sum(axis=0) for c in centres])
    np.testing.assert_array_equal(got.toarray(), want)


def test_aggregate_bins_conserves_counts_and_matches_brute_force(cells):
    mpp, bin_um, origin, shape = 0.5, 10.0, (103.5, 87.25), (30, 35)
    bins = aggregate_bins(cells, bin_um, mpp, origin=origin, shape=shape)
    side = bin_um / mpp
    X, xy = cells.X.toarray(), cells.obsm["spatial"]
    in_grid = ((xy[:, 0] >= origin[0]) & (xy[:, 0] < origin[0] + shape[1] * side)
               & (xy[:, 1] >= origin[1]) & (xy[:, 1] < origin[1] + shape[0] * side))
    assert 0 < in_grid.sum() < len(xy)    # some points fall outside the grid
    assert bins.X.sum() == X[in_grid].sum()
    assert bins.obs["n_points"].sum() == in_grid.sum()
    assert (bins.obs["diameter_um"] == bin_um).all()
    rate = bins.layers["rate"]
    for i, (r, c) in enumerate(zip(bins.obs["row"], bins.obs["col"])):
        x0, y0 = origin[0] + c * side, origin[1] + r * side
        inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + side)
                  & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side))
        assert inside.any()
        np.testing.assert_array_equal(bins.X[i].toarray().ravel(), X[inside].sum(axis=0))
        np.testing.assert_allclose(bins.obsm["spatial"][i], (x0 + side / 2, y0 + side / 2))
        np.testing.assert_allclose(rate[i], cells.layers["rate"][inside].sum(axis=0), rtol=1e-5)
    full = aggregate_bins(cells, bin_um, mpp, origin=origin, shape=shape, keep_empty=True)
    assert full.n_obs == shape[0] * shape[1] and full.X.sum() == bins.X.sum()
    two_um = aggregate_bins(cells, 2.0, mpp)   # default grid: from (0, 0) to the last point
    assert two_um.X.sum() == cells.X.sum()


def _centre_rgb(image, xy, half=3) -> np.ndarray:
    """Mean RGB in a (2*half+1)^2 window around each centre."""
    ix, iy = np.rint(xy).astype(int).T
    off = np.arange(-half, half + 1)
    return image[iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]
                 ].reshape(len(xy), -1, 3).mean(axis=1)


def _nucleus_radius_px(image, xy) -> float:
    """Radius where the cell-averaged darkness falls halfway from the centre to 10 px away."""
    grey = image.mean(axis=2)
    off = np.arange(-12, 13)
    ix, iy = np.rint(xy).astype(int).T
    windows = grey[iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]
    dist = np.rint(np.hypot(off[:, None], off[None, :])).astype(int)
    profile = np.array([windows[:, dist == r].mean() for r in range(11)])
    halfway = (profile[0] + profile[10]) / 2
    return float(np.argmax(profile > halfway))


def test_cell_types_look_different(cells, image):
    types = cells.obs["cell_type"].to_numpy()
    xy = cells.obsm["spatial"]
    interior = (xy.min(axis=1) > 15) & (xy.max(axis=1) < image.shape[0] - 15)
    rgb = {t: _centre_rgb(image, xy[(types == t) & interior]).mean(axis=0) for t in CELL_TYPES}
    # lymphocytes: very dark blue nuclei; adipocytes: white empty cells
    assert rgb["lymphocyte"].sum() < 300 and rgb["lymphocyte"][2] > rgb["lymphocyte"][0]
    assert rgb["adipocyte"].min() > 225
    assert rgb["adipocyte"].sum() - rgb["lymphocyte"].sum() > 350
    # tumour nuclei are bigger than lymphocyte nuclei
    r_tum = _nucleus_radius_px(image, xy[(types == "tumour") & interior])
    r_lym = _nucleus_radius_px(image, xy[(types == "lymphocyte") & interior])
    assert r_tum >= r_lym + 2, (r_tum, r_lym)
    # glass around the tissue is near white; tissue is not
    border = np.concatenate([image[:20].reshape(-1, 3), image[-20:].reshape(-1, 3)])
    assert border.mean() > 235
    assert image[xy[:, 1].astype(int), xy[:, 0].astype(int)].mean() < 200


def test_expression_depends_on_type_and_neighbourhood(cells):
    types = cells.obs["cell_type"].to_numpy()
    norm = cells.X.toarray() / np.asarray(cells.X.sum(axis=1)).clip(1)
    gene = {g: i for i, g in enumerate(cells.var_names)}
    for marker, t in [("PTPRC", "lymphocyte"), ("COL1A1", "stroma"), ("ERBB2", "tumour"),
                      ("ADIPOQ", "adipocyte"), ("KRT5", "normal_duct")]:
        own = norm[types == t, gene[marker]].mean()
        rest = norm[types != t, gene[marker]].mean()
        assert own > 5 * rest, (marker, own, rest)
    tumour = types == "tumour"
    frac = cells.obs["frac_lymphocyte"].to_numpy()[tumour]
    assert frac.std() > 0.05
    rate = cells.layers["rate"][tumour] / cells.obs["library_size"].to_numpy()[tumour, None]
    assert np.corrcoef(rate[:, gene["CXCL9"]], frac)[0, 1] > 0.9
    counts = norm[tumour][:, [gene["CXCL9"], gene["CXCL10"], gene["IDO1"]]].sum(axis=1)
    assert np.corrcoef(counts, frac)[0, 1] > 0.2
    # a housekeeping gene's share of the library does not follow the neighbourhood
    actb = rate[:, gene["ACTB"]]
    assert actb.std() < 1e-5 * actb.mean() < rate[:, gene["CXCL9"]].std()
    # the neighbour fractions themselves are right for a few cells (brute force)
    xy_um = cells.obsm["spatial"] * 0.5
    for i in np.flatnonzero(tumour)[:20]:
        near = np.hypot(*(xy_um - xy_um[i]).T) <= 40.0
        near[i] = False
        if near.any():
            assert np.isclose(cells.obs["frac_lymphocyte"].iloc[i],
                              (types[near] == "lymphocyte").mean())


def test_reader_geometry(sample_dir, cells, spots):
    s = read_sample("synthetic", "demo", sample_dir)
    assert s.platform == "synthetic" and s.name == "demo" and s.mpp == 0.5
    assert s.image_path == sample_dir / "he.tif" and s.spot_diameter_um == 55.0
    assert s.spot_radius_px == pytest.approx(55.0)
    geo = s.spots.uns["histomap"]
    assert geo["platform"] == "synthetic" and geo["mpp"] == 0.5 and geo["sample"] == "demo"
    assert s.spots.obsm["spatial"].dtype == np.float64
    assert (s.spots.obs["diameter_um"] == 55.0).all()
    assert sp.isspmatrix_csr(s.spots.X) and np.issubdtype(s.spots.X.dtype, np.integer)
    assert list(s.spots.obs_names) == list(spots.obs_names)
    assert s.highres is not None and s.highres.n_obs == cells.n_obs
    with openslide.OpenSlide(str(s.image_path)) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        w, h = slide.dimensions
    xy = s.spots.obsm["spatial"]
    assert (xy[:, 0] - s.spot_radius_px >= 0).all() and (xy[:, 0] + s.spot_radius_px <= w).all()
    assert (xy[:, 1] - s.spot_radius_px >= 0).all() and (xy[:, 1] + s.spot_radius_px <= h).all()
    # the spots re-derive from the high-res cells with the sample's own geometry
    again = aggregate_discs(s.highres, xy, s.spot_radius_px)
    assert (again != s.spots.X).nnz == 0
    assert read("demo", sample_dir, mpp=0.5, spot_diameter_um=55).mpp == 0.5


def test_reader_errors(sample_dir, tmp_path):
    with pytest.raises(InputError, match="mpp"):
        read("demo", sample_dir, mpp=0.25)
    with pytest.raises(InputError, match="spot_diameter_um"):
        read("demo", sample_dir, spot_diameter_um=100)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("he.tif", "spots.h5ad", "meta.json"):
        (broken / name).symlink_to(sample_dir / name)
    with pytest.raises(InputError, match="cells.h5ad"):
        read("demo", broken)
    with pytest.raises(InputError, match="does not exist"):
        read("demo", tmp_path / "nowhere")
