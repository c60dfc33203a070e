"""Count tables entering the SR pairs: the chosen genes and checked raw counts.

Arrow: highres counts or spots -> **SR pairs**; shared by the point-data and spot-grid builders.
"""
from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from histomap.errors import InputError


def gene_columns(adata: ad.AnnData, genes: Sequence[str] | None, what: str) -> list[str]:
    """The requested genes (None: all), each measured in ``adata`` and listed once."""
    if genes is None:
        return list(map(str, adata.var_names))
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise InputError(what, f"{len(missing)} requested genes are not measured, e.g. "
                               f"{', '.join(missing[:5])}")
    if len(set(genes)) != len(genes):
        raise InputError(what, "the gene list has duplicates")
    return genes


def as_csr(matrix) -> sp.csr_matrix:
    """A count matrix (dense or sparse) as CSR."""
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))


def check_counts(values: sp.csr_matrix, what: str) -> None:
    """Raise an input error unless the counts are finite and non-negative."""
    data = values.data
    if data.size and (not np.isfinite(data).all() or (data < 0).any()):
        raise InputError(what, "counts must be finite and non-negative")
