"""Model registry: every trainable model of histomap, built by name from a config dict, and the
model families the workflow plans by (arrow: ... -> model).

The families are the one definition of which model is what; the workflow's planning
(:mod:`histomap.plan`) and the tasks import them from here:

* :data:`SPOT_MODELS`: one image crop per spot (ST-Net-style, HisToGene-style, the linear probe);
* :data:`DENSE_MODELS`: a dense map, spots of any diameter read out of it (PixNet, iStar-style);
* :data:`BASELINE_MODELS`: no network (the training spots' per-gene mean, constant over space).

Adding a model is one line in :data:`MODEL_CLASSES` (its module and class) and its name in a
family. The network classes are imported on first use (``MODELS``, ``build_model`` or a class
name), so reading the families does not import torch: Snakemake plans at start-up without it.
Conventions every model follows:

* the constructor takes ``n_genes`` first, then keyword-only configuration (plain JSON-like
  values, so the config can be stored in ``model.pt`` and rebuilt by
  :func:`histomap.train.load_model`);
* a backbone initialised from a local file names it ``pretrained_checkpoint``; it is ignored when
  a trained ``model.pt`` is loaded (its state dict already holds every weight);
* ``model.config`` returns the keyword configuration that rebuilds the model (an ``n_genes``
  entry in it is accepted and checked).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

SPOT_MODELS = ("stnet", "histogene", "probe")  # one image crop per spot
DENSE_MODELS = ("pixnet", "istar")  # a dense map, spots read out of it at any diameter
BASELINE_MODELS = ("mean",)  # the training spots' per-gene mean, constant over space
MODEL_FAMILIES = SPOT_MODELS + DENSE_MODELS + BASELINE_MODELS

# registered name -> (module, class) of every trainable network (the families but baselines)
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "stnet": ("histomap.models.stnet", "STNet"),
    "pixnet": ("histomap.models.pixnet", "PixNet"),
    "histogene": ("histomap.models.histogene", "HistoGene"),
    "istar": ("histomap.models.istar", "IStar"),
    "probe": ("histomap.models.probe", "LinearProbe"),
}
_CLASS_MODULES = {cls: module for module, cls in MODEL_CLASSES.values()}  # class -> module


def _registry() -> dict[str, type[nn.Module]]:
    """``MODELS``, imported on first use and kept (so a test may replace it)."""
    if "MODELS" not in globals():
        globals()["MODELS"] = {name: getattr(importlib.import_module(module), cls)
                               for name, (module, cls) in MODEL_CLASSES.items()}
    return globals()["MODELS"]


def __getattr__(name: str) -> Any:
    """Lazy attributes: ``MODELS`` and the network classes (``STNet``, ``PixNet``, ...)."""
    if name == "MODELS":
        return _registry()
    if name in _CLASS_MODULES:
        return getattr(importlib.import_module(_CLASS_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(name: str, n_genes: int, /, **cfg) -> nn.Module:
    """Build the registered model ``name`` predicting ``n_genes`` genes from keyword ``cfg``."""
    models = _registry()
    try:
        cls = models[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(models)}") from None
    if "n_genes" in cfg:  # a stored config may repeat it (e.g. PixNet.config)
        stored = int(cfg.pop("n_genes"))
        if stored != n_genes:
            raise ValueError(f"model {name!r}: config says {stored} genes, {n_genes} requested")
    try:
        return cls(n_genes, **cfg)
    except TypeError as exc:
        raise ValueError(f"bad configuration for model {name!r} {cfg}: {exc}") from exc


__all__ = ["BASELINE_MODELS", "DENSE_MODELS", "MODELS", "MODEL_CLASSES", "MODEL_FAMILIES",
           "SPOT_MODELS", "HistoGene", "IStar", "LinearProbe", "PixNet", "STNet", "build_model"]
