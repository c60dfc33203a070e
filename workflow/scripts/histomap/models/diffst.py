"""Diff-ST (Wang et al., MICCAI 2024): cross-modal conditional diffusion for super-resolved ST maps.

The denoiser predicts the noise in a noisy HR map ``x_t`` (B, G genes, H, W) given the step ``t``,
the LR map (B, G, h, w) and the paired H&E patch (B, 3, Hh, Wh), RGB in [0, 1] (uint8 is divided
by 255). The LR map, the H&E patch and the HR map cover the same tissue square.

Data flow (every part has an ablation switch in :class:`DiffSTConfig`)::

    H&E --TissueEncoder-----------------> F_tissue (d_t map on the fusion grid) --+-- Q
    H&E --M sub-patches--CellEncoder----> F_cell (M x d_c) --entropy curriculum---+-- K, V
        cross-attention (hierarchical)  -> F_h                      (hierarchical=False: F_tissue)
    LR map --(CIGC graph if cigc_on="lr")--LREncoder--> F_y
    F_y, F_h --CAM both ways--> disentangle into S_y, U_y, S_h, U_h (aux loss L_dis)
            --> concat(S_y + S_h, U_y, U_h) --conv--> condition map  (cam=False: concat(F_y, F_h))
    x_t --CIGC graph over genes (cigc_on="hr")--> U-Net (condition added at every encoder level
            and the bottleneck) --> eps

Choices where the paper is terse or the authors' code differs (all documented config options):

- Curriculum (``curriculum_mode``): ``"fraction"`` keeps the ``keep_fraction`` share of sub-patches
  with the *highest* grey-level entropy (``keep="high"``; ``"low"`` keeps the least complex
  first); the trainer raises the fraction, by default 0.25 -> 0.5 -> 1.0 (the authors' code).
  ``"threshold"`` keeps sub-patches with normalised entropy > gamma and the trainer raises gamma
  (the paper). At least one sub-patch (the most complex) is always kept so attention is defined.
  Entropy is the Shannon entropy of the grey-level histogram (``entropy_bins`` bins on [0, 1])
  divided by log(bins), so it and gamma lie in [0, 1].
- CAM (``cam_mode``): ``"channel"`` reads Eq. 3 literally and per pixel: with A_y, A_h the a x a
  neighbourhoods (a^2 x C) of pixel p, G_p = A_y^T A_h / a^2 (C x C; a box filter over the
  per-pixel outer products y_p h_p^T, the mean over in-image neighbours at the border);
  w_p = softmax_rows(G_p W + b), a C x C channel-mixing filter; y'_p = y_p w_p and, symmetrically,
  h'_p = h_p softmax_rows(G_p^T W' + b'). ``"spatial"`` is the authors' code: non-overlapping
  a x a blocks, w = softmax_rows(FC(A_y A_h^T)) (a^2 x a^2) mixes positions inside the block.
  Both add the modulated features back residually through a 1x1 conv.
- Disentangling: 1x1 conv heads per modality give S_y, U_y, S_h, U_h;
  L_dis = ||S_y - S_h||_2 / (||U_y - U_h||_2 + eps) per sample, averaged over the batch. With
  ``dis_normalize`` (default) the features are unit-normalised over channels per pixel before the
  norms, so the ratio cannot be driven to 0 by shrinking S or inflating U.
- CIGC graph: node features are per-gene embeddings of the noisy HR map (the paper; the authors'
  code runs the graph on the LR map: ``cigc_on="lr"``); the adjacency comes from
  :func:`coexpression_adjacency` on training data via :meth:`DiffST.set_adjacency`. With
  ``cigc_topk=k`` (default 16) each gene keeps its k strongest co-expression neighbours
  (:func:`topk_adjacency`: a symmetric k-nearest-neighbour graph, so O(genes x k) edges instead of
  genes^2); ``cigc_topk=None`` keeps the dense graph (the paper), an ablation row.
- The curriculum is a training device: it selects sub-patches only while the model is in training
  mode. In eval mode (the validation losses that pick the checkpoint, and inference) every
  sub-patch is used, whatever stage the saved curriculum state is at.

Ablations remove one part each and keep every other layer and channel: ``cigc=False`` keeps the
per-gene stem and the graph layer with a fixed identity adjacency (genes not coupled, the same
U-Net input channels); ``cam=False`` replaces the cross-modal modulation by the identity and
keeps the disentangling network and its loss; ``hierarchical=False`` drops the cell encoder and
the cell-to-tissue attention (tissue-level features only).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histomap.imagenorm import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)



# =============================================================================== configuration
@dataclass
class DiffSTConfig:
    """Diff-ST hyper-parameters. Defaults are small (CPU-runnable: 32x32 HR maps, 64-128 px H&E
    patches); :meth:`paper` gives the full-size settings of the paper's Table 3."""

    # U-Net
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)   # one entry per resolution level
    num_res_blocks: int = 1
    dropout: float = 0.0
    attn_heads: int = 1                      # heads of the bottleneck self-attention
    bottleneck_attention: bool = True
    # histology: tissue level
    tissue_channels: int = 32                # d_t
    tissue_px: int | None = None             # resize the H&E patch to this side first (None: as is)
    tissue_backbone: str | None = None       # timm name (features_only); None: small CNN
    pretrained_checkpoint: str | None = None  # local weights file for the timm tissue backbone
    backbone_stage: int = 2                  # feature stage of the timm backbone
    freeze_tissue_backbone: bool = True      # frozen (weights and BatchNorm statistics), as the
    #                                          SR baselines' image branch; False fine-tunes it
    # histology: cell level
    cell_grid: int = 4                       # M = cell_grid ** 2 sub-patches (paper: 16 -> 256)
    cell_patch_px: int = 16                  # each sub-patch is resized to this side to encode
    cell_channels: int = 32                  # d_c
    attn_channels: int = 32                  # d (query/key width of the cell-to-tissue attention)
    cross_attn_heads: int = 1
    entropy_bins: int = 64
    curriculum_mode: Literal["fraction", "threshold"] = "fraction"
    keep: Literal["high", "low"] = "high"    # which end of the entropy ranking is kept
    # fusion
    fusion_channels: int = 16                # C of CAM / disentangling (cost ~ C^2 per pixel)
    fusion_downsample: int = 1               # fusion grid = HR grid / this
    cam_mode: Literal["channel", "spatial"] = "channel"
    cam_region: int = 3                      # a
    dis_weight: float = 0.1                  # weight of L_dis in the returned aux loss
    dis_normalize: bool = True
    # CIGC graph
    gene_node_channels: int = 8              # C of each gene node per pixel
    graph_alpha: float = 0.2
    cigc_topk: int | None = 16               # neighbours kept per gene (None: the dense graph)
    cigc_on: Literal["hr", "lr"] = "hr"
    lr_upsample_mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    # maps also fed to the U-Net input beside x_t, as the guided baseline does (False: they
    # reach the denoiser only through the fused condition)
    lr_input: bool = False                   # the LR map upsampled to the HR grid (as SR3)
    rgb_input: bool = False                  # the H&E patch resized to the HR grid
    # ablations
    cam: bool = True
    cigc: bool = True
    hierarchical: bool = True

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        checks = {
            "channel_mult must be non-empty": len(self.channel_mult) > 0,
            "curriculum_mode must be 'fraction' or 'threshold'":
                self.curriculum_mode in ("fraction", "threshold"),
            "keep must be 'high' or 'low'": self.keep in ("high", "low"),
            "cam_mode must be 'channel' or 'spatial'": self.cam_mode in ("channel", "spatial"),
            "cigc_on must be 'hr' or 'lr'": self.cigc_on in ("hr", "lr"),
            "cam_region must be >= 1": self.cam_region >= 1,
            "cell_grid must be >= 1": self.cell_grid >= 1,
            "fusion_downsample must be >= 1": self.fusion_downsample >= 1,
            "graph_alpha must be in [0, 1]": 0.0 <= self.graph_alpha <= 1.0,
            "cigc_topk must be None or >= 1": self.cigc_topk is None or self.cigc_topk >= 1,
            "attn_channels must be divisible by cross_attn_heads":
                self.attn_channels % self.cross_attn_heads == 0
                and self.tissue_channels % self.cross_attn_heads == 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid DiffSTConfig: " + "; ".join(bad))

    @classmethod
    def paper(cls, **overrides: Any) -> "DiffSTConfig":
        """Full-size settings: paper Table 3 (d_t = d_c = d = 128, M = 256, a = 32, alpha = 0.2)
        and the authors' U-Net width (128, 1 res block); for 128-256 px HR maps on a GPU. The
        channel multipliers, fusion width and gene-node width are this implementation's."""
        base = dict(base_channels=128, channel_mult=(1, 1, 2, 2), num_res_blocks=1,
                    attn_heads=4, tissue_channels=128, tissue_px=256, cell_channels=128,
                    attn_channels=128, cross_attn_heads=4, cell_grid=16, cell_patch_px=16,
                    fusion_channels=64, fusion_downsample=4, cam_region=32,
                    gene_node_channels=16)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DiffSTConfig":
        """Build from a plain mapping (e.g. YAML); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown Diff-ST config keys {unknown}; known: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ============================================================================ building blocks
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of (possibly fractional) step indices t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 32), ch)


def _resize(x: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize a (B, C, h, w) map: area average when shrinking, ``mode`` when enlarging."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw)


def _as_float_image(image: Tensor) -> Tensor:
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; an optional embedding scales and shifts the 2nd norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
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
        self.heads, self.norm = heads, _norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w) \
            .permute(1, 0, 2, 4, 3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)          # (b, heads, hw, c/heads)
        return x + self.proj(out.permute(0, 1, 3, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Time-conditioned U-Net; an optional condition map is resized and added (through a 1x1 conv)
    at the start of every encoder level and at the bottleneck."""

    def __init__(self, in_ch: int, out_ch: int, base_ch: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0, cond_ch: int | None = None,
                 bottleneck_attention: bool = True, attn_heads: int = 1) -> None:
        super().__init__()
        self.base_ch, self.n_levels = base_ch, len(channel_mult)
        emb = 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down_blocks, self.downsample, self.inject = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        skips, ch = [base_ch], base_ch
        for level, mult in enumerate(channel_mult):
            if cond_ch:
                self.inject.append(nn.Conv2d(cond_ch, ch, 1))
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base_ch * mult, emb, dropout))
                ch = base_ch * mult
                skips.append(ch)
            self.down_blocks.append(blocks)
            last = level == len(channel_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, 1))
            if not last:
                skips.append(ch)
        self.inject_mid = nn.Conv2d(cond_ch, ch, 1) if cond_ch else None
        self.mid1 = ResBlock(ch, ch, emb, dropout)
        self.mid_attn = SelfAttention2d(ch, attn_heads) if bottleneck_attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb, dropout)
        self.up_blocks, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), base_ch * mult, emb, dropout))
                ch = base_ch * mult
            self.up_blocks.append(blocks)
            self.upsample.append(nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

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
                h = h + self.inject[level](_resize(cond, h.shape[-2:]))
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < self.n_levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        if cond is not None and self.inject_mid is not None:
            h = h + self.inject_mid(_resize(cond, h.shape[-2:]))
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up_blocks, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = up(h)
        return self.out(h)


# ================================================================ hierarchical histology features
class ConvEncoder(nn.Module):
    """Small CNN: 3x3 stem then ``n_down`` stride-2 conv-norm-SiLU stages, 1x1 to ``out_ch``."""

    def __init__(self, out_ch: int, width: int = 32, n_down: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), _norm(width), nn.SiLU()]
        for _ in range(n_down):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), _norm(width), nn.SiLU()]
        layers.append(nn.Conv2d(width, out_ch, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


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

    def __init__(self, out_ch: int, width: int = 32, n_down: int = 2) -> None:
        super().__init__()
        self.conv = ConvEncoder(width, width, n_down)
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
    image = _as_float_image(image)
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
        self.norm_y, self.norm_h = _norm(channels), _norm(channels)
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
        self.fuse = nn.Sequential(nn.Conv2d(3 * channels, out_ch, 3, padding=1), _norm(out_ch),
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


# ========================================================================== CIGC gene graph
def coexpression_adjacency(expression: Any, binarize: bool = False) -> np.ndarray:
    """Co-expression-intensity gene graph A (G, G) from non-negative training data (n_obs, G).

    p(i|j) = sum_o min(x_oi, x_oj) / sum_o x_oj, the share of gene j's expression intensity that
    gene i co-expresses (with ``binarize`` the data are x > 0 and p(i|j) is the empirical
    P(i expressed | j expressed)); A_ij = (p(i|j) + p(j|i)) / 2, symmetric, in [0, 1], diagonal 1.
    A gene never expressed gets p(.|j) = 0 (only its self-loop). Accepts numpy, scipy sparse or
    torch; obs are rows.
    """
    if hasattr(expression, "toarray"):
        expression = expression.toarray()
    if isinstance(expression, Tensor):
        expression = expression.detach().cpu().numpy()
    x = np.asarray(expression, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expression must be (n_obs, genes), got shape {x.shape}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("expression for the co-expression graph must be finite and non-negative")
    if binarize:
        x = (x > 0).astype(np.float64)
    n_genes = x.shape[1]
    co = np.empty((n_genes, n_genes))
    for i in range(n_genes):  # sum_o min(x_oi, x_oj) for all j; O(n_obs * G^2)
        co[i] = np.minimum(x[:, i : i + 1], x).sum(axis=0)
    totals = x.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(totals[None, :] > 0, co / totals[None, :], 0.0)   # p[i, j] = p(i | j)
    adj = 0.5 * (p + p.T)
    np.fill_diagonal(adj, 1.0)
    silent = np.flatnonzero(totals == 0)
    if silent.size:
        log.warning("co-expression graph: %d gene(s) never expressed in the training data "
                    "(columns %s) get only a self-loop", silent.size, silent[:10].tolist())
    return adj


def topk_adjacency(adj: Any, k: int | None) -> np.ndarray:
    """The co-expression graph restricted to each gene's ``k`` strongest neighbours.

    Edge (i, j) is kept when j is among the k largest off-diagonal entries of row i or i among
    those of row j (a symmetric kNN graph: every gene keeps at least k neighbours, at most
    ~2k on average); the diagonal is kept. ``k`` None or >= genes - 1 returns ``adj`` unchanged
    (the dense graph). Ties are broken towards the lower gene index.
    """
    a = np.asarray(adj, dtype=np.float64)
    g = a.shape[0]
    if k is None or k >= g - 1:
        return a.copy()
    off = a.copy()
    np.fill_diagonal(off, -np.inf)
    nbr = np.argsort(-off, axis=1, kind="stable")[:, :int(k)]
    keep = np.zeros(a.shape, dtype=bool)
    keep[np.arange(g)[:, None], nbr] = True
    keep |= keep.T
    np.fill_diagonal(keep, True)
    return np.where(keep, a, 0.0)


def normalize_adjacency(adj: Tensor) -> Tensor:
    """Symmetric GCN normalisation D^-1/2 A D^-1/2 (D = row sums of A)."""
    deg = adj.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * adj * inv[None, :]


class GeneGraph(nn.Module):
    """CIGC graph layer over gene nodes at every pixel.

    Each gene's map (B, G, H, W) is encoded by a shared conv to C channels, giving node features
    F_x (B, G, C, H, W); F_mid = ReLU(A_norm F_x W_g) (A over genes, W_g C x C, the same at every
    pixel); F_out = alpha F_mid + (1 - alpha) F_x. A defaults to the identity until
    :meth:`set_adjacency` is called; with ``topk`` it keeps each gene's ``topk`` strongest
    neighbours (:func:`topk_adjacency`). A graph with at most ``SPARSE_DENSITY`` of its G^2
    entries non-zero is applied as a sparse (CSR) product, O(edges x pixels); a denser one as
    one batched dense product (faster on CPU BLAS at a few hundred genes, the same numbers).
    """

    SPARSE_DENSITY = 0.05

    def __init__(self, n_genes: int, node_channels: int = 8, alpha: float = 0.2,
                 fixed_identity: bool = False, topk: int | None = None) -> None:
        super().__init__()
        self.n_genes, self.node_channels, self.alpha = n_genes, node_channels, alpha
        self.fixed_identity = bool(fixed_identity)
        self.topk = None if topk is None else int(topk)
        self._sparse: tuple[int, Tensor] | None = None
        self.encode = nn.Sequential(nn.Conv2d(1, node_channels, 3, padding=1), nn.SiLU())
        self.w_g = nn.Parameter(torch.empty(node_channels, node_channels))
        nn.init.kaiming_uniform_(self.w_g, a=math.sqrt(5))
        self.register_buffer("adjacency", torch.eye(n_genes))
        self.register_buffer("adjacency_set", torch.tensor(False))
        self._warned = False

    def set_adjacency(self, adj: Any) -> None:
        """Store D^-1/2 A D^-1/2 of a raw (G, G) adjacency (e.g. :func:`coexpression_adjacency`).
        A graph built with ``fixed_identity=True`` (the CIGC ablation) keeps the identity."""
        if self.fixed_identity:
            log.info("CIGC ablation: the gene graph keeps its identity adjacency")
            return
        a = torch.as_tensor(np.asarray(adj), dtype=torch.float32)
        if a.shape != (self.n_genes, self.n_genes):
            raise ValueError(f"adjacency must be ({self.n_genes}, {self.n_genes}), "
                             f"got {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError("adjacency must be finite and non-negative")
        a = torch.as_tensor(topk_adjacency(a.numpy(), self.topk), dtype=torch.float32)
        self.adjacency.copy_(normalize_adjacency(a).to(self.adjacency))
        self.adjacency_set.fill_(True)

    def forward(self, maps: Tensor) -> Tensor:
        if not bool(self.adjacency_set) and not self._warned and not self.fixed_identity:
            log.warning("CIGC graph used before set_adjacency(): identity adjacency, genes are "
                        "not coupled")
            self._warned = True
        b, g, h, w = maps.shape
        nodes = self.encode(maps.reshape(b * g, 1, h, w)).reshape(b, g, self.node_channels, h, w)
        mixed = self.mix(nodes)
        mid = F.relu(torch.einsum("bichw,cd->bidhw", mixed, self.w_g))
        return self.alpha * mid + (1.0 - self.alpha) * nodes

    def mix(self, nodes: Tensor) -> Tensor:
        """A_norm applied over the gene axis of node features (B, G, ...): sum_j A_ij F_j."""
        b, g = nodes.shape[:2]
        flat = nodes.reshape(b, g, -1)
        sparse = self._sparse_adjacency()
        if sparse is None:
            return (self.adjacency.to(nodes.dtype) @ flat).reshape(nodes.shape)
        # CPU sparse kernels have no bf16: the product runs in fp32
        out = torch.stack([sparse @ flat[i].float() for i in range(b)])
        return out.to(nodes.dtype).reshape(nodes.shape)

    def _sparse_adjacency(self) -> Tensor | None:
        """CSR copy of the adjacency when it is sparse enough (cached until it changes)."""
        adj = self.adjacency
        key = (adj._version, adj.data_ptr(), adj.device)
        if self._sparse is None or self._sparse[0] != key:
            csr = None
            if int(torch.count_nonzero(adj)) <= self.SPARSE_DENSITY * adj.numel():
                with warnings.catch_warnings():   # "sparse CSR support is in beta state"
                    warnings.filterwarnings("ignore", category=UserWarning)
                    csr = adj.to_sparse_csr()
            self._sparse = (key, csr)
        return self._sparse[1]


# ===================================================================================== curriculum
@dataclass(frozen=True)
class CurriculumSchedule:
    """Piecewise-constant curriculum: ``fractions[i]`` applies from epoch ``milestones[i]`` on.

    ``mode="fraction"``: the values are kept sub-patch fractions in (0, 1] (default
    0.25 -> 0.5 -> 1.0, the authors' code); ``mode="threshold"``: they are entropy thresholds
    gamma in [0, 1) (the paper raises gamma). Epochs before the first milestone get the first value.
    """

    milestones: tuple[float, ...] = (0.0,)
    fractions: tuple[float, ...] = (1.0,)
    mode: Literal["fraction", "threshold"] = "fraction"

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if len(self.milestones) != len(self.fractions) or not self.milestones:
            raise ValueError("curriculum needs as many milestones as values (at least one)")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"curriculum milestones must ascend strictly: {self.milestones}")
        if self.mode == "fraction" and not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"kept fractions must be in (0, 1]: {self.fractions}")
        if self.mode == "threshold" and not all(0 <= f < 1 for f in self.fractions):
            raise ValueError(f"entropy thresholds must be in [0, 1): {self.fractions}")
        if self.mode not in ("fraction", "threshold"):
            raise ValueError(f"curriculum mode must be 'fraction' or 'threshold', "
                             f"not {self.mode!r}")

    @classmethod
    def over_training(cls, n_epochs: int, at: Sequence[float] = (0.0, 1 / 3, 2 / 3),
                      fractions: Sequence[float] = (0.25, 0.5, 1.0),
                      mode: Literal["fraction", "threshold"] = "fraction") -> "CurriculumSchedule":
        """Milestones given as fractions of ``n_epochs`` (default thirds)."""
        return cls(tuple(a * n_epochs for a in at), tuple(fractions), mode)

    def fraction(self, epoch: float) -> float:
        """Scheduled value (kept fraction or threshold) at ``epoch``."""
        value = self.fractions[0]
        for start, v in zip(self.milestones, self.fractions):
            if epoch >= start:
                value = v
        return value

    def apply(self, model: "DiffST", epoch: float) -> float:
        """Set the model's curriculum state for ``epoch``; returns the value set."""
        value = self.fraction(epoch)
        if self.mode == "fraction":
            model.set_curriculum(keep_fraction=value)
        else:
            model.set_curriculum(entropy_threshold=value)
        return value


# ======================================================================================== models
def _make_config(n_genes: int, cfg: DiffSTConfig | None,
                 overrides: Mapping[str, Any]) -> DiffSTConfig:
    """A config from an optional base plus keyword overrides (unknown keys are an error)."""
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    base = (cfg or DiffSTConfig()).to_dict()
    base.update(overrides)
    return DiffSTConfig.from_dict(base)


@dataclass
class Condition:
    """Encoded conditioning of one batch: the fused map fed to the U-Net, the auxiliary losses
    (already weighted) and the kept sub-patch mask (None without hierarchical modelling)."""

    features: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    cell_mask: Tensor | None = None
    unet_input: Tensor | None = None  # LR map and/or H&E on the HR grid (lr_/rgb_input)


class DiffST(nn.Module):
    """Diff-ST denoiser: ``model(x_t, t, lr_map=..., image=...) -> (eps, {"dis": weighted L_dis})``.

    Built as ``DiffST(n_genes, cfg)`` or, registry style, ``DiffST(n_genes, **config)`` with the
    fields of :class:`DiffSTConfig` (``model.config`` returns them). ``x_t`` (B, G, H, W) with H, W
    divisible by 2 ** (levels - 1) and by ``fusion_downsample``; ``lr_map`` (B, G, h, w) at the LR
    grid or already upsampled to H x W; ``image`` (B, 3, Hh, Wh) RGB in [0, 1]; ``cell_entropy``
    (B, M) optional precomputed sub-patch entropies. ``t`` indexes the diffusion steps (B,).

    The curriculum state (``keep_fraction`` / ``entropy_threshold``) and the gene graph live in
    buffers, so they are saved with the state dict; the curriculum selects sub-patches in training
    mode only (eval mode, used for validation and inference, sees every sub-patch). The trainer
    sets the curriculum each epoch with :meth:`set_curriculum` or
    :meth:`CurriculumSchedule.apply`, and the graph once with :meth:`set_adjacency`.
    """

    def __init__(self, n_genes: int, cfg: DiffSTConfig | None = None, **config: Any) -> None:
        super().__init__()
        cfg = _make_config(n_genes, cfg, config)
        self.n_genes, self.cfg = n_genes, cfg
        cf, gc = cfg.fusion_channels, cfg.gene_node_channels
        # without CIGC the graph layer stays, with a fixed identity adjacency (no gene coupling)
        self.graph = GeneGraph(n_genes, gc, cfg.graph_alpha, fixed_identity=not cfg.cigc,
                               topk=cfg.cigc_topk)
        graph_width = n_genes * gc
        x_ch = graph_width if cfg.cigc_on == "hr" else n_genes
        unet_in = x_ch + (n_genes if cfg.lr_input else 0) + (3 if cfg.rgb_input else 0)
        y_ch = graph_width if cfg.cigc_on == "lr" else n_genes
        self.lr_encoder = nn.Sequential(nn.Conv2d(y_ch, cf, 3, padding=1), ResBlock(cf, cf))
        if cfg.tissue_backbone:
            self.tissue_encoder: nn.Module = TimmTissueEncoder(
                cfg.tissue_backbone, cfg.tissue_channels, cfg.backbone_stage,
                cfg.pretrained_checkpoint, frozen=cfg.freeze_tissue_backbone)
        else:
            self.tissue_encoder = ConvEncoder(cfg.tissue_channels)
        if cfg.hierarchical:
            self.cell_encoder = CellEncoder(cfg.cell_channels)
            self.cell_attention = CellToTissueAttention(cfg.tissue_channels, cfg.cell_channels,
                                                        cfg.attn_channels, cfg.cross_attn_heads)
        self.hist_proj = nn.Conv2d(cfg.tissue_channels, cf, 1)
        # without CAM the modulation is the identity; the disentangling network stays
        self.cam = CrossModalModulation(cf, cfg.cam_region, cfg.cam_mode) if cfg.cam else None
        self.disentangle = Disentangler(cf, cf, cfg.dis_normalize)
        self.unet = UNet(unet_in, n_genes, cfg.base_channels, cfg.channel_mult,
                         cfg.num_res_blocks, cfg.dropout, cond_ch=cf,
                         bottleneck_attention=cfg.bottleneck_attention, attn_heads=cfg.attn_heads)
        self.register_buffer("keep_fraction", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("entropy_threshold", torch.tensor(0.0, dtype=torch.float64))
        self.last_cell_mask: Tensor | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration that rebuilds this model with ``DiffST(n_genes, **config)``."""
        return self.cfg.to_dict()

    # ---------------------------------------------------------------------------------- state
    def set_adjacency(self, adj: Any) -> None:
        """Set the CIGC gene graph from a raw (G, G) co-expression adjacency."""
        self.graph.set_adjacency(adj)

    def set_curriculum(self, keep_fraction: float | None = None,
                       entropy_threshold: float | None = None) -> None:
        """Kept sub-patch fraction in (0, 1] and/or entropy threshold gamma in [0, 1)."""
        if keep_fraction is not None:
            if not 0 < keep_fraction <= 1:
                raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
            self.keep_fraction.fill_(float(keep_fraction))
        if entropy_threshold is not None:
            if not 0 <= entropy_threshold < 1:
                raise ValueError(f"entropy_threshold must be in [0, 1), got {entropy_threshold}")
            self.entropy_threshold.fill_(float(entropy_threshold))

    def cell_mask(self, entropy: Tensor) -> Tensor:
        """Sub-patches kept by the current curriculum state in training mode, (B, M) bool; in
        eval mode (validation, inference) every sub-patch."""
        if not self.training:
            return torch.ones_like(entropy, dtype=torch.bool)
        if self.cfg.curriculum_mode == "fraction":
            return select_subpatches(entropy, keep_fraction=float(self.keep_fraction),
                                     keep=self.cfg.keep)
        return select_subpatches(entropy, threshold=float(self.entropy_threshold),
                                 keep=self.cfg.keep)

    # -------------------------------------------------------------------------------- encoding
    def histology_features(self, image: Tensor, grid_hw: tuple[int, int],
                           cell_entropy: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Histology map (B, d_t, *grid_hw) aligned to the fusion grid, and the kept-cell mask."""
        cfg = self.cfg
        image = _as_float_image(image)
        tissue_in = image if cfg.tissue_px is None else _resize(image, (cfg.tissue_px,) * 2)
        tissue = _resize(self.tissue_encoder(tissue_in), grid_hw)
        if not cfg.hierarchical:
            return tissue, None
        m = cfg.cell_grid ** 2
        entropy = cell_entropy if cell_entropy is not None else \
            subpatch_entropy(image, cfg.cell_grid, cfg.entropy_bins)
        if entropy.shape != (image.shape[0], m):
            raise ValueError(f"cell_entropy must be (B, {m}), got {tuple(entropy.shape)}")
        mask = self.cell_mask(entropy.to(image.device))
        patches = split_subpatches(image, cfg.cell_grid, cfg.cell_patch_px)
        cells = self.cell_encoder(patches.flatten(0, 1)).reshape(image.shape[0], m, -1)
        return self.cell_attention(tissue, cells, mask), mask

    def encode_condition(self, lr_map: Tensor, image: Tensor, cell_entropy: Tensor | None = None,
                         hr_shape: Sequence[int] | None = None) -> Condition:
        """Fuse LR map and histology into the condition map on the fusion grid.

        ``hr_shape``: (H, W) of the HR map; defaults to the size of ``lr_map`` (i.e. an LR map
        already upsampled to the HR grid).
        """
        cfg = self.cfg
        hr = tuple(hr_shape) if hr_shape is not None else tuple(lr_map.shape[-2:])
        if hr[0] % cfg.fusion_downsample or hr[1] % cfg.fusion_downsample:
            raise ValueError(f"HR map {hr} is not divisible by fusion_downsample "
                             f"{cfg.fusion_downsample}")
        grid = (hr[0] // cfg.fusion_downsample, hr[1] // cfg.fusion_downsample)
        lr = _resize(lr_map.float(), grid, cfg.lr_upsample_mode)
        if cfg.cigc_on == "lr":
            lr = self.graph(lr).flatten(1, 2)
        f_y = self.lr_encoder(lr)
        hist, mask = self.histology_features(image, grid, cell_entropy)
        f_h = self.hist_proj(hist)
        self.last_cell_mask = mask
        if self.cam is not None:
            f_y, f_h = self.cam(f_y, f_h)
        fused, dis = self.disentangle(f_y, f_h)
        direct = ([_resize(lr_map.float(), hr, cfg.lr_upsample_mode)] if cfg.lr_input else []) \
            + ([_resize(_as_float_image(image), hr)] if cfg.rgb_input else [])
        return Condition(fused, {"dis": cfg.dis_weight * dis}, mask,
                         torch.cat(direct, dim=1) if direct else None)

    def forward(self, x_t: Tensor, t: Tensor, lr_map: Tensor | None = None,
                image: Tensor | None = None, cell_entropy: Tensor | None = None,
                condition: Condition | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if condition is None:
            if lr_map is None or image is None:
                raise ValueError("DiffST needs lr_map and image (or a precomputed condition)")
            condition = self.encode_condition(lr_map, image, cell_entropy, x_t.shape[-2:])
        x_in = x_t
        if self.cfg.cigc_on == "hr":
            x_in = self.graph(x_t).flatten(1, 2)
        if self.cfg.lr_input or self.cfg.rgb_input:
            if condition.unet_input is None:
                raise ValueError("lr_input / rgb_input need a condition encoded with them")
            x_in = torch.cat([x_in, condition.unet_input.to(x_in.dtype)], dim=1)
        return self.unet(x_in, t, condition.features), condition.aux


class ConditionalUNet(nn.Module):
    """Guided-diffusion-style baseline ("Guided-DM"): the LR map upsampled to the HR grid and the
    H&E patch resized to it are concatenated to x_t; same U-Net blocks as Diff-ST, no fusion.
    ``model(x_t, t, lr_map=..., image=...) -> eps``."""

    def __init__(self, n_genes: int, cfg: DiffSTConfig | None = None, **config: Any) -> None:
        super().__init__()
        cfg = _make_config(n_genes, cfg, config)
        self.n_genes, self.cfg = n_genes, cfg
        self.unet = UNet(2 * n_genes + 3, n_genes, cfg.base_channels, cfg.channel_mult,
                         cfg.num_res_blocks, cfg.dropout, cond_ch=None,
                         bottleneck_attention=cfg.bottleneck_attention, attn_heads=cfg.attn_heads)

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration: ``ConditionalUNet(n_genes, **config)`` rebuilds this model."""
        return self.cfg.to_dict()

    def forward(self, x_t: Tensor, t: Tensor, lr_map: Tensor, image: Tensor,
                cell_entropy: Tensor | None = None) -> Tensor:
        """``cell_entropy`` is accepted so Diff-ST batches can be reused, and is not used."""
        hw = x_t.shape[-2:]
        lr = _resize(lr_map.to(x_t.dtype), hw, self.cfg.lr_upsample_mode)
        img = _resize(_as_float_image(image).to(x_t.dtype), hw)
        return self.unet(torch.cat([x_t, lr, img], dim=1), t)


__all__ = ["CellEncoder", "CellToTissueAttention", "Condition", "ConditionalUNet",
           "ConvEncoder", "CrossModalModulation", "CurriculumSchedule", "DiffST", "DiffSTConfig",
           "Disentangler", "GeneGraph", "ResBlock", "SelfAttention2d", "TimmTissueEncoder",
           "UNet", "coexpression_adjacency", "local_cross_gram", "normalize_adjacency",
           "topk_adjacency",
           "select_subpatches", "split_subpatches", "subpatch_entropy", "timestep_embedding"]
