"""ST-Net-style spot regressor: a CNN backbone on the H&E patch under a spot, then a linear head.

He et al. 2020 (ST-Net) predict each spot's expression from the image patch centred on it with a
DenseNet-121 and one linear layer. Here the backbone is any timm model (``num_classes=0`` gives
pooled features), optionally initialised from a local checkpoint (e.g. a pathology foundation
model); weights are never downloaded.

Input: (batch, 3, s, s) float patches normalised with ImageNet mean/std
(:class:`histomap.data.spot_patches.SpotDataset`). Output: (batch, n_genes) predicted log-normalised
expression.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from histomap.compat import timm, torch
from histomap.errors import InputError

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, with a ``state_dict``/``model`` wrapper and
    ``module.`` (DataParallel) key prefixes removed. Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "pretrained checkpoint file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(path, f"cannot read as a torch checkpoint: {exc}") from exc
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(path, f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(state) < len(obj):
        log.warning("%s: ignoring %d non-tensor entries", path, len(obj) - len(state))
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``backbone`` (``strict=False``), logging missing and
    unexpected keys; raise :class:`InputError` if nothing matches or a shape differs."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        raise InputError(path, f"no tensor of the checkpoint matches the backbone's parameter "
                               f"names (checkpoint keys start {list(state)[:3]}, backbone keys "
                               f"start {list(own)[:3]})")
    wrong_shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in matched if state[k].shape != own[k].shape]
    if wrong_shape:
        raise InputError(path, "checkpoint tensor shapes differ from the backbone: "
                               + "; ".join(wrong_shape[:5]))
    result = backbone.load_state_dict(state, strict=False)
    log.info("%s: loaded %d/%d backbone tensors", path, len(matched), len(own))
    if result.missing_keys:
        log.warning("%s: %d backbone keys missing from the checkpoint (left at random init): %s",
                    path, len(result.missing_keys), result.missing_keys)
    if result.unexpected_keys:
        log.warning("%s: %d checkpoint keys unused by the backbone: %s", path,
                    len(result.unexpected_keys), result.unexpected_keys)


class STNet(nn.Module):
    """timm backbone -> dropout -> linear head to ``n_genes`` log-normalised expression values."""

    def __init__(self, n_genes: int, *, backbone: str = "resnet18",
                 pretrained_checkpoint: str | None = None, dropout: float = 0.1):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.n_genes = int(n_genes)
        self.backbone_name = backbone
        self.pretrained_checkpoint = None if pretrained_checkpoint is None else str(
            pretrained_checkpoint)
        self.dropout_p = float(dropout)
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        if pretrained_checkpoint is not None:
            load_backbone_checkpoint(self.backbone, pretrained_checkpoint)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(self.backbone.num_features, self.n_genes)

    @property
    def config(self) -> dict:
        """Keyword configuration that rebuilds this model with ``STNet(n_genes, **config)``."""
        return {"backbone": self.backbone_name,
                "pretrained_checkpoint": self.pretrained_checkpoint,
                "dropout": self.dropout_p}

    def init_output_bias(self, mean_expression) -> None:
        """Start the head at the training-set mean expression, so early epochs learn variation
        instead of spending the budget on the offset (log-normalised targets sit far from 0)."""
        with torch.no_grad():
            self.head.bias.copy_(torch.as_tensor(mean_expression, dtype=self.head.bias.dtype))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(batch, 3, s, s) normalised patches -> (batch, n_genes) predictions."""
        return self.head(self.dropout(self.backbone(patches)))
