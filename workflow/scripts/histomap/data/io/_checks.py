"""Checks the platform readers share (ingest_sample): image size from the header, spot centres on
the image, unique names, raw counts (numeric, present, non-negative integers) and their CSR form,
positive numbers. Private to :mod:`histomap.data.io`; each error names the file at fault.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

# imported for its side effect: raises PIL.Image.MAX_IMAGE_PIXELS for big H&E
from histomap.data import slide as _slide  # noqa: F401
from histomap.errors import InputError


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image in level-0 pixels, read from its header without decoding."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file does not exist")
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as pil_exc:  # noqa: BLE001 - try the slide readers before giving up
        try:
            import openslide

            with openslide.OpenSlide(str(path)) as slide:
                return tuple(int(v) for v in slide.dimensions)
        except Exception:  # noqa: BLE001
            pass
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                return int(shape[1]), int(shape[0])
        except Exception:  # noqa: BLE001
            pass
        raise InputError(path, f"cannot read image: {pil_exc}") from pil_exc


def check_within_image(image: str | Path, xy: np.ndarray, names) -> tuple[int, int]:
    """Fail unless every spot centre (x, y in level-0 px) lies on the image; return its size."""
    width, height = image_size(image)
    x, y = xy[:, 0], xy[:, 1]
    outside = ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    if outside.any():
        bad = np.flatnonzero(outside)
        examples = ", ".join(f"{names[i]} ({x[i]:.0f}, {y[i]:.0f})" for i in bad[:5])
        raise InputError(image, f"{len(bad)} of {len(xy)} spot centres lie outside the "
                                f"{width} x {height} px image, e.g. {examples}; is this the "
                                "full-resolution image the spot pixel coordinates refer to?")
    return width, height


def check_unique(names: pd.Index, path: str | Path, what: str) -> None:
    """InputError naming a few duplicates when ``names`` are not unique."""
    duplicated = pd.Index(names)[pd.Index(names).duplicated()]
    if len(duplicated):
        raise InputError(path, f"duplicate {what}: {examples(duplicated.unique())}")


def check_counts(counts: pd.DataFrame, path: str | Path) -> None:
    """Counts must be numeric, present, non-negative integers; the error says where not."""
    non_numeric = [c for c, dt in counts.dtypes.items() if not pd.api.types.is_numeric_dtype(dt)]
    if non_numeric:
        gene = non_numeric[0]
        bad = pd.to_numeric(counts[gene], errors="coerce").isna()
        spot = counts.index[np.flatnonzero(bad.to_numpy())[0]] if bad.any() else "?"
        raise InputError(path, f"non-numeric count value {counts.at[spot, gene]!r} "
                               f"(spot {spot}, gene {gene})")
    check_count_values(counts.to_numpy(), path, counts.index, counts.columns)


def check_count_values(values: np.ndarray, path: str | Path, rows=None, cols=None) -> None:
    """Fail on missing, non-integer or negative counts (values: dense array or sparse data)."""
    def where(mask: np.ndarray) -> str:
        idx = np.argwhere(mask)[0]
        if rows is None or cols is None or values.ndim != 2:
            return f"entry {tuple(int(i) for i in idx)}"
        return f"spot {rows[idx[0]]}, gene {cols[idx[1]]}"

    if np.issubdtype(values.dtype, np.floating):
        missing = np.isnan(values)
        if missing.any():
            raise InputError(path, f"missing count value ({where(missing)})")
        fractional = values != np.round(values)
        if fractional.any():
            first = values[tuple(np.argwhere(fractional)[0])]
            raise InputError(path, f"counts must be integers (raw UMI counts), found {first:g} "
                                   f"({where(fractional)})")
    elif not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise InputError(path, f"counts must be integers, found values of type {values.dtype}")
    negative = values < 0
    if negative.any():
        first = values[tuple(np.argwhere(negative)[0])]
        raise InputError(path, f"counts must be non-negative, found {first:g} ({where(negative)})")


def to_csr_counts(values) -> sp.csr_matrix:
    """Validated integer counts (dense or sparse) as CSR int32 (int64 if they overflow int32)."""
    matrix = sp.csr_matrix(values)
    top = matrix.data.max() if matrix.nnz else 0
    dtype = np.int32 if top <= np.iinfo(np.int32).max else np.int64
    matrix = matrix.astype(dtype)
    matrix.eliminate_zeros()
    return matrix


def check_positive(value: float | None, name: str, path: str | Path,
                   default: float | None = None) -> float:
    """``value`` (or ``default`` when None) as a positive finite float, else InputError."""
    if value is None:
        value = default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(number) or number <= 0:
        raise InputError(path, f"{name} must be a positive number, got {value!r}")
    return number


def examples(names, k: int = 5) -> str:
    """The first ``k`` of ``names`` for an error message, with the count when there are more."""
    names = list(names)
    shown = ", ".join(map(str, names[:k]))
    return shown + (f" ... ({len(names)} in all)" if len(names) > k else "")
