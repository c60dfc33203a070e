"""Outputs written atomically: under a ``.partial`` name first, renamed when complete, so a
failed step leaves nothing that looks finished.

One mechanism for every writer of the package::

    with atomic_output(out_zarr) as tmp:
        write_store(tmp)          # a file or a folder (zarr), written under the temporary name
    # renamed onto out_zarr here; on any exception the temporary is removed and out_zarr is
    # left as it was (absent, or the previous complete version)
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histomap.errors import InputError


def partial_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (in its own folder, so the rename is
    atomic; a writer that resumes finds its earlier partial output there)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def remove_path(path: Path) -> None:
    """Remove a file, folder (zarr) or link if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: str | Path, *, mode: int = 0o644,
                  keep_partial_on: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path`` under; rename it onto ``path`` when the
    block ends without an exception, remove it otherwise.

    Works for files and folders (zarr stores): an existing folder at ``path`` is moved aside
    and deleted only after the new one is in place. The parent folder is created; the written
    file gets ``mode`` (outputs are meant to be shared, not the 0600 of a private temp file).

    ``keep_partial_on`` (resumable writers, :func:`histomap.interrupt.resumable_output`): a
    partial folder left by an earlier run is not removed but handed to the writer to resume,
    and an exception of these types keeps the partial output for the next run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    if not (keep_partial_on and tmp.is_dir()):
        remove_path(tmp)
    old = path.with_name(path.name + ".old")
    keep = False
    try:
        try:
            yield tmp
        except keep_partial_on:
            keep = True
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full(path) from exc
            raise
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: nothing was written under {tmp.name}")
        if tmp.is_file():
            os.chmod(tmp, mode)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # a folder cannot be renamed onto a non-empty folder
        os.replace(tmp, path)
    finally:
        if not keep:
            remove_path(tmp)
        remove_path(old)


def disk_full(path: Path) -> InputError:
    """The error of a write that ran out of space: the path, the space left, what to do."""
    free = shutil.disk_usage(next(p for p in Path(path).absolute().parents if p.exists())).free
    return InputError(path, f"no space left on the device while writing it ({free / 2**20:.0f} "
                            "MiB free there); nothing partial was kept: free space or move "
                            "results/ to a larger disk, then rerun")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
