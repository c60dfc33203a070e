"""Cross-scale ground truth: lattice discs re-measured from point-like high-resolution data."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomap.data.sample import annotate_spots, geometry
from histomap.errors import InputError
from histomap.evaluation.scales import lattice_centres, qc_discs, truth_at_scale

MPP = 0.5


def _highres(xy_um: np.ndarray, counts: np.ndarray) -> ad.AnnData:
    cells = ad.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=["g0", "g1"]),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(len(xy_um))]))
    cells.obsm["spatial"] = np.asarray(xy_um, float) / MPP
    return cells


def _spots() -> ad.AnnData:
    spots = ad.AnnData(X=sp.csr_matrix(np.ones((1, 2))), var=pd.DataFrame(index=["g0", "g1"]))
    spots.obsm["spatial"] = np.zeros((1, 2))
    return annotate_spots(spots, sample="S", platform="synthetic", mpp=MPP,
                          spot_diameter_um=100.0, image="he.tif")


def test_lattice_covers_the_points_with_the_spacing():
    centres, names = lattice_centres(np.array([[12.0, 3.0], [95.0, 45.0]]), 10.0)
    assert centres[:, 0].min() == 15.0 and centres[:, 0].max() == 95.0
    assert centres[:, 1].min() == 5.0 and centres[:, 1].max() == 45.0
    assert len(centres) == 9 * 5 == len(set(names))
    assert names[0] == "r0_c1"  # lattice cells are indexed from the image origin


def test_discs_sum_the_cells_inside_and_are_normalised():
    # two cells 4 um apart inside the first 20 um lattice cell, one far away
    xy = np.array([[8.0, 10.0], [12.0, 10.0], [90.0, 90.0]])
    counts = np.array([[10, 0], [0, 30], [5, 5]])
    truth = truth_at_scale(_highres(xy, counts), _spots(), 8.0, min_spacing_um=20.0,
                           preprocess={"min_counts": 1, "min_genes": 1, "target_sum": 100})
    assert geometry(truth)["spot_diameter_um"] == 8.0
    assert (truth.obs["diameter_um"] == 8.0).all()
    # the 8 um disc at (10, 10) um holds both cells (each 2 um from the centre)
    first = truth[truth.obs_names == "d8_r0_c0"]
    np.testing.assert_array_equal(first.layers["counts"].toarray(), [[10, 30]])
    np.testing.assert_allclose(first.X.toarray(), np.log1p([[25.0, 75.0]]), rtol=1e-6)
    assert truth.uns["histomap"]["normalisation"]["target_sum"] == 100
    # every lattice disc is ground truth (no tissue mask given: the whole measured area)
    assert truth.n_obs == 5 * 5
    assert truth.layers["counts"].sum() == counts.sum()


def test_every_disc_in_tissue_is_scored_empty_ones_as_zeros():
    """The old truth kept only discs that passed the 5-count QC, so at 2 um it scored whole
    cells at their centres. Now every lattice disc whose centre is in the tissue mask is truth:
    an empty disc is all zeros, a low-count one is normalised like any spot, and only the
    training targets (qc_discs) are filtered."""
    xy = np.array([[10.0, 10.0], [30.0, 10.0], [50.0, 10.0]])
    counts = np.array([[40, 0], [1, 0], [0, 0]])  # rich, one count, no count
    cells = _highres(np.vstack([xy, [[10.0, 50.0]]]), np.vstack([counts, [[0, 3]]]))
    # tissue: mask pixels of 20 um; lattice rows at y = 30, 50 um are on glass
    mask = np.ones((3, 3), bool)
    mask[1:, :] = False
    truth = truth_at_scale(cells, _spots(), 4.0, min_spacing_um=20.0, tissue=(mask, 20.0),
                           preprocess={"min_counts": 5, "min_genes": 1, "target_sum": 100})
    assert truth.n_obs == 3, "the three discs of the tissue row, none of the glass rows"
    by_name = {n: i for i, n in enumerate(truth.obs_names)}
    x = truth.X.toarray()
    np.testing.assert_allclose(x[by_name["d4_r0_c0"]], np.log1p([100.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(x[by_name["d4_r0_c1"]], np.log1p([100.0, 0.0]), rtol=1e-6)
    np.testing.assert_array_equal(x[by_name["d4_r0_c2"]], [0.0, 0.0])  # empty: zeros
    assert list(truth.obs["qc_pass"]) == [True, False, False]
    assert truth.uns["histomap"]["qc"]["n_empty"] == 1
    train = qc_discs(truth)
    assert list(train.obs_names) == ["d4_r0_c0"]
    assert train.uns["histomap"]["qc"]["n_spots_dropped"] == 2
    with pytest.raises(InputError, match="tissue mask"):
        truth_at_scale(cells, _spots(), 4.0, min_spacing_um=20.0,
                       tissue=(np.zeros((3, 3), bool), 20.0), preprocess={})


def test_smaller_discs_split_what_larger_discs_pool():
    xy = np.array([[6.0, 10.0], [14.0, 10.0]])
    counts = np.array([[10, 0], [0, 30]])
    tiny = truth_at_scale(_highres(xy, counts), _spots(), 2.0, min_spacing_um=4.0,
                          preprocess={"min_counts": 1, "min_genes": 1})
    kept = qc_discs(tiny)
    assert kept.n_obs == 2  # one cell per 2 um disc
    assert sorted(kept.layers["counts"].toarray().sum(axis=1)) == [10, 30]
    assert tiny.n_obs == 3 and tiny.layers["counts"].sum() == 40  # the disc between is empty


def test_no_highres_is_a_clear_error():
    empty = _highres(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(InputError, match="cells or transcripts"):
        truth_at_scale(empty, _spots(), 8.0, min_spacing_um=10.0, preprocess={},
                       path="S/highres.h5ad")
