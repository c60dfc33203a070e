"""Deployable models: one self-describing bundle per trained model (the ``train_final`` rule).

Arrow of the DESIGN.md picture: normalised spots + slides -> model, trained once on every ST
sample of a run (no test fold: validation blocks for early stopping as in the benchmark), then
``-> applied to H&E-only slides`` by :mod:`histomap.tasks.apply`.

Bundle layout (a folder, e.g. ``results/bundles/{model}/seed{seed}/``)
---------------------------------------------------------------------
* ``model.pt``: the weights and everything :func:`histomap.train.load_model` needs to rebuild
  the network (architecture, its keyword configuration, genes, task options such as
  ``input_mpp`` and ``window_px``); the same file the benchmark's ``predict_*`` rules read.
* ``bundle.json``: what a user (or ``apply``) needs to know without loading torch:
  ``format`` (:data:`BUNDLE_FORMAT`), ``name`` (the run's model name, e.g. a variant),
  ``architecture`` (stnet | histogene | istar | pixnet), ``kind`` (``dense``: predicts a map,
  spots of any size are read out of it; ``spot``: one value per crop), ``genes`` (the output
  channels, in order), ``normalisation`` (the units of every prediction: ``target_sum``,
  ``log1p``: natural log of ``counts / total * target_sum + 1``), ``input`` (``mpp`` the model
  reads the H&E at; ``window_px`` and ``out_stride`` for dense models, ``crop_um`` for spot
  models; ``spot_diameters_um`` it was trained on), ``encoder`` (``name``, its keyword
  configuration, ``checkpoint``: path, size and SHA-256 of the local weights it started from, or
  null for random initialisation), ``model_config`` (the network's keyword arguments),
  ``training`` (samples, seed, ``train`` and ``validation`` settings, best epoch and validation
  loss), ``versions`` (histomap, torch, timm, python) and ``model_file`` (``model.pt`` and its
  SHA-256, checked when the bundle is read); for a model trained on stain-normalised slides,
  ``stain`` (``method`` and ``reference``: the :class:`~histomap.data.stain.StainProfile` fitted
  on its training slides), to which every slide it is applied to is normalised first.
"""
from __future__ import annotations

import json
import logging
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histomap import __version__
from histomap.checked_io import load_torch_checked, read_h5ad_checked, sha256_file
from histomap.compat import timm, torch
from histomap.data.sample import geometry
from histomap.errors import InputError
from histomap.models import DENSE_MODELS
from histomap.outputs import write_text_atomic

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "histomap.bundle/1"
MODEL_FILE = "model.pt"
META_FILE = "bundle.json"
DENSE_ARCHITECTURES = DENSE_MODELS
SPOT_ARCHITECTURES = ("stnet", "histogene")  # the spot models a bundle holds (not the probe)
ENCODER_KEYS = ("encoder", "backbone", "features", "encoder_cfg", "tap_blocks")


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk: its folder, ``model.pt`` and the ``bundle.json`` contents."""

    path: Path
    meta: dict

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def architecture(self) -> str:
        return str(self.meta["architecture"])

    @property
    def is_dense(self) -> bool:
        return self.meta["kind"] == "dense"

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def stain(self):
        """The stain reference the model's slides were normalised to, or None."""
        from histomap.data.stain import StainProfile

        block = self.meta.get("stain")
        if not block:
            return None
        try:
            return StainProfile.from_json(block["reference"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(self.path / META_FILE, f"unreadable stain reference: {exc}") from exc


def checkpoint_reference(checkpoint: str | Path | None) -> dict | None:
    """Path, size and SHA-256 of local encoder weights (``None``: random initialisation)."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if not path.is_file():
        return {"path": str(checkpoint)}
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def versions() -> dict:
    return {"histomap": __version__, "torch": str(torch.__version__),
            "timm": str(timm.__version__), "python": platform.python_version()}


def _plain(value):
    """JSON-able copy of a metadata value (tensors and arrays as lists, paths as strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _training_spots(st_paths: Sequence[str | Path]) -> tuple[list[str], list[float], dict | None]:
    """Sample names, distinct spot diameters and the normalisation recorded in the spot tables."""
    names, diameters, normalisation = [], set(), None
    for path in st_paths:
        spots = read_h5ad_checked(path, backed="r", what="normalised spot table")
        geo = geometry(spots)
        names.append(str(geo.get("sample") or Path(path).stem))
        if "diameter_um" in spots.obs:
            diameters.update(float(d) for d in np.unique(spots.obs["diameter_um"].to_numpy()))
        else:
            diameters.add(float(geo["spot_diameter_um"]))
        recorded = geo.get("normalisation")
        if recorded is not None:
            recorded = {k: _plain(v) for k, v in dict(recorded).items()}
            if normalisation is not None and recorded != normalisation:
                raise InputError(path, f"normalised as {recorded}, unlike the other training "
                                       f"samples ({normalisation})")
            normalisation = recorded
        spots.file.close()
    return names, sorted(diameters), normalisation


def describe(model_path: str | Path, *, name: str, st_paths: Sequence[str | Path],
             model_cfg: Mapping, seed: int) -> dict:
    """The ``bundle.json`` contents of a trained ``model.pt`` (see the module docstring)."""
    payload = load_torch_checked(model_path, what="histomap model")
    architecture = str(payload["model_name"])
    config = dict(payload["model_config"])
    extra = dict(payload.get("extra", {}))
    samples, diameters, normalisation = _training_spots(st_paths)
    if normalisation is None:
        raise InputError(st_paths[0], "training spots carry no uns['histomap']['normalisation']")
    if architecture in DENSE_ARCHITECTURES:
        kind = "dense"
        inputs = {"mpp": float(extra["input_mpp"]), "window_px": int(extra["window_px"]),
                  "out_stride": int(extra.get("out_stride") or config.get("out_stride")),
                  "predict_tile_px": extra.get("predict_tile_px"),
                  "predict_overlap_px": extra.get("predict_overlap_px")}
    else:
        kind = "spot"
        crop = extra.get("crop_um") or model_cfg.get("crop_um")
        inputs = {"mpp": float(extra["input_mpp"]),
                  "crop_um": float(crop) if crop else float(np.median(diameters))}
    inputs["spot_diameters_um"] = diameters
    checkpoint = model_cfg.get("checkpoint") or config.get("pretrained_checkpoint")
    encoder = {k: config[k] for k in ENCODER_KEYS if config.get(k) is not None}
    encoder["name"] = (config.get("encoder") or config.get("backbone")
                       or config.get("features") or architecture)
    encoder["checkpoint"] = checkpoint_reference(checkpoint)
    return _plain({
        "format": BUNDLE_FORMAT,
        "name": name,
        "architecture": architecture,
        "kind": kind,
        "genes": list(payload["genes"]),
        "normalisation": normalisation,
        "input": inputs,
        "encoder": encoder,
        "model_config": config,
        "training": {"samples": samples, "seed": int(seed), "train": extra.get("train"),
                     "validation": extra.get("validation"),
                     "best_epoch": extra.get("best_epoch"),
                     "best_val_loss": extra.get("best_val_loss")},
        "versions": {**versions(), "model_file_histomap": payload.get("histomap_version"),
                     "model_file_torch": payload.get("torch_version")},
        "model_file": {"name": MODEL_FILE, "sha256": sha256_file(model_path)},
    })


def write_meta(out_dir: str | Path, meta: Mapping) -> Path:
    return write_text_atomic(Path(out_dir) / META_FILE,
                             json.dumps(meta, indent=2, allow_nan=True) + "\n")


def train_bundle(architecture: str, st_paths: Sequence[str | Path],
                 slide_paths: Sequence[str | Path], genes: Sequence[str], *, name: str,
                 model_cfg: Mapping, train_cfg: Mapping, validation: Mapping, seed: int,
                 out_dir: str | Path, checkpoint_dir: str | Path,
                 extra_st_paths: Sequence[Sequence[str | Path]] | None = None,
                 stain_reference: str | Path | None = None) -> Bundle:
    """Train ``architecture`` on every given ST sample (validation blocks carved out of them,
    as in the benchmark folds) and write the bundle folder ``out_dir``: ``model.pt``,
    ``train_log.csv``, ``bundle.json``. The same training functions as the benchmark's
    ``train_*`` rules, so a bundle and a fold model trained on the same samples agree.
    ``stain_reference``: the stain profile the ``slide_paths`` were normalised to (recorded in
    the bundle, applied to every slide the bundle is applied to)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(model_cfg=model_cfg, train_cfg=train_cfg, validation=validation, seed=seed,
                  out_model=out_dir / MODEL_FILE, out_log=out_dir / "train_log.csv",
                  checkpoint_dir=checkpoint_dir)
    if architecture in DENSE_ARCHITECTURES:
        from histomap.tasks.dense import train_pixnet

        train_pixnet(st_paths, slide_paths, genes, model_name=architecture,
                     extra_st_paths=extra_st_paths, **common)
    elif architecture == "histogene":
        from histomap.tasks.histogene import train_histogene

        train_histogene(st_paths, slide_paths, genes, **common)
    elif architecture == "stnet":
        from histomap.tasks.spot import train_spot_model

        train_spot_model(st_paths, slide_paths, genes, model_name=architecture, **common)
    else:
        raise ValueError(f"no bundle for architecture {architecture!r}; known: "
                         f"{DENSE_ARCHITECTURES + SPOT_ARCHITECTURES}")
    meta = describe(out_dir / MODEL_FILE, name=name, st_paths=st_paths, model_cfg=model_cfg,
                    seed=seed)
    if stain_reference is not None:
        from histomap.data.stain import StainProfile

        reference = StainProfile.read(stain_reference)
        meta["stain"] = {"method": reference.method, "reference": reference.to_json()}
    write_meta(out_dir, meta)
    log.info("bundle %s (%s, %d genes, trained on %s) -> %s", name, architecture,
             len(meta["genes"]), ", ".join(meta["training"]["samples"]), out_dir)
    return Bundle(out_dir, meta)


def read_bundle(path: str | Path, *, check_weights: bool = True) -> Bundle:
    """Open a bundle folder (or its ``bundle.json``); an :class:`InputError` names what is
    missing or inconsistent (a model file that is not the one described, unknown format)."""
    path = Path(path)
    folder = path.parent if path.name == META_FILE else path
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise InputError(meta_path, "bundle description missing: a bundle folder holds "
                                    f"{META_FILE} and {MODEL_FILE} (written by train_final)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(meta_path, f"cannot read the bundle description: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise InputError(meta_path, f"not a histomap bundle (expected format {BUNDLE_FORMAT})")
    missing = [k for k in ("name", "architecture", "kind", "genes", "normalisation", "input")
               if k not in meta]
    if missing:
        raise InputError(meta_path, f"bundle description lacks {', '.join(missing)}")
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise InputError(model_path, f"the bundle's model file is missing: a bundle folder "
                                     f"holds {META_FILE} and {MODEL_FILE}; copy the bundle "
                                     "folder as a whole (or rerun train_final)")
    recorded = meta.get("model_file", {}).get("sha256")
    if check_weights and recorded and sha256_file(model_path) != recorded:
        raise InputError(model_path, f"weights differ from those {META_FILE} describes "
                                     "(SHA-256 mismatch: a corrupt, truncated or replaced "
                                     "copy); copy the bundle folder as a whole again (or "
                                     "delete it and rerun train_final)")
    return Bundle(folder, meta)


def bundle_name(path: str | Path) -> str:
    """The ``name`` recorded in a bundle (read at workflow start-up, before any job runs)."""
    return read_bundle(path, check_weights=False).name

