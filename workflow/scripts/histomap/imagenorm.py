"""ImageNet colour statistics and the layer that standardises RGB images with them.

Every H&E encoder of histomap (timm backbones, the PixNet / iStar pyramids, the SR baselines,
HistoGene's patch embedding) takes RGB in [0, 1] and standardises it the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

from histomap.compat import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalize(torch.nn.Module):
    """``(x - mean) / std`` over the colour axis, the third from last (so (3, H, W),
    (B, 3, H, W) and (B, N, 3, H, W) all work). The statistics are non-persistent buffers: they
    follow ``.to(device)`` but are not part of the state dict."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
