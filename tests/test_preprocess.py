"""Spot QC + normalisation, gene panel selection and panel files."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomap.data.preprocess import (
    expression_matrix,
    normalise_spots,
    read_gene_panel,
    select_genes,
    write_gene_panel,
)
from histomap.data.sample import annotate_spots
from histomap.errors import InputError


def _raw_spots(n_spots=40, n_genes=60, seed=0, genes=None, low=()) -> ad.AnnData:
    """Raw integer counts (CSR) with the geometry contract; spots in ``low`` get tiny libraries."""
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i:03d}" for i in range(n_genes)]
    rates = rng.gamma(1.0, 5.0, size=len(genes))
    counts = rng.poisson(rates, size=(n_spots, len(genes)))
    for i in low:
        counts[i] = 0
        counts[i, :3] = 1
    spots = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int64)),
                       obs=pd.DataFrame(index=[f"{i}x{i + 1}" for i in range(n_spots)]),
                       var=pd.DataFrame(index=genes))
    spots.obsm["spatial"] = rng.uniform(0, 1000, size=(n_spots, 2))
    return annotate_spots(spots, sample="S1", platform="synthetic", mpp=0.5,
                          spot_diameter_um=55.0, image="slide.tif")


def _normalised(x, genes, name="S") -> ad.AnnData:
    """A tiny already-normalised sample (X given as log-expression)."""
    adata = ad.AnnData(X=np.asarray(x, dtype=np.float32),
                       obs=pd.DataFrame(index=[f"{name}{i}" for i in range(len(x))]),
                       var=pd.DataFrame(index=genes))
    adata.uns["histomap"] = {"normalisation": {"target_sum": 1e4, "log1p": True}}
    return adata


# --------------------------------------------------------------------------- normalise_spots
def test_normalise_keeps_counts_and_reaches_target_sum(tmp_path, caplog):
    spots = _raw_spots(low=(3, 7))
    raw = spots.X.toarray()
    with caplog.at_level("INFO"):
        out = normalise_spots(spots, min_counts=100, min_genes=20, target_sum=1e4,
                              path="S1/spots.h5ad")
    assert out.n_obs == 38
    assert "dropped 2 of 40 spots" in caplog.text
    assert "3x4" in caplog.text and "7x8" in caplog.text
    kept = np.setdiff1d(np.arange(40), [3, 7])
    np.testing.assert_array_equal(out.layers["counts"].toarray(), raw[kept])
    assert np.issubdtype(out.layers["counts"].dtype, np.integer)
    assert out.X.dtype == np.float32
    x = out.X.toarray()
    np.testing.assert_allclose(np.expm1(x.astype(np.float64)).sum(axis=1), 1e4, rtol=1e-5)
    # library-size normalisation preserves within-spot proportions
    expected = np.log1p(raw[kept] / raw[kept].sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.obs["total_counts"], raw[kept].sum(axis=1))
    np.testing.assert_array_equal(out.obs["n_genes"], (raw[kept] > 0).sum(axis=1))
    np.testing.assert_array_equal(out.obsm["spatial"], spots.obsm["spatial"][kept])
    assert out.uns["histomap"]["mpp"] == 0.5
    assert out.uns["histomap"]["normalisation"] == {"target_sum": 1e4, "log1p": True}
    assert spots.n_obs == 40 and spots.X.dtype == np.int64, "input must not be modified"
    # the file contract survives a round trip
    out.write_h5ad(tmp_path / "st.h5ad")
    back = ad.read_h5ad(tmp_path / "st.h5ad")
    assert back.uns["histomap"]["normalisation"]["log1p"]
    np.testing.assert_array_equal(back.layers["counts"].toarray(), raw[kept])


def test_normalise_dense_input_matches_sparse():
    spots = _raw_spots(seed=4)
    dense = spots.copy()
    dense.X = spots.X.toarray()
    a, b = normalise_spots(spots, min_counts=1, min_genes=1), normalise_spots(dense, min_counts=1,
                                                                             min_genes=1)
    np.testing.assert_allclose(a.X.toarray(), b.X, rtol=1e-6)


def test_normalise_rejects_all_filtered_and_non_counts():
    spots = _raw_spots(n_spots=4)
    with pytest.raises(InputError, match=r"S1/spots\.h5ad.*QC removed all 4 spots"):
        normalise_spots(spots, min_counts=10**9, path="S1/spots.h5ad")
    counts = spots.X.toarray()
    counts[1] = 0
    spots.X = sp.csr_matrix(counts)
    out = normalise_spots(spots, min_counts=0, min_genes=0)
    assert "1x2" not in out.obs_names and np.isfinite(out.X.toarray()).all()
    spots.X = spots.X.astype(np.float32) * 0.5
    with pytest.raises(InputError, match="not integers"):
        normalise_spots(spots, min_counts=0, min_genes=0)


# --------------------------------------------------------------------------- select_genes
def test_select_genes_top_mean_intersection_and_ties(caplog):
    a = _normalised([[5.0, 1.0, 2.0, 2.0, 9.0],
                     [3.0, 1.0, 2.0, 2.0, 9.0]], ["B", "A", "D", "C", "ONLY_A"], "a")
    b = _normalised([[0.0, 3.0, 2.0, 2.0, 0.0]], ["B", "A", "D", "C", "ONLY_B"], "b")
    with caplog.at_level("INFO"):
        panel = select_genes({"a": a, "b": b}, method="top_mean", n_genes=10)
    # pooled means over 3 spots: B 8/3, A 5/3, C = D = 2 (tie broken by name)
    assert panel == ["B", "C", "D", "A"]
    assert "ONLY_A" not in panel and "ONLY_B" not in panel
    assert "asked for 10 genes but only 4" in caplog.text
    assert "1 of 5 genes of sample 'a' are not shared" in caplog.text
    assert select_genes({"a": a, "b": b}, n_genes=2) == ["B", "C"]


def test_select_genes_ranks_on_the_given_samples_and_only_checks_names_of_measured():
    """The fold's test sections enter only by their gene names (a gene their table lacks cannot
    be scored there); how high a gene is in them never changes the ranking."""
    train = _normalised([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0]], ["A", "B", "C", "D"], "t")
    high = ["A", "B", "C", "D"]
    panel = select_genes({"t": train}, n_genes=2, measured={"test": high})
    assert panel == ["A", "B"]
    assert select_genes({"t": train}, n_genes=2, measured={"test": ["B", "C", "D"]}) == ["B", "C"]
    with pytest.raises(InputError, match="absent from sample 'test': A"):
        select_genes({"t": train}, method="list", genes=["A", "B"],
                     measured={"test": ["B", "C"]}, path="panel.tsv")


def test_select_genes_exclude_patterns():
    a = _normalised([[9.0, 8.0, 7.0, 1.0]], ["MT-CO1", "RPL3", "ERBB2", "ACTB"])
    assert select_genes({"a": a}, n_genes=2) == ["MT-CO1", "RPL3"], "kept unless excluded"
    panel = select_genes({"a": a}, n_genes=2, exclude_patterns=["^MT-", "^RP[SL]"])
    assert panel == ["ERBB2", "ACTB"]


def test_select_genes_hvg_runs():
    genes = [f"G{i:03d}" for i in range(200)]
    samples = {}
    for k, name in enumerate(["s1", "s2"]):
        spots = _raw_spots(n_spots=60, genes=genes, seed=10 + k)
        counts = spots.X.toarray()
        # five genes of ordinary mean but switched off in half of the spots: far more variable
        counts[:, :5] = np.random.default_rng(k).poisson([6, 10, 16, 24, 36], size=(60, 5))
        counts[:30, :5] = 0
        spots.X = sp.csr_matrix(counts)
        samples[name] = normalise_spots(spots, min_counts=1, min_genes=1)
    panel = select_genes(samples, method="hvg", n_genes=10)
    assert len(panel) == 10 and len(set(panel)) == 10 and set(panel) <= set(genes)
    assert set(genes[:5]) <= set(panel)


def test_select_genes_list_mode():
    a = _normalised([[1.0, 2.0, 3.0]], ["ERBB2", "ACTB", "GAPDH"], "a")
    b = _normalised([[1.0, 2.0]], ["ACTB", "GAPDH"], "b")
    assert select_genes({"a": a}, method="list", genes=["GAPDH", "ERBB2"]) == ["GAPDH", "ERBB2"]
    with pytest.raises(InputError, match=r"panel\.tsv.*sample 'b' lacks 1 panel gene\(s\): ERBB2"):
        select_genes({"a": a, "b": b}, method="list", genes=["ERBB2", "ACTB"], path="panel.tsv")
    with pytest.raises(InputError, match="unknown gene selection method"):
        select_genes({"a": a}, method="pca")


# --------------------------------------------------------------------------- panels, matrices
def test_gene_panel_round_trip(tmp_path):
    path = tmp_path / "genes" / "top.tsv"
    write_gene_panel(["B", "C", "A"], path)
    assert path.read_text().splitlines()[0] == "gene\trank"
    assert read_gene_panel(path) == ["B", "C", "A"]
    (tmp_path / "bad.tsv").write_text("symbol\nA\n")
    with pytest.raises(InputError, match="'gene' column"):
        read_gene_panel(tmp_path / "bad.tsv")
    (tmp_path / "dup.tsv").write_text("gene\nA\nA\n")
    with pytest.raises(InputError, match="more than once: A"):
        read_gene_panel(tmp_path / "dup.tsv")


def test_expression_matrix_order_and_missing():
    adata = _normalised([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], ["A", "B", "C"])
    adata.X = sp.csr_matrix(adata.X)
    m = expression_matrix(adata, ["C", "A"])
    assert m.dtype == np.float32 and m.shape == (2, 2)
    np.testing.assert_array_equal(m, [[3.0, 1.0], [6.0, 4.0]])
    with pytest.raises(InputError, match=r"st\.h5ad.*missing: Z"):
        expression_matrix(adata, ["A", "Z"], path="st.h5ad")


def test_real_her2st_shared_panel(her2st_dir):
    """Real sections have different gene sets: the panel must come from their intersection."""
    samples = {}
    for name in ("C2", "C3"):
        counts = pd.read_csv(her2st_dir / name / f"{name}.tsv.gz", sep="\t", index_col=0)
        spots = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(dtype=np.int64)),
                           obs=pd.DataFrame(index=counts.index.astype(str)),
                           var=pd.DataFrame(index=counts.columns.astype(str)))
        samples[name] = normalise_spots(spots, path=f"{name}.tsv.gz")
    panel = select_genes(samples, n_genes=250)
    assert len(panel) == 250
    for adata in samples.values():
        assert set(panel) <= set(adata.var_names)
    m = expression_matrix(samples["C2"], panel)
    means = m.mean(axis=0)
    assert means[0] > means[-1]
