"""The run manifest (results/manifest.json, histomap.manifest) and `histomap verify`."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from histomap import __version__
from histomap.cli import main as cli_main
from histomap.errors import InputError
from histomap.manifest import read_manifest, verify, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path):
    """A tiny workflow folder: a config, a sample file and a results folder with a table, a
    zarr-like store and the leftovers the manifest must ignore."""
    (tmp_path / "config.yaml").write_text("models: [pixnet]\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "S1.tsv").write_text("\tGA\n1x1\t5\n")
    results = tmp_path / "results"
    (results / "report").mkdir(parents=True)
    (results / "report" / "benchmark.csv").write_text("model,value\npixnet,0.5\n")
    store = results / "predictions" / "dense.zarr" / "0"
    store.mkdir(parents=True)
    (store / "c").write_bytes(bytes(range(256)) * 4)
    (results / "predictions" / "dense.zarr" / "zarr.json").write_text("{}")
    (results / "models" / "m.zarr.partial").mkdir(parents=True)  # an interrupted writer's
    (results / "models" / "m.zarr.partial" / "x").write_text("half")
    (results / "models" / "writer.lock").write_text("{}")
    write_manifest(results, config={"models": ["pixnet"], "train": {"seed": 0}},
                   configfiles=[str(tmp_path / "config.yaml")],
                   inputs=[str(tmp_path / "data")], repo_dir=REPO)
    return tmp_path


def test_manifest_records_outputs_inputs_config_and_versions(run):
    manifest = read_manifest(run / "results" / "manifest.json")
    assert sorted(manifest["outputs"]) == ["predictions/dense.zarr/0/c",
                                           "predictions/dense.zarr/zarr.json",
                                           "report/benchmark.csv"]
    table = (run / "results" / "report" / "benchmark.csv").read_bytes()
    assert manifest["outputs"]["report/benchmark.csv"] == {
        "size": len(table), "sha256": hashlib.sha256(table).hexdigest()}
    inputs = manifest["inputs"]
    assert set(inputs) == {str(run / "config.yaml"), str(run / "data" / "S1.tsv")}
    assert inputs[str(run / "config.yaml")]["sha256"] == hashlib.sha256(
        b"models: [pixnet]\n").hexdigest()
    assert manifest["config"] == {"models": ["pixnet"], "train": {"seed": 0}}
    code = manifest["code"]
    assert code["histomap"] == __version__ and len(code["source_sha256"]) == 64
    assert code["git"]  # this checkout is a git repository
    assert manifest["versions"]["packages"]["torch"] and manifest["versions"]["python"]


def test_verify_passes_then_names_the_changed_and_missing_files(run, capsys):
    results = run / "results"
    found = verify(results)
    assert found.ok and found.checked == 3 and not found.extra
    assert cli_main(["verify", str(results)]) == 0
    assert "OK: 3 files match" in capsys.readouterr().out

    # one byte of one file: verify fails naming that file only
    chunk = results / "predictions" / "dense.zarr" / "0" / "c"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    found = verify(results)
    assert not found.ok and found.changed == ["predictions/dense.zarr/0/c"]
    assert not found.missing
    assert cli_main(["verify", str(results)]) == 1
    out = capsys.readouterr()
    assert "changed: predictions/dense.zarr/0/c" in out.out and "report/" not in out.out
    assert "FAILED: 1 of 3 files" in out.err

    # a missing file is named as missing; a new file is listed but does not fail
    (results / "report" / "benchmark.csv").unlink()
    (results / "report" / "new.png").write_bytes(b"png")
    found = verify(results)
    assert found.missing == ["report/benchmark.csv"] and found.extra == ["report/new.png"]
    assert cli_main(["verify", str(results)]) == 1
    out = capsys.readouterr().out
    assert "missing: report/benchmark.csv" in out and "not in the manifest: report/new.png" in out


def test_verify_checks_inputs_on_request(run):
    (run / "data" / "S1.tsv").write_text("\tGA\n1x1\t6\n")
    assert verify(run / "results").ok
    found = verify(run / "results", inputs=True)
    assert found.inputs_changed == [str(run / "data" / "S1.tsv")] and not found.ok


def test_the_hash_cache_is_used_for_unchanged_files_only(run, monkeypatch):
    import histomap.manifest as manifest_mod

    hashed = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    table = run / "results" / "report" / "benchmark.csv"
    table.write_text("model,value\npixnet,0.25\n")  # changed since the manifest was written
    write_manifest(run / "results", repo_dir=None)
    assert hashed == [table]
    assert verify(run / "results").ok


def test_verify_cli_without_a_manifest_and_as_a_command(tmp_path):
    (tmp_path / "results").mkdir()
    assert cli_main(["verify", str(tmp_path / "results")]) == 1
    with pytest.raises(InputError, match="no manifest"):
        verify(tmp_path / "results")
    (tmp_path / "results" / "a.txt").write_text("a")
    write_manifest(tmp_path / "results")
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    assert list(manifest["outputs"]) == ["a.txt"] and manifest["code"]["git"] is None
    # the console entry point, run from the workflow's folder with the default RESULTS_DIR
    res = subprocess.run([sys.executable, "-m", "histomap.cli", "verify"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK: 1 files match" in res.stdout, res.stderr
    (tmp_path / "results" / "a.txt").write_text("b")
    res = subprocess.run([sys.executable, "-m", "histomap.cli", "verify"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "changed: a.txt" in res.stdout
