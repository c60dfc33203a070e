"""PixNet: dense gene-expression maps from H&E, trained through circular-ROI aggregation.

After Zhang, Yang & Pan, "From Spots to Pixels" (no public code). The network maps an RGB
patch to a dense, non-negative map ``G`` (B, genes, H / out_stride, W / out_stride); spot values
are the area-weighted aggregation of ``G`` inside each spot's disc (``histomap.models.roi``), so the
spot size at inference may differ from the one used in training.

Pieces:

* Encoder: a multi-scale feature pyramid, from any timm CNN (``features_only``) or from a ViT
  foundation model (UNI2-h's architecture by default) whose intermediate blocks are tapped and
  turned into strides 4/8/16/32 by a ViTDet-style simple feature pyramid.
* Decoder: U-Net-style. The deep up-sampling steps use depth-to-space (PixelShuffle, "DSUB"),
  the shallow ones bilinear interpolation. At every skip a Separable Attention Fusion Block
  (SAFB) fuses the skip with the decoder feature; ``fusion="conv"`` swaps it for a plain conv
  block (ablation).
* Head: 1x1 conv to genes, softplus (or ReLU) so expression is non-negative.
* Loss: ``pixnet_loss`` = MSE + 0.5 (1 - mean per-gene Pearson r over the spots of a batch).

Attention choice: the paper fuses with self-attention; full attention over all positions is
O((HW)^2) memory at stride 4, so SAFB uses MobileViTv2's *separable self-attention*, linear in
the number of positions: a 1-channel query map gives context scores by a softmax over
positions, the context vector is the score-weighted sum of the keys, and every position's output
is ReLU(value) * context, projected by a 1x1 conv. A 3x3 conv block after it mixes locally.

Images enter ``forward`` as float RGB in [0, 1] (B, 3, H, W) and are normalised inside with the
encoder's statistics (:func:`histomap.models.encoders.encoder_mean_std`: ImageNet's, also UNI2-h's;
0.5 / 0.5 for the packaged EfficientNet-Lite0). ``decode_features`` is the part after the encoder,
for training from cached features of a frozen encoder (:mod:`histomap.tasks.feature_cache`).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from histomap.compat import timm  # noqa: F401  (timm.layers, imported in build_vit, needs it first)
from histomap.imagenorm import ImageNormalize
from histomap.models.checkpoint_io import load_checkpoint
from histomap.models.encoder_specs import UNI2H_NAMES, is_uni2h, is_vit_name
from histomap.models.encoders import create_encoder, encoder_mean_std
from histomap.models.foundation import UNI2H_VIT_KWARGS, ViTTokens  # noqa: F401 (re-exported)
from histomap.models.foundation import build_vit as build_foundation_vit
from histomap.models.roi import DenseSpotsMixin

log = logging.getLogger(__name__)

DEFAULT_DECODER_CHANNELS = (64, 128, 256, 512, 512, 512)

# UNI2-h (MahmoodLab) architecture: histomap.models.foundation (weights come from a file)
VIT_ENCODER_NAMES = UNI2H_NAMES


# --------------------------------------------------------------------------- building blocks
class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map."""

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_bn_act(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.SiLU(inplace=True))


class SkipRefine(nn.Module):
    """Residual skip refinement: s + BN(LN(SiLU(depthwise conv(s)))).

    The channel LayerNorm has no affine parameters: the BatchNorm right after it supplies them
    (an affine LN before BN would be cancelled by BN and never learn).
    """

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.act = nn.SiLU()
        self.ln = ChannelLayerNorm(channels, affine=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        return skip + self.bn(self.ln(self.act(self.dwconv(skip))))


class SeparableSelfAttention(nn.Module):
    """MobileViTv2 separable self-attention, linear in the number of positions.

    q: (B, 1, HW) -> softmax over positions = context scores; context = sum(scores * K) is one
    (B, C) vector; output = out_proj(ReLU(V) * context).
    """

    def __init__(self, in_ch: int, dim: int):
        super().__init__()
        self.dim = dim
        # no bias on the query: softmax over positions is invariant to it
        self.query = nn.Conv2d(in_ch, 1, 1, bias=False)
        self.key = nn.Conv2d(in_ch, dim, 1)
        self.value = nn.Conv2d(in_ch, dim, 1)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.query(x).flatten(2).float(), dim=-1).to(x.dtype)  # (B,1,HW)
        context = (self.key(x).flatten(2) * scores).sum(dim=-1)[:, :, None, None]    # (B,C,1,1)
        return self.out_proj(F.relu(self.value(x)) * context)


class SAFB(nn.Module):
    """Separable Attention Fusion Block: fuse a skip feature with the upsampled decoder feature.

    skip -> SkipRefine; concat with the decoder feature; pre-norm (channel LN); Q/K/V by 1x1
    convs; separable self-attention; residual add onto a 1x1 projection of the concat; then a
    residual 3x3 conv-BN-SiLU block for local mixing.
    """

    def __init__(self, skip_ch: int, dec_ch: int, out_ch: int):
        super().__init__()
        cat_ch = skip_ch + dec_ch
        self.refine = SkipRefine(skip_ch)
        self.shortcut = nn.Conv2d(cat_ch, out_ch, 1, bias=False)
        self.norm = ChannelLayerNorm(cat_ch)
        self.attn = SeparableSelfAttention(cat_ch, out_ch)
        self.local = conv_bn_act(out_ch, out_ch, 3)

    def forward(self, skip: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.refine(skip), dec], dim=1)
        fused = self.shortcut(x) + self.attn(self.norm(x))
        return fused + self.local(fused)


class ConvFusion(nn.Module):
    """Plain U-Net skip block (ablation of SAFB): concat -> 2 x (3x3 conv-BN-SiLU)."""

    def __init__(self, skip_ch: int, dec_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn_act(skip_ch + dec_ch, out_ch),
                                   conv_bn_act(out_ch, out_ch))

    def forward(self, skip: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, dec], dim=1))


FUSIONS = {"safb": SAFB, "conv": ConvFusion}


def _icnr_(weight: torch.Tensor, scale: int) -> None:
    """ICNR init of a conv feeding PixelShuffle: all sub-pixels start equal (no checkerboard)."""
    out_ch = weight.shape[0] // (scale * scale)
    sub = torch.empty(out_ch, *weight.shape[1:], dtype=weight.dtype)
    nn.init.kaiming_normal_(sub)
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale * scale, dim=0))


class Upsample(nn.Module):
    """x`scale` upsampling with a channel change: depth-to-space ("dsub") or bilinear."""

    def __init__(self, in_ch: int, out_ch: int, scale: int, kind: str):
        super().__init__()
        self.scale, self.kind = scale, kind
        if kind == "dsub" and scale > 1:
            self.proj = nn.Conv2d(in_ch, out_ch * scale * scale, 1)
            _icnr_(self.proj.weight, scale)
            self.shuffle = nn.PixelShuffle(scale)
        elif kind in ("dsub", "bilinear"):
            self.proj = nn.Conv2d(in_ch, out_ch, 1)  # 1x1 conv commutes with interpolation
            self.shuffle = None
        else:
            raise ValueError(f"unknown upsampling {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.shuffle is not None:
            return self.shuffle(x)
        if self.scale > 1:
            return F.interpolate(x, scale_factor=self.scale, mode="bilinear",
                                 align_corners=False)
        return x


# --------------------------------------------------------------------------- encoders
def load_encoder_weights(module: nn.Module, path: str | Path) -> None:
    """Fill every tensor of ``module`` from a local weights file, strictly
    (:func:`histomap.models.checkpoint_io.load_checkpoint`: safetensors or
    ``pytorch_model.bin``, ``model.`` / ``module.`` prefixes removed; InputError naming the file
    and the tensor for a missing, mis-shaped or unmapped one)."""
    load_checkpoint(module, path)


class TimmPyramidEncoder(nn.Module):
    """Any timm backbone with ``features_only``: a list of (B, C_i, H/s_i, W/s_i) maps.

    Its frozen maps are its pyramid (``adapt`` only picks levels); ``cache_strides`` =
    ``strides``.
    """

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, *,
                 checkpoint: str | Path | None = None, **timm_kwargs):
        super().__init__()
        kwargs = dict(timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        # any timm name, or a named pretrained encoder (histomap.models.encoders)
        self.backbone = create_encoder(name, checkpoint=checkpoint, features_only=True, **kwargs)
        self.strides = [float(r) for r in self.backbone.feature_info.reduction()]
        self.channels = list(self.backbone.feature_info.channels())
        self.cache_strides = list(self.strides)
        self.cache_channels = list(self.channels)

    def frozen_parts(self) -> list[nn.Module]:
        return [self.backbone]

    def frozen_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What a frozen encoder contributes (and the feature cache stores): the pyramid."""
        return list(self.backbone(images))

    def adapt(self, maps: Sequence[torch.Tensor | None], levels: Sequence[int]
              ) -> list[torch.Tensor]:
        """Pyramid levels ``levels`` from the frozen maps (here: the same maps)."""
        return [maps[i] for i in levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.frozen_maps(images)


def build_vit(vit_kwargs: dict[str, Any], name: str = "uni2-h") -> nn.Module:
    """A timm VisionTransformer: UNI2-h's architecture (or the timm ViT ``name``) with
    ``vit_kwargs`` overrides (:func:`histomap.models.foundation.build_vit`)."""
    return build_foundation_vit(name, vit_kwargs)


class ViTPyramidEncoder(ViTTokens):
    """ViT with 4 tapped blocks turned into a stride 4/8/16/32 pyramid (ViTDet simple pyramid).

    The input is resized so that one token covers ``token_stride`` input pixels (16 by default,
    i.e. x14/16 for a patch-14 ViT), which makes the pyramid strides exactly token_stride / 4,
    / 2, x1, x2. Tap i (earliest first) feeds pyramid level i (finest first): transposed convs
    (x4, x2), identity, max-pool; then 1x1 conv -> LN -> 3x3 conv -> LN to ``pyramid_channels``.
    The taps are the frozen maps (what the feature cache stores, all at ``token_stride``:
    ``cache_strides``); the neck is the trainable ``adapt``.
    """

    def __init__(self, name: str = "uni2-h", tap_blocks: Sequence[int] | None = None,
                 token_stride: int = 16, pyramid_channels: int | Sequence[int] = 256,
                 grad_checkpointing: bool = False, checkpoint: str | Path | None = None,
                 **vit_kwargs):
        if token_stride % 4:
            raise ValueError(f"token_stride must be a multiple of 4, got {token_stride}")
        super().__init__(name, tap_blocks=tap_blocks, token_stride=token_stride,
                         vit_kwargs=vit_kwargs, checkpoint=checkpoint,
                         grad_checkpointing=grad_checkpointing)
        if len(self.tap_blocks) != 4:
            raise ValueError(f"tap_blocks must be 4 block indices, got {self.tap_blocks}")
        dim = self.embed_dim
        self.cache_strides = list(self.strides)
        self.cache_channels = list(self.channels)
        if isinstance(pyramid_channels, int):
            pyramid_channels = [pyramid_channels] * 4
        self.channels = [int(c) for c in pyramid_channels]
        self.strides = [self.token_stride / 4, self.token_stride / 2, float(self.token_stride),
                        self.token_stride * 2.0]
        half, quarter = max(dim // 2, 1), max(dim // 4, 1)
        rescale = [
            nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), ChannelLayerNorm(half),
                          nn.GELU(), nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(dim, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ]
        in_chs = [quarter, half, dim, dim]
        self.neck = nn.ModuleList(
            nn.Sequential(r, nn.Conv2d(c_in, c_out, 1, bias=False), ChannelLayerNorm(c_out),
                          nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                          ChannelLayerNorm(c_out))
            for r, c_in, c_out in zip(rescale, in_chs, self.channels))

    def frozen_parts(self) -> list[nn.Module]:
        return [self.vit]

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tapped block outputs as (B, D, H/token_stride, W/token_stride) maps."""
        return ViTTokens.forward(self, images)

    def frozen_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.tokens(images)

    def adapt(self, maps: Sequence[torch.Tensor | None], levels: Sequence[int]
              ) -> list[torch.Tensor]:
        """Pyramid levels ``levels`` from the token maps: the trainable neck of each tap."""
        return [self.neck[i](maps[i]) for i in levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.adapt(self.tokens(images), range(len(self.neck)))


def build_encoder(encoder: str, encoder_cfg: dict[str, Any] | None,
                  checkpoint: str | Path | None = None) -> nn.Module:
    """PixNet's encoder: a ViT pyramid for a ViT name (UNI2-h's ``uni2-h``, a timm ``vit_*``),
    a timm ``features_only`` pyramid otherwise; weights from ``checkpoint`` when given."""
    cfg = dict(encoder_cfg or {})
    if is_vit_name(encoder):
        name = "uni2-h" if is_uni2h(encoder) else encoder
        return ViTPyramidEncoder(name, checkpoint=checkpoint, **cfg)
    return TimmPyramidEncoder(encoder, checkpoint=checkpoint, **cfg)


# --------------------------------------------------------------------------- PixNet
class PixNet(DenseSpotsMixin, nn.Module):
    """Dense gene-expression map from an H&E patch.

    Args:
        n_genes: output channels of G.
        encoder: a timm model name (``features_only`` pyramid, e.g. "resnet18", "resnet10t"),
            a named pretrained encoder, "uni2-h" (or "vit": UNI2-h's architecture) or a timm
            ViT name ("vit_small_patch16_224"): a ViT pyramid from tapped blocks;
            ``encoder_cfg`` takes ViT kwargs overrides plus tap_blocks, token_stride,
            pyramid_channels, grad_checkpointing.
        encoder_cfg: keyword arguments of the encoder (timm CNN: out_indices and any
            ``timm.create_model`` kwarg).
        decoder_channels: width per pyramid level, finest first; truncated to the number of
            levels used (default 64, 128, 256, 512, 512, 512).
        fusion: "safb" (default) or "conv" (plain U-Net block; ablation).
        out_stride: pixel size of G in input pixels (1, 2, 4, ...; power of two). Levels finer
            than it are not used; if it is finer than the finest level, extra bilinear stages
            fuse with a small conv stem of the image.
        freeze_encoder: keep the pretrained backbone fixed (no grad, eval mode); the ViT
            pyramid neck still trains.
        pretrained_checkpoint: local encoder weights file (e.g. UNI2-h ``pytorch_model.bin``);
            registry convention: set to None when a trained ``model.pt`` is rebuilt.
        dsub_stages: how many of the deepest up-sampling steps use depth-to-space; default
            half of them (rounded up), the rest are bilinear.
        head_activation: "softplus" (default) or "relu".
        normalize: standardise [0, 1] RGB input with the encoder's mean/std.
    """

    def __init__(self, n_genes: int, *, encoder: str = "resnet18",
                 encoder_cfg: dict[str, Any] | None = None,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 fusion: str = "safb", out_stride: int = 4, freeze_encoder: bool = False,
                 pretrained_checkpoint: str | Path | None = None, dsub_stages: int | None = None,
                 head_activation: str = "softplus", normalize: bool = True):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        if head_activation not in ("softplus", "relu"):
            raise ValueError(f"head_activation must be softplus or relu, got {head_activation!r}")
        if out_stride < 1 or out_stride & (out_stride - 1):
            raise ValueError(f"out_stride must be a power of two >= 1, got {out_stride}")
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.n_genes, self.out_stride, self.fusion = int(n_genes), int(out_stride), fusion
        self._config = {  # plain data: PixNet(n_genes, **config) rebuilds the model
            "encoder": encoder, "encoder_cfg": copy.deepcopy(dict(encoder_cfg or {})),
            "decoder_channels": [int(c) for c in decoder_channels], "fusion": fusion,
            "out_stride": int(out_stride), "freeze_encoder": bool(freeze_encoder),
            "pretrained_checkpoint": None if pretrained_checkpoint is None
            else str(pretrained_checkpoint),
            "dsub_stages": dsub_stages, "head_activation": head_activation,
            "normalize": bool(normalize)}

        self.encoder = build_encoder(encoder, encoder_cfg, pretrained_checkpoint)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            for part in self.encoder.frozen_parts():
                part.requires_grad_(False)
                part.eval()

        strides = self.encoder.strides
        self.levels = [i for i, s in enumerate(strides) if s >= out_stride]
        if not self.levels:
            raise ValueError(f"out_stride {out_stride} is coarser than every encoder level "
                             f"(strides {strides})")
        level_strides = [strides[i] for i in self.levels]
        level_channels = [self.encoder.channels[i] for i in self.levels]
        if len(decoder_channels) < len(self.levels):
            raise ValueError(f"decoder_channels has {len(decoder_channels)} widths for "
                             f"{len(self.levels)} pyramid levels")
        dec = [int(c) for c in decoder_channels[:len(self.levels)]]
        self.decoder_channels = dec
        fuse = FUSIONS[fusion]

        n_up = len(self.levels) - 1
        n_dsub = math.ceil(n_up / 2) if dsub_stages is None else int(dsub_stages)
        self.bottleneck = conv_bn_act(level_channels[-1], dec[-1], 1)
        self.ups, self.fuses = nn.ModuleList(), nn.ModuleList()
        for step, i in enumerate(range(n_up - 1, -1, -1)):  # deepest step first
            ratio = level_strides[i + 1] / level_strides[i]
            if ratio != int(ratio):
                raise ValueError(f"encoder strides {level_strides} are not integer multiples")
            kind = "dsub" if step < n_dsub else "bilinear"
            self.ups.append(Upsample(dec[i + 1], dec[i], int(ratio), kind))
            self.fuses.append(fuse(level_channels[i], dec[i], dec[i]))

        # stages finer than the finest pyramid level: x2 bilinear, fused with an image stem
        n_extra = int(round(math.log2(level_strides[0] / out_stride)))
        if 2 ** n_extra * out_stride != level_strides[0]:
            raise ValueError(f"finest encoder stride {level_strides[0]} is not out_stride "
                             f"{out_stride} times a power of two")
        stem_ch = max(dec[0] // 4, 8)
        self.extra_strides = [int(level_strides[0]) // 2 ** (k + 1) for k in range(n_extra)]
        self.stems = nn.ModuleList(conv_bn_act(3, stem_ch, 3) for _ in range(n_extra))
        self.extra_ups = nn.ModuleList(Upsample(dec[0], dec[0], 2, "bilinear")
                                       for _ in range(n_extra))
        self.extra_fuses = nn.ModuleList(fuse(stem_ch, dec[0], dec[0]) for _ in range(n_extra))

        self.head = nn.Conv2d(dec[0], n_genes, 1)
        self.head_activation = head_activation
        self.normalize = normalize
        self.image_norm = ImageNormalize(*encoder_mean_std(encoder))

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration that rebuilds this model with ``PixNet(n_genes, **config)``."""
        return copy.deepcopy(self._config)

    def init_output_bias(self, mean_expression) -> None:
        """Start G at the mean training expression (see :func:`init_dense_head_bias`)."""
        init_dense_head_bias(self.head, self.head_activation, mean_expression)

    def train(self, mode: bool = True) -> PixNet:
        super().train(mode)
        if self.freeze_encoder:
            for part in self.encoder.frozen_parts():
                part.eval()
        return self

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's frozen maps (CNN pyramid or ViT taps), without autograd when frozen."""
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder.frozen_maps(images)
        return self.encoder.frozen_maps(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) RGB in [0, 1] -> G (B, genes, H / out_stride, W / out_stride)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = self.image_norm(images) if self.normalize else images
        size = (images.shape[-2] // self.out_stride, images.shape[-1] // self.out_stride)
        return self.decode_features(self._encode(x), size, x)

    def decode_features(self, feats: Sequence[torch.Tensor], size: Sequence[int],
                        x: torch.Tensor | None = None) -> torch.Tensor:
        """The part after the frozen encoder: its maps as :meth:`_encode` gives them and the
        feature cache stores them (a CNN's pyramid levels, a ViT's tapped token maps; finest
        first, entries of unused levels may be None) -> the pyramid levels PixNet uses (a ViT's
        trainable neck) -> G of ``size``. ``x`` (the standardised image) feeds the stems of
        stages finer than the finest level; without it such a model cannot decode."""
        if self.stems and x is None:
            raise ValueError(f"out_stride {self.out_stride} is finer than the encoder's finest "
                             "level: the image stems need the image, not only cached features")
        feats = self.encoder.adapt(feats, self.levels)
        d = self.bottleneck(feats[-1])
        for up, fuse, skip in zip(self.ups, self.fuses, reversed(feats[:-1])):
            d = _align(up(d), skip.shape[-2:])
            d = fuse(skip, d)
        for stride, stem, up, fuse in zip(self.extra_strides, self.stems, self.extra_ups,
                                          self.extra_fuses):
            img = F.avg_pool2d(x, stride) if stride > 1 else x
            d = _align(up(d), img.shape[-2:])
            d = fuse(stem(img), d)
        g = _align(self.head(d), tuple(size))
        return F.softplus(g) if self.head_activation == "softplus" else F.relu(g)



def init_dense_head_bias(head: nn.Conv2d, activation: str, mean_expression) -> None:
    """Set a dense map's 1x1 head bias so that the map starts at ``mean_expression`` (G,):
    the bias is the inverse of the head activation (softplus or relu) of the mean, so early
    epochs fit the spatial pattern rather than the level."""
    mean = torch.as_tensor(mean_expression, dtype=torch.float32).flatten()
    if head.bias is None or head.bias.numel() != mean.numel():
        raise ValueError(f"head has {head.out_channels} outputs, mean expression has "
                         f"{mean.numel()} genes")
    mean = mean.clamp(min=1e-3)
    bias = mean if activation == "relu" else mean + torch.log(-torch.expm1(-mean))
    with torch.no_grad():
        head.bias.copy_(bias.to(head.bias.dtype))


def _align(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize to ``size`` when odd input sizes left a one-pixel mismatch."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- loss
def pearson_per_gene(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson r of each gene (column) over spots (rows), and the mask of usable genes.

    A gene is usable when its target varies over the spots; r of the others is 0.
    """
    pc = pred - pred.mean(dim=0, keepdim=True)
    tc = target - target.mean(dim=0, keepdim=True)
    t_ss = (tc * tc).sum(dim=0)
    usable = t_ss > eps * max(target.shape[0], 1)
    r = (pc * tc).sum(dim=0) / (torch.sqrt((pc * pc).sum(dim=0) + eps) * torch.sqrt(t_ss + eps))
    return torch.where(usable, r, torch.zeros_like(r)), usable


def loss_terms(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(MSE, mean per-gene Pearson r) over the measured spots.

    pred, target: (N, C) or (B, N, C); valid: matching (N,) or (B, N) bool mask. The Pearson
    term is None when it is undefined (fewer than 2 spots, or no gene varies).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = pred.reshape(-1, pred.shape[-1]).float()
    target = target.reshape(-1, target.shape[-1]).float()
    if valid is not None:
        keep = valid.reshape(-1).to(device=pred.device, dtype=torch.bool)
        pred, target = pred[keep], target[keep]
    if pred.shape[0] == 0:
        log.debug("pixnet_loss: no measured spot in this batch; loss 0")
        return pred.sum() * 0.0, None
    mse = F.mse_loss(pred, target)
    if pred.shape[0] < 2:
        return mse, None
    r, usable = pearson_per_gene(pred, target)
    if not bool(usable.any()):
        log.debug("pixnet_loss: no gene varies over the %d spots of this batch; no PCC term",
                  pred.shape[0])
        return mse, None
    return mse, r[usable].mean()


def pixnet_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                mse_weight: float = 1.0, pcc_weight: float = 0.5, mode: str = "joint"
                ) -> torch.Tensor:
    """PixNet's joint loss: mse_weight * MSE + pcc_weight * (1 - mean per-gene Pearson r).

    Pearson r is per gene over the (valid) spots of the batch; genes whose target does not vary
    are left out of the mean (and the term is dropped when no gene varies or the batch has < 2
    spots). ``mode="mse"`` / ``"pcc"`` keeps only that (weighted) term.
    """
    if mode not in ("joint", "mse", "pcc"):
        raise ValueError(f"loss mode must be joint, mse or pcc, got {mode!r}")
    mse, pcc = loss_terms(pred, target, valid)
    loss = mse * 0.0
    if mode in ("joint", "mse"):
        loss = loss + mse_weight * mse
    if mode in ("joint", "pcc") and pcc is not None:
        loss = loss + pcc_weight * (1.0 - pcc)
    return loss
