"""The denoising U-Net of the super-resolution models (superres task: Diff-ST, its guided-diffusion
baseline and the SR baselines of :mod:`histomap.models.srnets`), with its blocks (timestep
embedding, residual and self-attention blocks) and the image helpers they share
(:func:`resize`, :func:`as_float_image`). Pure torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of (possibly fractional) step indices t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``ch``."""
    return nn.GroupNorm(math.gcd(ch, 32), ch)


def resize(x: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize a (B, C, h, w) map: area average when shrinking, ``mode`` when enlarging."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw)


def as_float_image(image: Tensor) -> Tensor:
    """An RGB image as float in [0, 1] (uint8 divided by 255, float returned as it is)."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, padding_mode: str = "zeros") -> nn.Conv2d:
    """3x3 convolution padded by one pixel. ``padding_mode="replicate"`` repeats the border
    pixel instead of adding a frame of zeros: a map whose values sit far from 0 (an H&E patch,
    a log-expression map) otherwise gets a dark frame that the network learns as a feature of
    every patch border (the patch-border band)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, padding_mode=padding_mode)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; an optional embedding scales and shifts the 2nd norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None,
                 dropout: float = 0.0, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, padding_mode=padding_mode)
        self.norm2 = group_norm(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, padding_mode=padding_mode)
        self.emb = nn.Linear(emb_dim, 2 * out_ch) if emb_dim else None
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"{ch} channels do not split into {heads} heads")
        self.heads, self.norm = heads, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w) \
            .permute(1, 0, 2, 4, 3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)          # (b, heads, hw, c/heads)
        return x + self.proj(out.permute(0, 1, 3, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Time-conditioned U-Net; an optional condition map is resized and added (through a 1x1 conv)
    at the start of every encoder level and at the bottleneck. ``padding_mode`` of every 3x3
    convolution (:func:`conv3x3`)."""

    def __init__(self, in_ch: int, out_ch: int, base_ch: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0, cond_ch: int | None = None,
                 bottleneck_attention: bool = True, attn_heads: int = 1,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        self.base_ch, self.n_levels = base_ch, len(channel_mult)
        emb, pm = 4 * base_ch, padding_mode
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = conv3x3(in_ch, base_ch, padding_mode=pm)
        self.down_blocks, self.downsample, self.inject = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        skips, ch = [base_ch], base_ch
        for level, mult in enumerate(channel_mult):
            if cond_ch:
                self.inject.append(nn.Conv2d(cond_ch, ch, 1))
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base_ch * mult, emb, dropout, pm))
                ch = base_ch * mult
                skips.append(ch)
            self.down_blocks.append(blocks)
            last = level == len(channel_mult) - 1
            self.downsample.append(nn.Identity() if last else conv3x3(ch, ch, 2, pm))
            if not last:
                skips.append(ch)
        self.inject_mid = nn.Conv2d(cond_ch, ch, 1) if cond_ch else None
        self.mid1 = ResBlock(ch, ch, emb, dropout, pm)
        self.mid_attn = SelfAttention2d(ch, attn_heads) if bottleneck_attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb, dropout, pm)
        self.up_blocks, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), base_ch * mult, emb, dropout, pm))
                ch = base_ch * mult
            self.up_blocks.append(blocks)
            self.upsample.append(nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(ch, ch, padding_mode=pm)))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), conv3x3(ch, out_ch, padding_mode=pm))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        factor = 2 ** (self.n_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"map size {tuple(x.shape[-2:])} must be divisible by {factor} "
                             f"for a {self.n_levels}-level U-Net")
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down_blocks):
            if cond is not None and len(self.inject):
                h = h + self.inject[level](resize(cond, h.shape[-2:]))
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < self.n_levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        if cond is not None and self.inject_mid is not None:
            h = h + self.inject_mid(resize(cond, h.shape[-2:]))
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up_blocks, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = up(h)
        return self.out(h)
