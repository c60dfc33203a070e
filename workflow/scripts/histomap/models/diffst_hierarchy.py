"""Diff-ST's hierarchical histology modelling (superres task): the tissue-level encoders (a small
CNN or one timm stage), the cell-level encoder of H&E sub-patches, the sub-patch entropy that
drives the training curriculum, and the cell-to-tissue cross-attention. Pure torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histomap.imagenorm import IMAGENET_MEAN, IMAGENET_STD
from histomap.models.unet import as_float_image, conv3x3, group_norm


class ConvEncoder(nn.Module):
    """Small CNN: 3x3 stem then ``n_down`` stride-2 conv-norm-SiLU stages, 1x1 to ``out_ch``;
    ``padding_mode`` of the 3x3 convolutions (:func:`histomap.models.unet.conv3x3`)."""

    def __init__(self, out_ch: int, width: int = 32, n_down: int = 2,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        self.stride = 2 ** n_down
        layers: list[nn.Module] = [conv3x3(3, width, padding_mode=padding_mode),
                                   group_norm(width), nn.SiLU()]
        for _ in range(n_down):
            layers += [conv3x3(width, width, 2, padding_mode), group_norm(width), nn.SiLU()]
        layers.append(nn.Conv2d(width, out_ch, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


def encode_without_border(encoder: nn.Module, image: Tensor) -> Tensor:
    """``encoder(image)`` (a feature map ``encoder.stride`` times coarser) computed on the image
    mirrored outward by two feature pixels (``2 x stride`` image pixels) on every side, then
    cropped back: every feature pixel of the patch sees tissue around it, where zero padding
    would show the encoder a dark frame at the patch border (a band along the patch edge in
    every map conditioned on it). Inputs too small to mirror are encoded as they are.
    """
    stride = int(getattr(encoder, "stride", 1))
    margin = 2 * stride
    h, w = image.shape[-2:]
    if h % stride or w % stride or margin >= min(h, w):
        return encoder(image)
    feats = encoder(F.pad(image, (margin,) * 4, mode="reflect"))
    crop = 2
    return feats[..., crop:feats.shape[-2] - crop, crop:feats.shape[-1] - crop]


class TimmTissueEncoder(nn.Module):
    """One feature stage of a timm backbone (``features_only``), 1x1-projected to ``out_ch``;
    weights from a local checkpoint file when given (never downloaded). ``frozen``: the
    backbone gets no gradient and stays in eval mode when the model trains (its BatchNorm
    statistics fixed); only the projection trains."""

    def __init__(self, name: str, out_ch: int, stage: int = 2,
                 pretrained_checkpoint: str | None = None, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = bool(frozen)
        # imported lazily: timm is slow to import. Any timm name or a named pretrained encoder.
        from histomap.models.encoders import create_encoder, encoder_mean_std, is_pretrained

        self.backbone = create_encoder(name, checkpoint=pretrained_checkpoint,
                                       features_only=True, out_indices=(stage,))
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        if is_pretrained(name):
            cfg = dict(zip(("mean", "std"), encoder_mean_std(name)))
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN))[None, :, None,
                                                                                   None])
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD))[None, :, None,
                                                                                None])
        self.proj = nn.Conv2d(self.backbone.feature_info.channels()[-1], out_ch, 1)
        self.stride = int(self.backbone.feature_info.reduction()[-1])
        if self.frozen:
            self.backbone.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TimmTissueEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, image: Tensor) -> Tensor:
        return self.proj(self.backbone((image - self.mean) / self.std)[-1])


class CellEncoder(nn.Module):
    """Shared CNN turning each sub-patch (N, 3, p, p) into a vector (N, out_ch)."""

    def __init__(self, out_ch: int, width: int = 32, n_down: int = 2,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = ConvEncoder(width, width, n_down, padding_mode)
        self.fc = nn.Linear(width, out_ch)

    def forward(self, patches: Tensor) -> Tensor:
        return self.fc(F.silu(self.conv(patches).mean(dim=(2, 3))))


def split_subpatches(image: Tensor, grid: int, patch_px: int) -> Tensor:
    """(B, 3, H, W) -> (B, grid*grid, 3, patch_px, patch_px), row-major grid of equal crops.

    The image is first area-resized to (grid * patch_px) square, so each crop is one grid cell of
    the input resized to ``patch_px``.
    """
    b, c = image.shape[:2]
    side = grid * patch_px
    img = F.interpolate(image, size=(side, side), mode="area") \
        if tuple(image.shape[-2:]) != (side, side) else image
    cells = img.reshape(b, c, grid, patch_px, grid, patch_px).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, grid * grid, c, patch_px, patch_px)


@torch.no_grad()
def subpatch_entropy(image: Tensor, grid: int, bins: int = 64) -> Tensor:
    """Normalised grey-level entropy in [0, 1] of each grid sub-patch, (B, grid*grid).

    Grey = 0.299 R + 0.587 G + 0.114 B of the RGB patch in [0, 1] at its input resolution; the
    histogram has ``bins`` equal bins on [0, 1]; entropy is in nats divided by log(bins). Rows and
    columns past the last whole grid cell (fewer than ``grid`` pixels) are not counted.
    """
    image = as_float_image(image)
    b, _, h, w = image.shape
    ph, pw = h // grid, w // grid
    if ph == 0 or pw == 0:
        raise ValueError(f"image {h}x{w} px is smaller than the {grid}x{grid} sub-patch grid")
    weights = image.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]
    grey = (image[:, :3, : ph * grid, : pw * grid] * weights).sum(1)
    cells = grey.reshape(b, grid, ph, grid, pw).permute(0, 1, 3, 2, 4).reshape(b * grid * grid, -1)
    idx = (cells.clamp(0, 1) * bins).long().clamp_(max=bins - 1)
    counts = torch.zeros(cells.shape[0], bins, device=image.device).scatter_add_(
        1, idx, torch.ones_like(cells))
    p = counts / counts.sum(1, keepdim=True)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1) / math.log(bins)
    return ent.reshape(b, grid * grid)


def select_subpatches(entropy: Tensor, keep_fraction: float | None = None,
                      threshold: float | None = None, keep: str = "high") -> Tensor:
    """Boolean mask (B, M) of the sub-patches the curriculum keeps.

    ``keep_fraction``: the ceil(fraction * M) sub-patches with the highest (``keep="high"``) or
    lowest (``"low"``) entropy. ``threshold``: entropy > gamma (``"high"``) or < gamma
    (``"low"``). The extreme sub-patch of each image is always kept. Neither given: all kept.
    """
    b, m = entropy.shape
    descending = keep == "high"
    if keep_fraction is not None:
        k = max(1, min(m, math.ceil(float(keep_fraction) * m - 1e-6)))
        order = torch.argsort(entropy, dim=1, descending=descending, stable=True)
        mask = torch.zeros_like(entropy, dtype=torch.bool)
        return mask.scatter_(1, order[:, :k], True)
    if threshold is not None:
        mask = entropy > threshold if descending else entropy < threshold
        best = entropy.argmax(1) if descending else entropy.argmin(1)
        return mask.scatter(1, best[:, None], True)
    return torch.ones_like(entropy, dtype=torch.bool)


class CellToTissueAttention(nn.Module):
    """Cross-attention: tissue-map queries Q = f(F_tissue) W_Q (d_t -> d), sub-patch keys
    K = F_cell W_K (d_c -> d) and values V = F_cell W_V (d_c -> d_t); dropped sub-patches are
    masked out. Output = F_tissue + W_O Atten(Q, K, V), a (B, d_t, h, w) map."""

    def __init__(self, d_t: int, d_c: int, d: int, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(d_t), nn.LayerNorm(d_c)
        self.w_q = nn.Linear(d_t, d, bias=False)
        self.w_k = nn.Linear(d_c, d, bias=False)
        self.w_v = nn.Linear(d_c, d_t, bias=False)
        self.w_o = nn.Linear(d_t, d_t)
        self.last_weights: Tensor | None = None

    def forward(self, tissue: Tensor, cells: Tensor, mask: Tensor | None = None) -> Tensor:
        b, d_t, h, w = tissue.shape
        nh = self.heads
        queries = tissue.flatten(2).transpose(1, 2)                       # (b, hw, d_t)
        q = self.w_q(self.norm_q(queries)).reshape(b, h * w, nh, -1).transpose(1, 2)
        kv = self.norm_kv(cells)
        k = self.w_k(kv).reshape(b, -1, nh, q.shape[-1]).transpose(1, 2)  # (b, nh, M, d/nh)
        v = self.w_v(kv).reshape(b, -1, nh, d_t // nh).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])         # (b, nh, hw, M)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1)
        self.last_weights = weights.detach()
        out = (weights @ v).transpose(1, 2).reshape(b, h * w, d_t)
        return tissue + self.w_o(out).transpose(1, 2).reshape(b, d_t, h, w)
