"""Outputs written atomically: under a ``.partial`` name first, renamed when complete, so a
failed step leaves nothing that looks finished."""
from __future__ import annotations

import shutil
from pathlib import Path


def partial_path(path: Path) -> Path:
    """The temporary name ``path`` is written under."""
    return path.with_name(path.name + ".partial")


def remove_path(path: Path) -> None:
    """Remove a file, folder (zarr) or link if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
