"""The run manifest: ``results/manifest.json``, written by the workflow's last rule (``manifest``,
a target of ``rule all``), and ``histomap verify`` that checks a results folder against it.

What it records:

* ``outputs``: every file under the results folder (zarr stores file by file) with its size and
  SHA-256, by path relative to the folder (so the folder can be moved or copied and verified);
  left out: the manifest itself, its hash cache, ``*.partial``/``*.old`` leftovers of
  interrupted writers, ``writer.lock`` and Snakemake's ``.snakemake_timestamp`` files;
* ``inputs``: the sample sheet, the config files and every sample's source files and images
  (folders file by file), size and SHA-256;
* ``config``: the merged config the run used; ``configfiles``: the files it came from;
* ``code``: ``git describe --always --dirty --tags`` of the workflow's checkout where it is a git
  repository, the histomap version, and a SHA-256 of the package's sources (always);
* ``versions``: Python and every installed distribution's version; ``machine``.

Hashing a large results folder takes a while (about 1 GB/s); unchanged files (same size and
modification time as when last hashed) take their hash from ``.manifest_cache.json`` beside the
manifest. :func:`verify` never uses that cache: it reads every file.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histomap.checked_io import sha256_file

log = logging.getLogger(__name__)

FORMAT = "histomap.manifest/1"
NAME = "manifest.json"
CACHE = ".manifest_cache.json"
SKIP_NAMES = {NAME, CACHE, "writer.lock", ".snakemake_timestamp"}
SKIP_SUFFIXES = (".partial", ".old")


class _HashCache:
    """SHA-256 by (path, size, mtime_ns), kept in a JSON file between runs."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.used = path, {}, {}
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, file: Path) -> tuple[int, str]:
        stat = file.stat()
        key = str(file.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            digest = hit[2]
        else:
            digest = sha256_file(file)
        self.used[key] = [stat.st_size, stat.st_mtime_ns, digest]
        return stat.st_size, digest

    def save(self) -> None:
        if self.path is not None:
            from histomap.outputs import write_text_atomic

            write_text_atomic(self.path, json.dumps(self.used))


def _skipped(rel: Path) -> bool:
    return any(part in SKIP_NAMES or part.endswith(SKIP_SUFFIXES) for part in rel.parts)


def result_files(results_dir: str | Path) -> list[Path]:
    """Every file the manifest covers, relative to ``results_dir``, sorted."""
    results_dir = Path(results_dir)
    files = []
    for root, dirs, names in os.walk(results_dir):
        rel_root = Path(root).relative_to(results_dir)
        dirs[:] = sorted(d for d in dirs if not _skipped(rel_root / d))
        files += [rel_root / n for n in names if not _skipped(rel_root / n)]
    return sorted(files)


def _entries(files: Iterable[tuple[str, Path]], cache: _HashCache) -> dict[str, dict]:
    out = {}
    for name, path in files:
        size, digest = cache.sha256(path)
        out[name] = {"size": size, "sha256": digest}
    return out


def _expand(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(name, file) of files and of every file inside folders; missing paths are skipped."""
    out = []
    for p in dict.fromkeys(str(p) for p in paths if p):
        path = Path(p)
        if path.is_dir():
            out += [(str(Path(p) / f.relative_to(path)), f) for f in sorted(path.rglob("*"))
                    if f.is_file()]
        elif path.is_file():
            out.append((p, path))
    return out


def code_version(repo_dir: str | Path | None = None) -> dict:
    """git describe of the checkout (None outside git), histomap's version, its sources' hash."""
    from histomap import __version__
    from histomap.training.fingerprint import source_identity

    git = None
    if repo_dir is not None:
        try:
            res = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"],
                                 cwd=repo_dir, capture_output=True, text=True, timeout=30)
            git = (res.stdout.strip() or None) if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            git = None
    return {"git": git, "histomap": __version__, "source_sha256": source_identity()}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            versions[name.lower()] = dist.version
    return dict(sorted(versions.items()))


def _plain(value: Any) -> Any:
    """The config as JSON (Snakemake's config may hold its own mapping and path types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_manifest(results_dir: str | Path, *, config: Mapping | None = None,
                   configfiles: Sequence[str | Path] = (), inputs: Sequence[str | Path] = (),
                   repo_dir: str | Path | None = None, use_cache: bool = True) -> dict:
    """The manifest of ``results_dir`` (see the module docstring) as a dict."""
    results_dir = Path(results_dir)
    cache = _HashCache(results_dir / CACHE if use_cache else None)
    outputs = _entries(((str(rel), results_dir / rel) for rel in result_files(results_dir)),
                       cache)
    input_files = _expand([*configfiles, *inputs])
    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results_dir": str(results_dir),
        "outputs": outputs,
        "inputs": _entries(input_files, cache),
        "configfiles": [str(p) for p in configfiles],
        "config": _plain(config or {}),
        "code": code_version(repo_dir),
        "versions": {"python": sys.version.split()[0], "packages": package_versions()},
        "machine": {"system": platform.system(), "machine": platform.machine(),
                    "node": platform.node()},
    }
    cache.save()
    return manifest


def write_manifest(results_dir: str | Path, out: str | Path | None = None, **kwargs) -> Path:
    """Build the manifest of ``results_dir`` and write it (atomically) as ``out`` (default
    ``results_dir/manifest.json``)."""
    from histomap.outputs import write_text_atomic

    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / NAME
    manifest = build_manifest(results_dir, **kwargs)
    write_text_atomic(out, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    total = sum(e["size"] for e in manifest["outputs"].values())
    log.info("%s: %d output files (%.1f MB), %d input files, code %s", out,
             len(manifest["outputs"]), total / 1e6, len(manifest["inputs"]),
             manifest["code"]["git"] or manifest["code"]["histomap"])
    return out


@dataclass
class Verification:
    """What :func:`verify` found: files that changed, went missing, or are new (not failures)."""

    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    inputs_changed: list[str] = field(default_factory=list)
    inputs_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.inputs_changed or self.inputs_missing)

    def lines(self) -> list[str]:
        return ([f"changed: {p}" for p in self.changed] + [f"missing: {p}" for p in self.missing]
                + [f"input changed: {p}" for p in self.inputs_changed]
                + [f"input missing: {p}" for p in self.inputs_missing]
                + [f"not in the manifest: {p}" for p in self.extra])


def read_manifest(path: str | Path) -> dict:
    from histomap.errors import InputError

    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(path, "no manifest there (the workflow's `manifest` rule writes it at "
                               "the end of a run)") from exc
    except ValueError as exc:
        raise InputError(path, f"not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(path, f"not a histomap manifest (format {FORMAT!r} expected)")
    return manifest


def verify(results_dir: str | Path = "results", manifest_path: str | Path | None = None, *,
           inputs: bool = False) -> Verification:
    """Check every output file of the manifest (size, then SHA-256 read afresh) and, with
    ``inputs``, every input file; files under ``results_dir`` the manifest lacks are listed as
    extra (not a failure)."""
    results_dir = Path(results_dir)
    manifest = read_manifest(manifest_path or results_dir / NAME)
    found = Verification()

    def check(entries: Mapping[str, Mapping], base: Path | None, changed: list, missing: list):
        for name, entry in entries.items():
            path = base / name if base is not None else Path(name)
            found.checked += 1
            if not path.is_file():
                missing.append(name)
            elif (path.stat().st_size != entry["size"]
                  or sha256_file(path) != entry["sha256"]):
                changed.append(name)

    check(manifest["outputs"], results_dir, found.changed, found.missing)
    if inputs:
        check(manifest["inputs"], None, found.inputs_changed, found.inputs_missing)
    recorded = set(manifest["outputs"])
    found.extra = [str(p) for p in result_files(results_dir) if str(p) not in recorded]
    return found
