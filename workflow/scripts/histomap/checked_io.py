"""Every file a job reads is validated when it is opened: a corrupt or truncated one is named,
with what to do about it, and never silently used.

One small set of readers the rest of the package calls instead of the libraries' own:

* :func:`read_h5ad_checked`: AnnData files; a file that is not HDF5 (truncated before its
  superblock, or another format) or that h5py/anndata cannot decode is an :class:`InputError`.
* :func:`read_parquet_checked`: Parquet tables; the ``PAR1`` magic at both ends is checked first
  (a truncated copy lacks its footer), then the schema (asked-for columns present), then the
  data pages are decoded.
* :func:`load_torch_checked` / :func:`save_torch_checked`: torch files (``model.pt``,
  checkpoints) with a SHA-256 sidecar (``model.pt.sha256``, ``sha256sum``'s format, so
  ``sha256sum -c model.pt.sha256`` checks a copy by hand) written beside the file when it is
  saved and compared when it is loaded; a file without a sidecar (older histomap) is still
  read, and a truncated one fails to unpickle with the same message.
* :func:`open_zarr_checked`: zarr stores (dense maps, feature caches, SR pairs); the group
  metadata must parse, the required attributes and arrays must be there, and
  :func:`checked_array` wraps an array so that a chunk that fails to decode (a flipped or cut
  compressed block: zstd/blosc raise on read) is an :class:`InputError` naming the store.
  :func:`check_dense_store`, :func:`check_feature_cache` and :func:`check_sr_pairs` add each
  store's shape checks.

Messages say what to do: a file histomap wrote (under ``results/``) is to be deleted so the
step that wrote it runs again (:data:`REMEDY_RESULT`); a user's file is to be replaced by an
intact copy (:data:`REMEDY_USER`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histomap.errors import InputError
from histomap.outputs import atomic_output, remove_path, write_text_atomic

REMEDY_RESULT = "delete it and rerun: the step that wrote it runs again"
REMEDY_USER = "replace it with an intact copy (download or export it again)"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)  # where a superblock may start (after a user block)
PARQUET_MAGIC = b"PAR1"
SIDECAR_SUFFIX = ".sha256"


def _why(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; InputError when it is not an existing file (or is empty)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} does not exist")
    if not path.is_file():
        raise InputError(path, f"{what} is not a file")
    if path.stat().st_size == 0:
        raise InputError(path, f"{what} is empty (0 bytes): a truncated copy?")
    return path


# --------------------------------------------------------------------------- SHA-256 sidecars

def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """``model.pt`` -> ``model.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path) -> Path:
    """Write ``path``'s SHA-256 beside it (``<hex>  <name>``, as ``sha256sum`` prints)."""
    path = Path(path)
    return write_text_atomic(sidecar_path(path), f"{sha256_file(path)}  {path.name}\n")


def check_sidecar(path: str | Path, *, what: str = "file", remedy: str = REMEDY_RESULT) -> bool:
    """Compare ``path`` with its sidecar; InputError on a mismatch or an unreadable sidecar.
    Returns whether there was a sidecar to check."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        return False
    try:
        recorded = side.read_text().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise InputError(side, f"unreadable checksum of {path.name} ({_why(exc)}); delete "
                               f"{side.name} and {path.name} and rerun") from exc
    actual = sha256_file(path)
    if actual != recorded:
        raise InputError(path, f"{what} does not match its checksum in {side.name} (SHA-256 "
                               f"{actual[:12]}... instead of {recorded[:12]}...): the file is "
                               f"corrupt or truncated; {remedy}")
    return True


def save_torch_checked(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically, then the SHA-256 sidecar. The old sidecar goes first, so a
    kill in between leaves a file without a sidecar (read unchecked), never a false one."""
    from histomap.compat import torch

    path = Path(path)
    remove_path(sidecar_path(path))
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    write_sidecar(path)
    return path


def load_torch_checked(path: str | Path, *, what: str = "torch file",
                       remedy: str = REMEDY_RESULT, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file checked against its sidecar; a missing,
    empty, truncated or corrupt file is an InputError saying what to do."""
    from histomap.compat import torch

    path = require_file(path, what)
    check_sidecar(path, what=what, remedy=remedy)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(path, f"cannot read as a {what}: corrupt or truncated ({_why(exc)}); "
                               f"{remedy}") from exc


# --------------------------------------------------------------------------- HDF5 / h5ad

def check_hdf5(path: str | Path, *, what: str = "HDF5 file", remedy: str = REMEDY_USER) -> Path:
    """InputError unless ``path`` starts like an HDF5 file (its superblock signature)."""
    path = require_file(path, what)
    with open(path, "rb") as fh:
        head = fh.read(HDF5_OFFSETS[-1] + len(HDF5_SIGNATURE))
    if not any(head[o:o + 8] == HDF5_SIGNATURE for o in HDF5_OFFSETS):
        raise InputError(path, f"not an HDF5 file, which a {what} must be: truncated, corrupt or "
                               f"of another format; {remedy}")
    return path


def read_h5ad_checked(path: str | Path, *, backed: str | None = None,
                      what: str = "AnnData file (.h5ad)", remedy: str = REMEDY_RESULT):
    """``anndata.read_h5ad`` of a checked file; a truncated or undecodable one is an
    InputError naming it."""
    import anndata as ad

    path = check_hdf5(path, what=what, remedy=remedy)
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types on a bad file
        raise InputError(path, f"cannot read the {what}: corrupt or truncated ({_why(exc)}); "
                               f"{remedy}") from exc


# --------------------------------------------------------------------------- Parquet

def check_parquet(path: str | Path, *, what: str = "Parquet table",
                  remedy: str = REMEDY_RESULT) -> Path:
    """InputError unless the file starts and ends with Parquet's magic (a cut copy has no
    footer)."""
    path = require_file(path, what)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if head != PARQUET_MAGIC:
        raise InputError(path, f"not a Parquet file (no PAR1 header): corrupt or of another "
                               f"format; {remedy}")
    if size < 12 or tail != PARQUET_MAGIC:
        raise InputError(path, f"truncated Parquet file (no PAR1 footer; {size} bytes); "
                               f"{remedy}")
    return path


def read_parquet_checked(path: str | Path, *, columns: Sequence[str] | None = None,
                         what: str = "Parquet table", remedy: str = REMEDY_RESULT):
    """``pandas.read_parquet`` of a checked file: magic, footer, asked-for columns, data pages.
    Returns a DataFrame; the schema's metadata is kept in ``.attrs["parquet_metadata"]``."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = check_parquet(path, what=what, remedy=remedy)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(path, f"cannot read the {what}'s footer: corrupt or truncated "
                               f"({_why(exc)}); {remedy}") from exc
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(path, f"{what} lacks the column(s) {', '.join(missing)} (it has "
                                   f"{', '.join(schema.names[:12])})")
    try:
        table = pd.read_parquet(path, columns=None if columns is None else list(columns))
    except Exception as exc:  # noqa: BLE001 - arrow raises ArrowInvalid, OSError, ...
        raise InputError(path, f"cannot decode the {what}: corrupt ({_why(exc)}); {remedy}"
                         ) from exc
    return table


# --------------------------------------------------------------------------- zarr

class CheckedArray:
    """A zarr array whose reads turn a chunk that fails to decode into an InputError naming the
    store; everything else (shape, dtype, chunks, attrs, ...) is the array's own."""

    __slots__ = ("array", "store", "what", "remedy")

    def __init__(self, array, store: str | Path, what: str, remedy: str = REMEDY_RESULT):
        self.array, self.store, self.what, self.remedy = array, Path(store), what, remedy

    def __getitem__(self, key):
        try:
            return self.array[key]
        except (IndexError, KeyError, TypeError, InputError):
            raise
        except Exception as exc:  # noqa: BLE001 - codecs raise RuntimeError, ValueError, ...
            raise InputError(self.store, f"a chunk of array {self.array.path!r} of the "
                                         f"{self.what} failed to decode ({_why(exc)}): the store "
                                         f"is corrupt; {self.remedy}") from exc

    def __setitem__(self, key, value):
        self.array[key] = value

    def __getattr__(self, name: str):
        return getattr(self.array, name)

    def __len__(self) -> int:
        return len(self.array)

    def __array__(self, dtype=None, copy=None):
        values = np.asarray(self[...])
        return values if dtype is None else values.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"CheckedArray({self.array!r})"


def checked_array(array, store: str | Path, what: str, remedy: str = REMEDY_RESULT):
    """``array`` wrapped in :class:`CheckedArray` (unchanged if it already is one)."""
    return array if isinstance(array, CheckedArray) else CheckedArray(array, store, what, remedy)


def open_zarr_checked(path: str | Path, *, what: str, remedy: str = REMEDY_RESULT,
                      fmt: str | None = None, attrs: Iterable[str] = (),
                      arrays: Iterable[str] = ()):
    """Open a zarr group read-only, checking that its metadata parses, that ``attrs`` (and the
    ``format`` attribute equal to ``fmt``) and ``arrays`` (paths within the group) are there.
    InputError naming the store and ``remedy`` otherwise."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        raise InputError(path, f"{what} does not exist (a zarr store is a folder)")
    try:
        root = zarr.open_group(str(path), mode="r")
        stored = dict(root.attrs)
    except Exception as exc:  # noqa: BLE001 - JSON, zarr format and OS errors alike
        raise InputError(path, f"cannot open the {what}: its metadata is corrupt or missing "
                               f"({_why(exc)}); {remedy}") from exc
    if fmt is not None and stored.get("format") != fmt:
        raise InputError(path, f"not a {what} (format {stored.get('format')!r}, expected "
                               f"{fmt!r}); {remedy}")
    missing = [a for a in attrs if a not in stored]
    if missing:
        raise InputError(path, f"{what} lacks the attribute(s) {', '.join(missing)}: written "
                               f"incompletely or by another program; {remedy}")
    absent = []
    for name in arrays:
        try:
            root[name]
        except Exception:  # noqa: BLE001 - KeyError, or corrupt array metadata
            absent.append(name)
    if absent:
        raise InputError(path, f"{what} lacks the array(s) {', '.join(absent)} (or their "
                               f"metadata is corrupt); {remedy}")
    return root


def _shape_error(path: Path, what: str, problem: str) -> InputError:
    return InputError(path, f"{what} is inconsistent: {problem}; {REMEDY_RESULT}")


def check_dense_store(path: str | Path):
    """Structure of a dense map (:mod:`histomap.tasks.dense_map`): NGFF ``ome`` and
    ``histomap`` attrs, every pyramid level and the mask, genes x mask shape consistent.
    Returns the open group."""
    what = "dense map"
    root = open_zarr_checked(path, what=what, attrs=("ome", "histomap"),
                             arrays=("labels/mask/0",))
    path = Path(path)
    try:
        meta = dict(root.attrs["histomap"])
        levels = [d["path"] for d in dict(root.attrs["ome"])["multiscales"][0]["datasets"]]
        genes = list(meta["genes"])
        float(meta["mpp"]), float(meta["slide_mpp"]), list(meta["origin_px"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(path, f"{what} attributes incomplete ({_why(exc)}); {REMEDY_RESULT}"
                         ) from exc
    open_zarr_checked(path, what=what, arrays=levels)
    dense, mask = root[levels[0]], root["labels/mask/0"]
    if dense.ndim != 3 or dense.shape[0] != len(genes):
        raise _shape_error(path, what, f"level 0 has shape {dense.shape} for {len(genes)} genes")
    if tuple(mask.shape) != tuple(dense.shape[1:]):
        raise _shape_error(path, what, f"mask {mask.shape} and map {dense.shape[1:]} differ")
    for k, name in enumerate(levels[1:], start=1):
        shape = root[name].shape
        want = tuple(-(-s // 2 ** k) for s in dense.shape[1:])
        if shape[0] != dense.shape[0] or tuple(shape[1:]) != want:
            raise _shape_error(path, what, f"pyramid level {name} has shape {shape}, expected "
                                           f"{(dense.shape[0], *want)}")
    return root


def check_feature_cache(path: str | Path, fmt: str):
    """Structure of a feature cache (:mod:`histomap.tasks.feature_cache`): attrs, one array per
    level with the recorded channels and strides, spots and their names of one length."""
    what = "feature cache"
    root = open_zarr_checked(path, what=what, fmt=fmt,
                             attrs=("encoder", "mpp", "strides", "channels", "origin_px"),
                             arrays=("spots", "spot_names", "encoded"))
    path = Path(path)
    strides, channels = list(root.attrs["strides"]), list(root.attrs["channels"])
    if len(strides) != len(channels) or not strides:
        raise _shape_error(path, what, f"{len(strides)} strides for {len(channels)} levels")
    open_zarr_checked(path, what=what, arrays=[f"level{i}" for i in range(len(strides))])
    first = root["level0"].shape
    for i, (stride, ch) in enumerate(zip(strides, channels)):
        shape = root[f"level{i}"].shape
        want = (int(ch), first[1] * int(strides[0]) // int(stride),
                first[2] * int(strides[0]) // int(stride))
        if tuple(shape) != want:
            raise _shape_error(path, what, f"level{i} has shape {tuple(shape)}, expected {want}")
    n_spots, n_names = root["spots"].shape[0], root["spot_names"].shape[0]
    if n_spots != n_names:
        raise _shape_error(path, what, f"{n_spots} spot feature rows for {n_names} spot names")
    return root


def check_sr_pairs(path: str | Path, fmt: str, needed: Iterable[str]):
    """Structure of an SR-pairs zarr (:mod:`histomap.data.srpairs.store`): the ``needed``
    arrays, one patch count for every array, LR/HR gene counts and the mask's shape."""
    what = "SR pairs zarr"
    root = open_zarr_checked(path, what=what, fmt=fmt, arrays=needed)
    path = Path(path)
    shapes: Mapping[str, tuple] = {name: tuple(root[name].shape) for name in root.array_keys()}
    counts = {name: s[0] for name, s in shapes.items() if s}
    if len(set(counts.values())) > 1:
        raise _shape_error(path, what, "arrays hold different numbers of patches: "
                                       + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lr, hr, mask = shapes.get("lr"), shapes.get("hr"), shapes.get("mask")
    if hr is not None and lr is not None and hr[1] != lr[1]:
        raise _shape_error(path, what, f"hr has {hr[1]} genes, lr {lr[1]}")
    if hr is not None and mask is not None and tuple(mask[1:]) != tuple(hr[2:]):
        raise _shape_error(path, what, f"mask {mask[1:]} does not match hr {hr[2:]}")
    return root
