"""Diff-ST's cross-modal fusion (superres task): the cross-modal adaptive modulation (CAM) between
the LR-map and the histology features, and the disentangling heads with their auxiliary loss
L_dis. Pure torch.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histomap.models.unet import group_norm


# ========================================================== cross-modal modulation + disentangling
def _box_mean(x: Tensor, a: int) -> Tensor:
    """Mean of x over the a x a window around each pixel (same size; in-image pixels only)."""
    if a == 1:
        return x
    lo, hi = (a - 1) // 2, a // 2
    pad = (lo, hi, lo, hi)
    sums = F.avg_pool2d(F.pad(x, pad), a, stride=1) * (a * a)
    ones = x.new_ones(1, 1, *x.shape[-2:])
    counts = F.avg_pool2d(F.pad(ones, pad), a, stride=1) * (a * a)
    return sums / counts


def local_cross_gram(y: Tensor, h: Tensor, region: int) -> Tensor:
    """G_p = A_y^T A_h / a^2 for every pixel p, (B, H, W, C, C): the mean of the outer products
    y_q h_q^T over the a x a window around p (over its in-image pixels at the border)."""
    b, c, hh, ww = y.shape
    outer = (y[:, :, None] * h[:, None, :]).reshape(b, c * c, hh, ww)
    return _box_mean(outer, region).reshape(b, c, c, hh, ww).permute(0, 3, 4, 1, 2)


class CrossModalModulation(nn.Module):
    """Histology-to-ST and ST-to-histology adaptive modulation (CAM), see the module docstring.

    forward(f_y, f_h) with both (B, C, H, W) -> (f_y + P_y(y'), f_h + P_h(h')).
    """

    def __init__(self, channels: int, region: int = 3,
                 mode: Literal["channel", "spatial"] = "channel") -> None:
        super().__init__()
        self.mode, self.region = mode, region
        self.norm_y, self.norm_h = group_norm(channels), group_norm(channels)
        width = channels if mode == "channel" else region * region
        self.fc_h2y, self.fc_y2h = nn.Linear(width, width), nn.Linear(width, width)
        self.proj_y = nn.Conv2d(channels, channels, 1)
        self.proj_h = nn.Conv2d(channels, channels, 1)

    def _channel(self, y: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        gram = local_cross_gram(y, h, self.region)
        w_h2y = self.fc_h2y(gram).softmax(-1)                       # (b, H, W, C_y, C_out)
        w_y2h = self.fc_y2h(gram.transpose(-1, -2)).softmax(-1)     # (b, H, W, C_h, C_out)
        y_mod = torch.einsum("bchw,bhwck->bkhw", y, w_h2y)
        h_mod = torch.einsum("bchw,bhwck->bkhw", h, w_y2h)
        return y_mod, h_mod

    def _spatial(self, y: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        b, c, hh, ww = y.shape
        a = self.region
        if hh % a or ww % a:
            raise ValueError(f"spatial CAM needs the fusion grid {hh}x{ww} divisible by "
                             f"region {a}")

        def blocks(x: Tensor) -> Tensor:   # (b, nblocks, a*a, c)
            return x.reshape(b, c, hh // a, a, ww // a, a).permute(0, 2, 4, 3, 5, 1) \
                .reshape(b, -1, a * a, c)

        def unblocks(x: Tensor) -> Tensor:
            return x.reshape(b, hh // a, ww // a, a, a, c).permute(0, 5, 1, 3, 2, 4) \
                .reshape(b, c, hh, ww)

        yb, hb = blocks(y), blocks(h)
        sim = yb @ hb.transpose(-1, -2) / c                           # (b, n, a^2 (y), a^2 (h))
        w_h2y = self.fc_h2y(sim).softmax(-1)
        w_y2h = self.fc_y2h(sim.transpose(-1, -2)).softmax(-1)
        y_mod = w_h2y.transpose(-1, -2) @ yb          # out_j = sum_i y_i w_ij
        h_mod = w_y2h.transpose(-1, -2) @ hb
        return unblocks(y_mod), unblocks(h_mod)

    def forward(self, f_y: Tensor, f_h: Tensor) -> tuple[Tensor, Tensor]:
        y, h = self.norm_y(f_y), self.norm_h(f_h)
        y_mod, h_mod = self._channel(y, h) if self.mode == "channel" else self._spatial(y, h)
        return f_y + self.proj_y(y_mod), f_h + self.proj_h(h_mod)


class Disentangler(nn.Module):
    """Split each modality into shared (S) and unique (U) parts with 1x1 heads; fuse
    concat(S_y + S_h, U_y, U_h) with a 3x3 conv. forward -> (fused (B, out_ch, H, W), L_dis)."""

    def __init__(self, channels: int, out_ch: int, normalize: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.s_y, self.u_y = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.s_h, self.u_h = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Sequential(nn.Conv2d(3 * channels, out_ch, 3, padding=1), group_norm(out_ch),
                                  nn.SiLU())
        self.normalize, self.eps = normalize, eps

    def loss(self, s_y: Tensor, s_h: Tensor, u_y: Tensor, u_h: Tensor) -> Tensor:
        """L_dis = ||S_y - S_h|| / (||U_y - U_h|| + eps), norms per sample, batch mean."""
        if self.normalize:
            s_y, s_h, u_y, u_h = (F.normalize(x, dim=1) for x in (s_y, s_h, u_y, u_h))
        shared = (s_y - s_h).flatten(1).norm(dim=1)
        unique = (u_y - u_h).flatten(1).norm(dim=1)
        return (shared / (unique + self.eps)).mean()

    def forward(self, f_y: Tensor, f_h: Tensor) -> tuple[Tensor, Tensor]:
        s_y, u_y, s_h, u_h = self.s_y(f_y), self.u_y(f_y), self.s_h(f_h), self.u_h(f_h)
        fused = self.fuse(torch.cat([s_y + s_h, u_y, u_h], dim=1))
        return fused, self.loss(s_y, s_h, u_y, u_h)
