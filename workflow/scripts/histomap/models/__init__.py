"""Model registry: every trainable model of histomap, built by name from a config dict.

Adding a model is one import and one line in :data:`MODELS`. Conventions every model follows:

* the constructor takes ``n_genes`` first, then keyword-only configuration (plain JSON-like
  values, so the config can be stored in ``model.pt`` and rebuilt by
  :func:`histomap.train.load_model`);
* a backbone initialised from a local file names it ``pretrained_checkpoint``; it is ignored when
  a trained ``model.pt`` is loaded (its state dict already holds every weight);
* ``model.config`` returns the keyword configuration that rebuilds the model (an ``n_genes``
  entry in it is accepted and checked).
"""
from __future__ import annotations

from torch import nn

from histomap.models.histogene import HistoGene
from histomap.models.istar import IStar
from histomap.models.pixnet import PixNet
from histomap.models.probe import LinearProbe
from histomap.models.stnet import STNet

MODELS: dict[str, type[nn.Module]] = {
    "stnet": STNet,
    "pixnet": PixNet,
    "histogene": HistoGene,
    "istar": IStar,
    "probe": LinearProbe,
}


def build_model(name: str, n_genes: int, /, **cfg) -> nn.Module:
    """Build the registered model ``name`` predicting ``n_genes`` genes from keyword ``cfg``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}") from None
    if "n_genes" in cfg:  # a stored config may repeat it (e.g. PixNet.config)
        stored = int(cfg.pop("n_genes"))
        if stored != n_genes:
            raise ValueError(f"model {name!r}: config says {stored} genes, {n_genes} requested")
    try:
        return cls(n_genes, **cfg)
    except TypeError as exc:
        raise ValueError(f"bad configuration for model {name!r} {cfg}: {exc}") from exc


__all__ = ["MODELS", "HistoGene", "IStar", "LinearProbe", "PixNet", "STNet", "build_model"]
