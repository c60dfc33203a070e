"""Atomic outputs: a file or a zarr folder appears complete or not at all; a full disk names the
path and leaves nothing partial."""
from __future__ import annotations

import errno

import pytest

from histomap.errors import InputError
from histomap.outputs import atomic_output, write_text_atomic


def test_file_and_folder_replace_atomically(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    write_text_atomic(path, "a\n")
    write_text_atomic(path, "b\n")
    assert path.read_text() == "b\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    store = tmp_path / "map.zarr"
    for value in ("old", "new"):
        with atomic_output(store) as tmp:
            tmp.mkdir()
            (tmp / "chunk").write_text(value)
    assert (store / "chunk").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.zarr", "sub"]


def test_failure_keeps_the_previous_output_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    write_text_atomic(path, "complete\n")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "complete\n" and [p.name for p in tmp_path.iterdir()] == [
        "table.csv"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_output(tmp_path / "empty.csv"):
            pass
    assert not (tmp_path / "empty.csv").exists()


def test_disk_full_names_the_path_and_leaves_nothing(tmp_path):
    path = tmp_path / "dense.zarr"
    with pytest.raises(InputError, match="no space left") as exc:
        with atomic_output(path) as tmp:
            tmp.mkdir()
            (tmp / "0.0").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert exc.value.path == str(path) and "MiB free" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
