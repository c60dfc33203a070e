"""The trained model's file (train_{model} writes it, predict_{model} and apply read it):
``model.pt`` holds the weights with the registered model's name, config and genes
(:func:`save_model`), rebuilt through :mod:`histomap.models`' registry by :func:`load_model`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from histomap import __version__
from histomap.checked_io import REMEDY_RESULT, load_torch_checked, save_torch_checked
from histomap.compat import torch
from histomap.errors import InputError
from histomap.training.device import resolve_device

MODEL_FORMAT = "histomap.model/1"


def cpu_state_dict(model: nn.Module) -> dict:
    """The model's state dict, detached copies on the CPU (what checkpoints and model.pt hold)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_model(path: str | Path, model: nn.Module, *, model_name: str,
               model_config: Mapping | None = None, genes: Sequence[str],
               extra: Mapping | None = None) -> Path:
    """Write ``model.pt`` atomically: dict(state_dict, model_name, model_config, genes,
    histomap_version, torch_version, extra), and its SHA-256 beside it (``model.pt.sha256``,
    checked when it is read: :func:`histomap.checked_io.load_torch_checked`).

    ``model_config`` (default ``model.config``) are the keyword arguments of the registered
    model; ``extra`` holds plain values (numbers, strings, lists, dicts, tensors) such as the
    patch size and mpp the model was trained at.
    """
    from histomap.models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"model {model_name!r} is not registered in histomap.models.MODELS")
    if model_config is None:
        model_config = getattr(model, "config", None)
        if model_config is None:
            raise ValueError("model_config is required for a model without a .config")
    genes = [str(g) for g in genes]
    n_genes = getattr(model, "n_genes", len(genes))
    if n_genes != len(genes):
        raise ValueError(f"model predicts {n_genes} genes but {len(genes)} gene names given")
    payload = {"format": MODEL_FORMAT, "state_dict": cpu_state_dict(model),
               "model_name": model_name,
               "model_config": dict(model_config), "genes": genes,
               "histomap_version": __version__, "torch_version": str(torch.__version__),
               "extra": dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_torch_checked(payload, path)


def read_model_payload(path: Path, model_format: str, kind: str, *,
                       missing: str = "model file does not exist") -> Mapping:
    """The saved dict of a model file of ``model_format`` (weights on the CPU), read without
    unpickling code; InputError naming ``path`` when it is missing (``missing``), does not match
    its SHA-256 sidecar, is unreadable (``"cannot read as a <kind>: corrupt or truncated ..."``)
    or of another format (``"not a <kind> file ..."``); the message says to delete it and rerun
    the training."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, missing)
    remedy = f"{REMEDY_RESULT} (the training that writes {path.name})"
    payload = load_torch_checked(path, what=kind, remedy=remedy)
    if not isinstance(payload, Mapping) or payload.get("format") != model_format:
        raise InputError(path, f"not a {kind} file (expected format {model_format})")
    return payload


def load_model(path: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model` through the registry; eval mode on ``device``.

    Returns (model, meta) where meta is the saved dict without the state dict. A
    ``pretrained_checkpoint`` in the config is not re-read: ``model.pt`` holds every weight.
    """
    from histomap.models import build_model

    path = Path(path)
    payload = read_model_payload(path, MODEL_FORMAT, "histomap model")
    config = dict(payload["model_config"])
    if "pretrained_checkpoint" in config:
        config["pretrained_checkpoint"] = None
    model = build_model(payload["model_name"], len(payload["genes"]), **config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit model {payload['model_name']!r}: {exc}"
                         ) from exc
    model.to(resolve_device(device)).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
