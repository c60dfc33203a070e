"""HistoGene-style spot regressor: a Vision Transformer over all spots of a slide.

Pang et al. 2021 (HisToGene) treat a slide as a sequence of spots: each spot's H&E patch is
flattened and linearly embedded, learned embeddings of the spot's (x, y) grid position are added,
a Transformer encoder lets every spot attend to every other spot of the slide, and a linear head
predicts each spot's expression.

Input: ``patches`` (batch, spots, 3, p, p) float RGB in [0, 1] (normalised with ImageNet mean/std
inside the model), ``positions`` (batch, spots, 2) long (x, y) grid indices in [0, n_pos),
optional ``key_padding_mask`` (batch, spots) bool, True = padding (ignored as attention key).
Output: (batch, spots, n_genes) predicted log-normalised expression.
"""
from __future__ import annotations

import logging

from torch import nn

from histomap.compat import torch
from histomap.imagenorm import ImageNormalize

log = logging.getLogger(__name__)

HEAD_ACTIVATIONS = (None, "softplus", "relu")


class HistoGene(nn.Module):
    """Patch embedding + (x, y) position embeddings -> Transformer encoder -> per-spot head."""

    def __init__(self, n_genes: int, *, patch_px: int = 32, dim: int = 256, depth: int = 4,
                 heads: int = 8, mlp_ratio: float = 2.0, dropout: float = 0.1, n_pos: int = 64,
                 head_activation: str | None = None):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        if patch_px < 1 or depth < 1 or n_pos < 1:
            raise ValueError(f"patch_px, depth and n_pos must be >= 1, got {patch_px}, {depth}, "
                             f"{n_pos}")
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of heads ({heads})")
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {HEAD_ACTIVATIONS}, got "
                             f"{head_activation!r}")
        self.n_genes, self.patch_px, self.dim, self.depth = int(n_genes), int(patch_px), \
            int(dim), int(depth)
        self.heads, self.mlp_ratio, self.dropout_p = int(heads), float(mlp_ratio), float(dropout)
        self.n_pos, self.head_activation = int(n_pos), head_activation
        self.patch_embedding = nn.Linear(3 * self.patch_px ** 2, self.dim)
        self.x_embedding = nn.Embedding(self.n_pos, self.dim)
        self.y_embedding = nn.Embedding(self.n_pos, self.dim)
        self.embedding_dropout = nn.Dropout(self.dropout_p)
        layer = nn.TransformerEncoderLayer(
            self.dim, self.heads, dim_feedforward=max(1, int(round(self.dim * self.mlp_ratio))),
            dropout=self.dropout_p, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, self.n_genes)
        self.image_norm = ImageNormalize()

    @property
    def config(self) -> dict:
        """Keyword configuration that rebuilds this model with ``HistoGene(n_genes, **config)``."""
        return {"patch_px": self.patch_px, "dim": self.dim, "depth": self.depth,
                "heads": self.heads, "mlp_ratio": self.mlp_ratio, "dropout": self.dropout_p,
                "n_pos": self.n_pos, "head_activation": self.head_activation}

    def init_output_bias(self, mean_expression) -> None:
        """Start the head at the training-set mean expression (through the inverse of the head
        activation), so early epochs learn variation instead of the offset."""
        mean = torch.as_tensor(mean_expression, dtype=self.head.bias.dtype).reshape(-1)
        if mean.numel() != self.n_genes:
            raise ValueError(f"mean expression has {mean.numel()} values, model predicts "
                             f"{self.n_genes} genes")
        if self.head_activation == "softplus":
            mean = mean.clamp(min=1e-3)
            mean = mean + torch.log(-torch.expm1(-mean))  # softplus^-1
        elif self.head_activation == "relu":
            mean = mean.clamp(min=0.0)
        with torch.no_grad():
            self.head.bias.copy_(mean)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, 3, p, p) patches in [0, 1], (B, N, 2) long (x, y) grid indices, optional
        (B, N) bool padding mask (True = padding) -> (B, N, n_genes)."""
        if patches.ndim != 5 or patches.shape[2:] != (3, self.patch_px, self.patch_px):
            raise ValueError(f"patches must be (batch, spots, 3, {self.patch_px}, "
                             f"{self.patch_px}), got {tuple(patches.shape)}")
        b, n = patches.shape[:2]
        if positions.shape != (b, n, 2):
            raise ValueError(f"positions must be ({b}, {n}, 2) grid indices, got "
                             f"{tuple(positions.shape)}")
        if key_padding_mask is not None and key_padding_mask.shape != (b, n):
            raise ValueError(f"key_padding_mask must be ({b}, {n}), got "
                             f"{tuple(key_padding_mask.shape)}")
        positions = positions.long().clamp(0, self.n_pos - 1)
        x = self.image_norm(patches).flatten(2)
        x = (self.patch_embedding(x) + self.x_embedding(positions[..., 0])
             + self.y_embedding(positions[..., 1]))
        x = self.encoder(self.embedding_dropout(x),
                         src_key_padding_mask=None if key_padding_mask is None
                         else key_padding_mask.bool())
        out = self.head(self.norm(x))
        if self.head_activation == "softplus":
            out = nn.functional.softplus(out)
        elif self.head_activation == "relu":
            out = nn.functional.relu(out)
        return out
