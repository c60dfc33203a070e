"""The SR ``model.pt``: what training writes and prediction and application load.

Arrow: **SR model** -> predictions (predict_*, apply_sr): dict(format, method, variant,
model_config, genes, state_dict, trainable, diffusion, value_range, task, pairs, train,
validation, summary, adjacency) loadable with ``torch.load(weights_only=True)``; a bundle that
rebuilds its network alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histomap import __version__
from histomap.errors import InputError
from histomap.tasks.superres.methods import build_sr_model

if TYPE_CHECKING:
    import torch
    from torch import nn

SR_MODEL_FORMAT = "histomap.srmodel/1"


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_sr_model(path: str | Path, model: nn.Module, *, method: str, genes: Sequence[str],
                  trainable: bool, **meta: Any) -> Path:
    """Write ``model.pt`` atomically (see the module docstring)."""
    from histomap.compat import torch
    from histomap.train import atomic_save

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"method {method!r}: the model has no .config to rebuild it from")
    payload = {"format": SR_MODEL_FORMAT, "method": method, "model_config": dict(config),
               "genes": [str(g) for g in genes], "trainable": bool(trainable),
               "state_dict": _cpu_state(model) if trainable else {},
               "histomap_version": __version__, "torch_version": str(torch.__version__),
               **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(payload, path)


def read_sr_payload(path: Path) -> dict:
    """The checked contents of an SR ``model.pt`` (weights included)."""
    from histomap.train import read_model_payload

    return read_model_payload(path, SR_MODEL_FORMAT, "histomap SR model",
                              missing="model file does not exist (run the train_diffst or "
                                      "train_sr_baseline rule)")


def load_sr_model(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, metadata without the state dict) of a ``model.pt``."""
    from histomap.train import resolve_device

    path = Path(path)
    payload = read_sr_payload(path)
    config = dict(payload["model_config"])
    if "pretrained_checkpoint" in config:  # model.pt holds every weight
        config["pretrained_checkpoint"] = None
    model = build_sr_model(payload["method"], len(payload["genes"]), config)
    if payload["trainable"]:
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise InputError(path, f"weights do not fit method {payload['method']!r}: {exc}"
                             ) from exc
    model.to(resolve_device(device)).eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


def sr_model_meta(model_path: str | Path) -> dict:
    """An SR ``model.pt``'s description (no network built): method, genes, ``pairs`` (factor,
    shapes, normalisation, training target sum, H&E size)."""
    payload = read_sr_payload(Path(model_path))
    return {k: v for k, v in payload.items() if k != "state_dict"}
