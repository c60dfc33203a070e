"""The SR-pairs zarr on disk: writing a builder's patches atomically and reading them back.

Arrow: **SR pairs** (build_sr_pairs) -> models and evaluation. Format ``histomap-srpairs/1`` (the
package docstring lists its arrays and attrs): one chunk per patch, written under a temporary
name and renamed when complete (:func:`histomap.outputs.atomic_output`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histomap.checked_io import check_sr_pairs, checked_array, open_zarr_checked
from histomap.data.srpairs.normalisation import median_library
from histomap.errors import InputError
from histomap.outputs import atomic_output

FORMAT = "histomap-srpairs/1"


def write_pairs_zarr(out_zarr: Path, n: int,
                     specs: dict[str, tuple[tuple[int, ...], str, tuple]],
                     items: Iterator[dict[str, np.ndarray]], attrs: dict) -> None:
    """Write ``n`` patches (dicts of per-patch arrays) into arrays of ``specs`` (name ->
    (per-patch shape, dtype, dimension names)) under a temporary name, then rename."""
    with atomic_output(out_zarr) as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.attrs.update(attrs)
        arrays = {name: root.create_array(name, shape=(n, *shape), dtype=dtype,
                                          chunks=(1, *shape) if shape else (max(n, 1),),
                                          fill_value=0, dimension_names=("patch", *dims))
                  for name, (shape, dtype, dims) in specs.items()}
        columns: dict[str, list[np.ndarray]] = {name: [] for name, (shape, _, _) in specs.items()
                                                if len(shape) <= 1}
        for i, item in enumerate(items):
            for name, value in item.items():
                if name in columns:
                    columns[name].append(np.asarray(value))
                else:
                    arrays[name][i] = value
        for name, values in columns.items():
            if values:
                arrays[name][:] = np.stack(values).astype(specs[name][1])


def normalisation_specs(kind: str, n_genes: int, hr_shape, lr_shape, grids=("hr", "lr")) -> dict:
    """Arrays that undo ``kind`` (min-max ranges per gene, log1p libraries per pixel) of the
    given grids, as :func:`write_pairs_zarr` specs."""
    if kind == "minmax":
        return {f"{g}_{s}": ((n_genes,), "float32", ("gene",))
                for g in grids for s in ("min", "max")}
    if kind == "log1p":
        shapes = {"hr": tuple(hr_shape), "lr": tuple(lr_shape)}
        return {f"{g}_library": (shapes[g], "float32", ("y", "x")) for g in grids}
    return {}


def pair_specs(n_genes: int, hr_shape: tuple[int, int], lr_shape: tuple[int, int],
               he_hw: Sequence[int], normalisation: str, *, truth: bool = True) -> dict:
    """The arrays of an SR-pairs zarr as :func:`write_pairs_zarr` specs: ``lr``, ``hr`` (with
    ``truth``), ``he``, ``mask``, the patch placement and the normalisation arrays."""
    specs = {"lr": ((n_genes, *lr_shape), "float32", ("gene", "y", "x"))}
    if truth:
        specs["hr"] = ((n_genes, *hr_shape), "float32", ("gene", "y", "x"))
    return {**specs, "he": ((3, *he_hw), "uint8", ("c", "y", "x")),
            "mask": (hr_shape, "bool", ("y", "x")),
            "origin_px": ((2,), "float64", ("xy",)), "origin_um": ((2,), "float64", ("xy",)),
            "grid_index": ((2,), "int64", ("rowcol",)), "tissue_fraction": ((), "float32", ()),
            **normalisation_specs(normalisation, n_genes, hr_shape, lr_shape,
                                  grids=("hr", "lr") if truth else ("lr",))}


def read_sr_pairs(path: str | Path, *, lazy: bool = False) -> tuple[dict[str, Any], dict]:
    """(arrays by name, attrs) of an SR-pairs zarr; ``lazy`` gives zarr arrays instead of numpy
    (wrapped so that a chunk that fails to decode is an InputError naming the store)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "SR pairs zarr does not exist (run the build_sr_pairs rule)")
    root = open_zarr_checked(path, what="SR pairs zarr", fmt=FORMAT)
    attrs = dict(root.attrs)
    needed = {"lr", "he", "mask"} | ({"hr"} if has_truth(attrs) else set())
    check_sr_pairs(path, FORMAT, sorted(needed))  # shapes; chunks are checked as they are read
    arrays = {name: checked_array(root[name], path, "SR pairs zarr")
              for name in root.array_keys()}
    if not lazy:
        arrays = {name: a[...] for name, a in arrays.items()}
    return arrays, attrs


def has_truth(attrs: Mapping) -> bool:
    """Whether SR pairs hold an HR truth (all but the LR-only inputs of
    :func:`histomap.data.srpairs.lr_only.build_lr_pairs`)."""
    return attrs.get("source") != "lr_only"


def training_target_sum(pairs_zarrs: Sequence[str | Path]) -> float | None:
    """Log1p target sum of a model: the median non-zero HR-pixel library over the measured
    pixels of its training pairs (None for other normalisations)."""
    libraries = []
    for path in pairs_zarrs:
        arrays, attrs = read_sr_pairs(path, lazy=True)
        if attrs["normalisation"] != "log1p":
            return None
        library = np.asarray(arrays["hr_library"][...], np.float64)
        libraries.append(library[np.asarray(arrays["mask"][...], bool)])
    return median_library(np.concatenate(libraries)) if libraries else None
