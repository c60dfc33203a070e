"""Spot and bin tables written in row blocks: an ``.h5ad`` whose rows are appended block by
block, so a table of any number of bins (a Visium HD slide's 11 M 2 um bins, a 300 mm^2 slide's
75 M) never lies in memory as one array.

Arrow of the DESIGN.md picture: dense map -> **spots or bins at any scale** (``apply_dense_tables``
and the whole-slide benchmark). The file is an ordinary AnnData ``.h5ad`` (anndata's on-disk
format, written by anndata itself: :class:`StreamedTable` lets anndata write an empty table with
the right columns, ``var``, ``uns`` and encodings, then makes the per-row datasets resizable and
appends to them), so ``anndata.read_h5ad``, scanpy and SpatialData (through anndata) open it
as any other table. ``X`` is dense float32 (the predictions contract of
:mod:`histomap.tasks.predict`: log-normalised expression is rarely zero, so a sparse or float16
``X`` would save little and lose precision), stored in row chunks of :data:`CHUNK_ROWS`.

The file is written under a temporary name and renamed when :meth:`StreamedTable.close` runs
after the last block (:func:`histomap.outputs.atomic_output`); an exception leaves nothing.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from histomap.outputs import atomic_output

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # rows per HDF5 chunk of every per-row dataset


def _row_datasets(group: h5py.Group, prefix: str = "") -> Iterator[str]:
    """Paths of the per-row datasets under ``obs`` and ``obsm`` and of ``X``."""
    for name, item in group.items():
        path = f"{prefix}{name}"
        if isinstance(item, h5py.Dataset):
            yield path
        else:
            yield from _row_datasets(item, path + "/")


def _resizable(f: h5py.File, path: str, chunk_rows: int) -> h5py.Dataset:
    """Replace the empty dataset at ``path`` by a resizable, row-chunked one with its attrs."""
    old = f[path]
    attrs, dtype, tail = dict(old.attrs), old.dtype, old.shape[1:]
    del f[path]
    new = f.create_dataset(path, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                           chunks=(chunk_rows, *tail) if tail else (chunk_rows,))
    new.attrs.update(attrs)
    return new


class StreamedTable:
    """An ``.h5ad`` table appended to in row blocks.

    ``obs_columns``: name -> dtype (numpy dtype, or a list of categories for a categorical
    column); ``obsm``: name -> width (float64 columns, e.g. ``{"spatial": 2}``); ``uns``: the
    table's ``uns`` (written once, at the start). Use as a context manager: the file appears at
    ``path`` when the block ends without an exception.
    """

    def __init__(self, path: str | Path, genes, *, obs_columns: Mapping[str, object],
                 obsm: Mapping[str, int], uns: Mapping | None = None,
                 chunk_rows: int = CHUNK_ROWS):
        self.path = Path(path)
        self.genes = pd.Index([str(g) for g in genes])
        if self.genes.has_duplicates:
            raise ValueError(f"{self.path}: gene names must be unique")
        self.obs_columns, self.obsm_widths = dict(obs_columns), dict(obsm)
        self.uns, self.chunk_rows = dict(uns or {}), int(chunk_rows)
        self.n_rows = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StreamedTable:
        tmp = self._stack.enter_context(atomic_output(self.path))
        self._skeleton().write_h5ad(tmp)
        self.file = self._stack.enter_context(h5py.File(tmp, "r+"))
        self.rows = {path: _resizable(self.file, path, self.chunk_rows)
                     for path in ["X", *(f"obs/{p}" for p in _row_datasets(self.file["obs"])
                                         if not p.endswith("categories")),
                                  *(f"obsm/{p}" for p in _row_datasets(self.file["obsm"]))]}
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def _skeleton(self) -> ad.AnnData:
        """The table with no rows: anndata writes the columns, encodings, var and uns."""
        obs = {}
        for name, dtype in self.obs_columns.items():
            if isinstance(dtype, (list, tuple)):
                obs[name] = pd.Categorical([], categories=list(dtype))
            else:
                obs[name] = np.zeros(0, dtype=dtype)
        table = ad.AnnData(X=np.zeros((0, len(self.genes)), np.float32),
                           obs=pd.DataFrame(obs, index=pd.Index([], dtype=object)),
                           var=pd.DataFrame(index=self.genes))
        for name, width in self.obsm_widths.items():
            table.obsm[name] = np.zeros((0, int(width)), np.float64)
        table.uns.update(self.uns)
        return table

    def append(self, names, X: np.ndarray, obs: Mapping[str, np.ndarray],
               obsm: Mapping[str, np.ndarray]) -> None:
        """Add rows: ``names`` (unique: the caller's lattice positions), ``X`` (n, genes), every
        obs column (categorical columns as category values) and every obsm array."""
        X = np.asarray(X, dtype=np.float32)
        n = len(names)
        if X.shape != (n, len(self.genes)):
            raise ValueError(f"{self.path}: block X {X.shape} is not ({n}, {len(self.genes)})")
        if set(obs) != set(self.obs_columns) or set(obsm) != set(self.obsm_widths):
            raise ValueError(f"{self.path}: block columns {sorted(obs)}, {sorted(obsm)} are not "
                             f"{sorted(self.obs_columns)}, {sorted(self.obsm_widths)}")
        if n == 0:
            return
        values = {"X": X, "obs/_index": np.asarray(names, dtype=object)}
        for name, dtype in self.obs_columns.items():
            column = np.asarray(obs[name])
            if isinstance(dtype, (list, tuple)):
                codes = pd.Categorical(column, categories=list(dtype)).codes
                if (codes < 0).any():
                    raise ValueError(f"{self.path}: obs {name!r} has values outside {dtype}")
                values[f"obs/{name}/codes"] = codes
            else:
                values[f"obs/{name}"] = column.astype(dtype, copy=False)
        for name in self.obsm_widths:
            values[f"obsm/{name}"] = np.asarray(obsm[name], dtype=np.float64)
        for path, dataset in self.rows.items():
            block = values[path]
            if len(block) != n:
                raise ValueError(f"{self.path}: {path} has {len(block)} rows, not {n}")
            dataset.resize(self.n_rows + n, axis=0)
            dataset[self.n_rows:] = block.astype(dataset.dtype, copy=False) \
                if path != "obs/_index" else block
        self.n_rows += n

    def close(self) -> None:
        """Finish the file (as leaving the ``with`` block does)."""
        self._stack.close()
        log.info("%d rows x %d genes -> %s", self.n_rows, len(self.genes), self.path)
