"""The linear probe (HEST-Benchmark style): ridge regression on a frozen encoder's pooled features.

Arrow of DESIGN.md: (encoder features, cached) -> model. Each spot's crop goes through a frozen
encoder (:class:`histomap.models.encoders.PooledEncoder`, globally pooled features); the
features are standardised with the training spots' mean and std, and ridge regression maps them
to the log-normalised expression of the gene panel (closed form, an unpenalised intercept = the
training mean).

Regularisation: ``lambda = alpha * n_train`` for each ``alpha`` of a grid; the alpha with the
lowest validation MSE (spatial validation blocks of the training slides, never the test fold)
wins, and the probe is refitted on every training spot with it (:func:`select_ridge`).

:class:`LinearProbe` is the fitted probe as a torch module (frozen encoder -> standardise ->
linear), registered as ``probe`` so the spot models' prediction rule and ``model.pt`` format
serve it unchanged. Its input is a crop standardised with ImageNet's statistics, like every
crop model's (:class:`histomap.data.spot_patches.SpotDataset`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from histomap.compat import torch
from histomap.models.encoders import Restandardise, create_encoder

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))
DEFAULT_ENCODER = "efficientnet_lite0_imagenet"


def standardise_stats(features: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (std floored at ``eps``: a constant feature becomes 0)."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.maximum(x.std(axis=0), eps)


def ridge_fit(features: np.ndarray, targets: np.ndarray, lam: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression of ``targets`` (n, G) on standardised ``features`` (n, F).

    Returns (weight (F, G), intercept (G,), feature mean (F,), feature std (F,)): predictions
    are ``((x - mean) / std) @ weight + intercept``; the intercept (the target mean) is not
    penalised. ``weight = (Z'Z + lam I)^-1 Z'(Y - mean Y)`` with Z the standardised features.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    mean, std = standardise_stats(x)
    z = (x - mean) / std
    y_mean = y.mean(axis=0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    weight = vt.T @ ((s / (s * s + lam))[:, None] * (u.T @ (y - y_mean)))
    return weight, y_mean, mean, std


def ridge_predict(features: np.ndarray, weight: np.ndarray, intercept: np.ndarray,
                  mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((np.asarray(features, np.float64) - mean) / std) @ weight + intercept


def select_ridge(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS
                 ) -> tuple[float, list[dict]]:
    """The alpha (``lambda = alpha * n_train``) with the lowest MSE on the validation spots,
    and one row per alpha (alpha, lambda, val_mse) for the training log."""
    if len(val_x) == 0:
        raise ValueError("no validation spot to choose the ridge penalty on")
    rows = []
    n = len(train_x)
    for alpha in alphas:
        lam = float(alpha) * n
        fitted = ridge_fit(train_x, train_y, lam)
        mse = float(np.mean((ridge_predict(val_x, *fitted) - val_y) ** 2))
        rows.append({"alpha": float(alpha), "lambda": lam, "val_mse": mse})
    best = min(rows, key=lambda r: r["val_mse"])
    return best["alpha"], rows


class LinearProbe(nn.Module):
    """Frozen encoder's pooled features -> standardisation -> linear map to ``n_genes``.

    Args:
        n_genes: genes predicted.
        encoder: encoder name (:func:`histomap.models.encoders.create_encoder`; default the
            packaged ImageNet EfficientNet-Lite0).
        pretrained_checkpoint: local weights for a plain timm encoder (registry convention: None
            when a trained ``model.pt`` is rebuilt).
        random_init: the encoder at random weights (the probe's control).
    """

    def __init__(self, n_genes: int, *, encoder: str = DEFAULT_ENCODER,
                 pretrained_checkpoint: str | Path | None = None, random_init: bool = False):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.n_genes = int(n_genes)
        self._config = {"encoder": encoder, "random_init": bool(random_init),
                        "pretrained_checkpoint": None if pretrained_checkpoint is None
                        else str(pretrained_checkpoint)}
        self.backbone = create_encoder(encoder, checkpoint=pretrained_checkpoint,
                                       random_init=random_init, num_classes=0)
        self.restandardise = Restandardise(encoder)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.num_features = int(self.backbone.num_features)
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))
        self.head = nn.Linear(self.num_features, self.n_genes)
        self.head.requires_grad_(False)

    @property
    def config(self) -> dict:
        return dict(self._config)

    def train(self, mode: bool = True) -> LinearProbe:
        return super().train(False)  # nothing trains by gradient; BN statistics stay fixed

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) ImageNet-standardised crops -> (B, F) pooled encoder features."""
        return self.backbone(self.restandardise(images))

    def set_ridge(self, weight: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
                  std: np.ndarray) -> None:
        """Install a fitted ridge (:func:`ridge_fit`'s output)."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(np.asarray(weight).T, dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(intercept, dtype=torch.float32))
            self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features (e.g. from the feature cache) -> (B, genes)."""
        z = (features.float() - self.feature_mean) / self.feature_std
        return self.head(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_features(self.features(images))
