"""ST-Net-style spot regressor: a CNN backbone on the H&E patch under a spot, then a linear head.

He et al. 2020 (ST-Net) predict each spot's expression from the image patch centred on it with a
DenseNet-121 and one linear layer. Here the backbone is any encoder of
:mod:`histomap.models.encoders` (a timm name, or a named pretrained encoder such as
``efficientnet_lite0_imagenet``; ``num_classes=0`` gives pooled features), optionally initialised
from a local checkpoint (e.g. a pathology foundation model); weights are never downloaded.

Input: (batch, 3, s, s) float patches normalised with ImageNet mean/std
(:class:`histomap.data.spot_patches.SpotDataset`). Output: (batch, n_genes) predicted log-normalised
expression.
"""
from __future__ import annotations

import logging

from torch import nn

from histomap.compat import torch
from histomap.models.encoders import (
    Restandardise,
    create_encoder,
    load_backbone_checkpoint,
    read_state_dict,
)

log = logging.getLogger(__name__)

__all__ = ["STNet", "load_backbone_checkpoint", "read_state_dict"]


class STNet(nn.Module):
    """timm backbone -> dropout -> linear head to ``n_genes`` log-normalised expression values."""

    def __init__(self, n_genes: int, *, backbone: str = "resnet18",
                 pretrained_checkpoint: str | None = None, dropout: float = 0.1,
                 freeze_backbone: bool = False):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.n_genes = int(n_genes)
        self.backbone_name = backbone
        self.pretrained_checkpoint = None if pretrained_checkpoint is None else str(
            pretrained_checkpoint)
        self.dropout_p = float(dropout)
        # a named encoder (e.g. efficientnet_lite0_imagenet) brings its packaged weights
        self.backbone = create_encoder(backbone, checkpoint=pretrained_checkpoint,
                                       num_classes=0)
        self.restandardise = Restandardise(backbone)  # ImageNet units -> the encoder's
        self.freeze_backbone = bool(freeze_backbone)  # only the head trains (cacheable)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(self.backbone.num_features, self.n_genes)

    @property
    def config(self) -> dict:
        """Keyword configuration that rebuilds this model with ``STNet(n_genes, **config)``."""
        return {"backbone": self.backbone_name,
                "pretrained_checkpoint": self.pretrained_checkpoint,
                "dropout": self.dropout_p, "freeze_backbone": self.freeze_backbone}

    def init_output_bias(self, mean_expression) -> None:
        """Start the head at the training-set mean expression, so early epochs learn variation
        instead of spending the budget on the offset (log-normalised targets sit far from 0)."""
        with torch.no_grad():
            self.head.bias.copy_(torch.as_tensor(mean_expression, dtype=self.head.bias.dtype))

    def train(self, mode: bool = True) -> STNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def head_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, F) pooled backbone features (e.g. cached) -> (batch, n_genes)."""
        return self.head(self.dropout(features))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(batch, 3, s, s) normalised patches -> (batch, n_genes) predictions."""
        x = self.restandardise(patches)
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.backbone(x)
            return self.head_from_features(features)
        return self.head_from_features(self.backbone(x))
