"""Cross-scale ground truth: lattice discs re-measured from point-like high-resolution data."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomap.data.sample import annotate_spots, geometry
from histomap.errors import InputError
from histomap.evaluation.scales import lattice_centres, truth_at_scale

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
    # empty discs are dropped by QC (logged by normalise_spots), the far cell is kept
    assert truth.n_obs == 2
    assert truth.layers["counts"].sum() == counts.sum()


def test_smaller_discs_split_what_larger_discs_pool():
    xy = np.array([[6.0, 10.0], [14.0, 10.0]])
    counts = np.array([[10, 0], [0, 30]])
    tiny = truth_at_scale(_highres(xy, counts), _spots(), 2.0, min_spacing_um=4.0,
                          preprocess={"min_counts": 1, "min_genes": 1})
    assert tiny.n_obs == 2  # one cell per 2 um disc
    assert sorted(tiny.layers["counts"].toarray().sum(axis=1)) == [10, 30]


def test_no_highres_is_a_clear_error():
    empty = _highres(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(InputError, match="cells or transcripts"):
        truth_at_scale(empty, _spots(), 8.0, min_spacing_um=10.0, preprocess={},
                       path="S/highres.h5ad")
