"""Disk space checked before a large output is written: a job that cannot finish stops at its
start with the size it needs and the space there is, not hours later with a full disk.

Each estimate is the array's shape times its dtype's size times a stated compression guess,
rounded up; the check asks for :data:`HEADROOM` times that (other jobs write meanwhile):

* dense map (:func:`dense_map_bytes`): ``genes x H x W`` values of the map's dtype, plus the
  uint8 mask, times 4/3 for the 2x2 pyramid (1 + 1/4 + 1/16 + ...); compression guess 1.0:
  zstd barely shrinks float predictions, and chunks outside tissue (all 0, not written) are
  not counted on, as the tissue share is not known before prediction.
* 2 um bin table (:func:`bin_table_bytes`): an ``.h5ad`` written uncompressed: the CSR counts
  (4-byte values + 4-byte gene indices per non-zero entry, 8-byte row pointers) plus about
  :data:`BIN_OBS_BYTES` per bin (name, centre, row, column, size); compression guess 1.0.
* tile store (:func:`tile_store_bytes`): ``n x tile_px x tile_px x 3`` uint8, times
  :data:`TILE_ZSTD_RATIO` (0.95: zstd level 1 saves 5-10 % on H&E tiles, measured for
  ``tiling.tile_compression``) or 1.0 uncompressed.

The free space comes from :func:`shutil.disk_usage` on the output's nearest existing folder.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from histomap.errors import InputError
from histomap.outputs import partial_path

log = logging.getLogger(__name__)

HEADROOM = 1.1  # ask for 10 % more than the estimate
PYRAMID_FACTOR = 4.0 / 3.0  # 1 + 1/4 + 1/16 + ...: a 2x2 mean pyramid over level 0
TILE_ZSTD_RATIO = 0.95  # zstd level 1 saves 5-10 % on H&E tiles (tiling.tile_compression)
BIN_OBS_BYTES = 64  # per bin: ~20-byte name, 2 x float64 centre, row/col, bin size


def dense_map_bytes(n_genes: int, height: int, width: int, dtype: str = "float32") -> int:
    """Bytes of a dense map (module docstring): genes x H x W x itemsize, plus the mask, x 4/3."""
    itemsize = np.dtype(dtype).itemsize
    return int(np.ceil((int(n_genes) * itemsize + 1) * int(height) * int(width)
                       * PYRAMID_FACTOR))


def bin_table_bytes(n_bins: int, nnz: int) -> int:
    """Bytes of a bin table in ``.h5ad`` with ``nnz`` non-zero counts (module docstring)."""
    return int(8 * int(nnz) + 8 * (int(n_bins) + 1) + BIN_OBS_BYTES * int(n_bins))


def tile_store_bytes(n_tiles: int, tile_px: int, compression: str = "zstd") -> int:
    """Bytes of a tile store (module docstring)."""
    ratio = TILE_ZSTD_RATIO if compression != "none" else 1.0
    return int(np.ceil(int(n_tiles) * int(tile_px) ** 2 * 3 * ratio))


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _written(path: Path) -> int:
    """Bytes already on disk under ``path`` (a partial output a resumed write continues)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def human(nbytes: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def check_disk_space(path: str | Path, need_bytes: int, what: str, estimate: str,
                     hint: str = "") -> int:
    """Stop with an InputError naming ``path`` when the disk holding it has less than
    ``HEADROOM x need_bytes`` free (less what a partial output being resumed already holds);
    ``estimate`` says how ``need_bytes`` was computed. Returns the free bytes (logged)."""
    path = Path(path)
    free = int(shutil.disk_usage(_existing(path.parent)).free)
    need_bytes = max(int(need_bytes) - _written(partial_path(path)), 0)  # a resumed write
    want = int(need_bytes * HEADROOM)
    if free < want:
        raise InputError(path, f"not enough disk space for the {what}: it needs about "
                               f"{human(need_bytes)} ({estimate}) and {human(free)} is free "
                               f"there; nothing was written. Free space or move results/ to "
                               f"a larger disk{', ' + hint if hint else ''}, then rerun")
    log.info("%s: the %s needs about %s (%s); %s free", path, what, human(need_bytes), estimate,
             human(free))
    return free


def check_dense_map_space(path: str | Path, n_genes: int, height: int, width: int,
                          dtype: str = "float32") -> int:
    """:func:`check_disk_space` for a dense map of ``n_genes`` x ``height`` x ``width``."""
    need = dense_map_bytes(n_genes, height, width, dtype)
    hint = "or set predict.dense_dtype: float16 (half the size)" if dtype != "float16" else ""
    return check_disk_space(path, need, "dense map",
                            f"{n_genes} genes x {height} x {width} px x {np.dtype(dtype).itemsize}"
                            " bytes + mask, x 4/3 for the pyramid, no compression assumed", hint)


def check_bin_table_space(path: str | Path, n_bins: int, nnz: int, bin_um: float) -> int:
    """:func:`check_disk_space` for a table of ``n_bins`` bins with ``nnz`` non-zero counts."""
    what = f"{bin_um:g} um bin table" if bin_um else "high-resolution table"
    return check_disk_space(path, bin_table_bytes(n_bins, nnz), what,
                            f"{n_bins} bins, {nnz} non-zero counts x 8 bytes + "
                            f"{BIN_OBS_BYTES} bytes a bin, uncompressed .h5ad")


def check_tile_store_space(path: str | Path, n_tiles: int, tile_px: int,
                           compression: str = "zstd") -> int:
    """:func:`check_disk_space` for a tile store of ``n_tiles`` RGB tiles."""
    ratio = TILE_ZSTD_RATIO if compression != "none" else 1.0
    return check_disk_space(path, tile_store_bytes(n_tiles, tile_px, compression), "tile store",
                            f"{n_tiles} tiles x {tile_px}^2 px x 3 bytes x {ratio:g} "
                            f"({compression})",
                            "or set tiling.write_tiles: false (no rule reads the tiles)")
