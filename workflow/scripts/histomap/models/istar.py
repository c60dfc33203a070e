"""iStar-style dense baseline: a per-pixel MLP over frozen dense histology features.

After Zhang et al., "Inferring super-resolution tissue architecture by integrating spatial
transcriptomics with histology" (iStar, Nat. Biotechnol. 2024). iStar extracts dense features
of the H&E with a frozen encoder (HIPT), then trains a small MLP that maps each super-pixel's
feature vector to gene expression; the MLP is weakly supervised: the super-pixel predictions
inside a spot are aggregated and compared with the spot's measured expression. iStar sums the
super-pixels of a spot against the spot counts; here the aggregation is the area-weighted mean
over the spot disc (:func:`histomap.models.roi.roi_aggregate`, mode "mean"), the same thing divided
by the spot area, which lets spots of any size and log-normalised targets share one dense map
(per unit area). There is no spatial mixing beyond what the features already see: the MLP is a
stack of 1x1 convolutions.

Feature extractors (all frozen: no parameter of them trains, they stay in eval mode):

* ``"filterbank"``: a fixed, deterministic H&E filter bank, no weights to download. RGB ->
  optical density -> Ruifrok-Johnston colour deconvolution into haematoxylin (H), eosin (E)
  and residual (D) concentrations; on H, E and the mean optical density (total stain), at every
  Gaussian scale sigma: Gaussian smoothing, scale-normalised gradient magnitude,
  scale-normalised Laplacian of Gaussian, local standard deviation (texture); plus RGB and the
  unsmoothed stain channels. Every feature is isotropic, so the dense map is equivariant to
  the dihedral augmentations. Computed at input resolution in float32 and average-pooled to
  the output grid (stride ``out_stride``).
* ``"encoder"``: a frozen timm backbone (``features_only``; a named pretrained encoder, or
  ``pretrained=False`` unless ``pretrained_checkpoint`` names a local weights file) whose
  multi-scale maps are resampled to the output grid (bilinear up-sampling of coarse maps,
  average pooling of finer ones) and concatenated, like iStar's multi-scale HIPT tokens;
  ``"uni2-h"`` (or a timm ``vit_*``) takes the tapped token maps of the ViT of
  :mod:`histomap.models.foundation` (no trained neck).
* ``"both"``: encoder features and the filter bank, concatenated.

Input features are standardised by a BatchNorm without affine parameters (running statistics
at inference), then the MLP (1x1 conv, LeakyReLU(0.1), dropout per hidden layer; iStar's
activation) and a 1x1 conv head with softplus (or ReLU): a non-negative dense map
(B, genes, H / out_stride, W / out_stride), a drop-in for PixNet in :mod:`histomap.tasks.dense`.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histomap.imagenorm import ImageNormalize
from histomap.models.encoder_specs import is_uni2h, is_vit_name
from histomap.models.encoders import encoder_mean_std
from histomap.models.foundation import ViTTokens
from histomap.models.pixnet import TimmPyramidEncoder, init_dense_head_bias
from histomap.models.roi import DenseSpotsMixin

log = logging.getLogger(__name__)

FEATURE_MODES = ("filterbank", "encoder", "both")
HEAD_ACTIVATIONS = ("softplus", "relu")
DEFAULT_SIGMAS = (1.0, 2.0, 4.0, 8.0)
DEFAULT_ENCODER = "resnet18"
# Ruifrok & Johnston (2001) stain optical-density vectors (R, G, B), as in skimage.color:
# haematoxylin, eosin, DAB (the third is the residual channel for H&E).
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
MIN_INTENSITY = 1.0 / 255.0  # clamp before the log: one 8-bit grey level
LEAKY_SLOPE = 0.1


# --------------------------------------------------------------------------- filter bank
def hed_from_rgb_matrix() -> torch.Tensor:
    """(3, 3) matrix M with concentrations (H, E, D) = OD (R, G, B) @ M (Ruifrok-Johnston)."""
    rgb_from_hed = np.asarray(RGB_FROM_HED, dtype=np.float64)
    rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    return torch.from_numpy(np.linalg.inv(rgb_from_hed)).float()


def gaussian_kernels(sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D Gaussian, first and second derivative kernels for ``sigma`` pixels (radius 3 sigma).

    The smoothing kernel sums to 1, the derivative kernels to 0 (constant images give exactly
    zero derivative responses).
    """
    if sigma <= 0:
        raise ValueError(f"filter-bank sigmas must be positive, got {sigma}")
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = -x / sigma ** 2 * g
    d1 = d1 - d1.mean()                    # exact antisymmetry already; guards round-off
    d2 = (x ** 2 / sigma ** 4 - 1.0 / sigma ** 2) * g
    d2 = d2 - g * d2.sum()                 # zero sum, shape kept
    return g.float(), d1.float(), d2.float()


def pyramid_factor(sigma: float, out_stride: int) -> int:
    """Sub-sampling factor for a Gaussian scale: the largest divisor of ``out_stride`` that is
    at most sigma / 2 (so the scale still spans >= 2 sub-sampled pixels)."""
    return max(f for f in range(1, out_stride + 1) if out_stride % f == 0 and f <= max(
        sigma / 2.0, 1.0))


class FilterBank(nn.Module):
    """Fixed H&E filter bank pooled to the output grid: (B, 3, H, W) RGB in [0, 1] ->
    (B, F, H // out_stride, W // out_stride) float32.

    Features (``names`` lists them in order): R, G, B; H, E, D concentrations and the mean
    optical density OD (colour deconvolution, unsmoothed); then for each sigma (input pixels)
    and each of H, E, OD: ``smooth`` (Gaussian), ``grad`` (sigma * |gradient of Gaussian|),
    ``log`` (sigma^2 * Laplacian of Gaussian) and ``std`` (local standard deviation in the
    Gaussian window). Every feature map is average-pooled to the output grid (super-pixels of
    ``out_stride`` input pixels).

    Speed: a scale sigma is computed on the stain maps average-pooled by
    :func:`pyramid_factor` (f <= sigma / 2, a divisor of out_stride) with the Gaussian narrowed
    by the box filter's variance ((f^2 - 1) / 12), so large scales cost f^2 less (about 3% off
    the full-resolution features on smooth structure); the squared stain maps are pooled too,
    so the local std keeps the variance inside each pooled box. Scale-normalised derivatives do
    not depend on the pixel unit. Borders are replicate-padded. No parameters; kernels are
    non-persistent buffers rebuilt from ``sigmas``.
    """

    BASE = ("H", "E", "OD")
    KINDS = ("smooth", "grad", "log", "std")

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, out_stride: int = 1):
        super().__init__()
        self.sigmas = [float(s) for s in sigmas]
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"filter-bank sigmas must be positive (at least one), got "
                             f"{self.sigmas}")
        self.out_stride = int(out_stride)
        self.factors = [pyramid_factor(s, self.out_stride) for s in self.sigmas]
        self.register_buffer("hed_from_rgb", hed_from_rgb_matrix(), persistent=False)
        self.scaled_sigmas = []
        for i, (sigma, f) in enumerate(zip(self.sigmas, self.factors)):
            s_f = math.sqrt(max(sigma ** 2 - (f * f - 1) / 12.0, 0.25)) / f
            self.scaled_sigmas.append(s_f)
            self.register_buffer(f"k{i}", torch.stack(gaussian_kernels(s_f)), persistent=False)
        self.names = ["R", "G", "B", "H", "E", "D", "OD"] + [
            f"{kind}_{base}_s{sigma:g}" for sigma in self.sigmas for base in self.BASE
            for kind in self.KINDS]

    @property
    def channels(self) -> int:
        return len(self.names)

    def train(self, mode: bool = True) -> FilterBank:
        return super().train(False)

    def stains(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Optical density (B, 3, H, W) = -ln(RGB) and stain concentrations (H, E, D)."""
        od = -torch.log(images.clamp(min=MIN_INTENSITY, max=1.0))
        hed = torch.einsum("bchw,cs->bshw", od, self.hed_from_rgb)
        return od, hed

    @staticmethod
    def _depthwise(x: torch.Tensor, kernels: torch.Tensor, axis: str) -> torch.Tensor:
        """Every channel of (B, c, H, W) convolved along ``axis`` ("x" or "y") with each of the
        k (k, K) kernels -> (B, c * k, H, W), outputs of one channel adjacent."""
        k, size = kernels.shape
        r = size // 2
        c = x.shape[1]
        if axis == "x":
            weight = kernels.view(1, k, 1, size).expand(c, k, 1, size).reshape(c * k, 1, 1, size)
            x = F.pad(x, (r, r, 0, 0), mode="replicate")
        else:
            weight = kernels.view(1, k, size, 1).expand(c, k, size, 1).reshape(c * k, 1, size, 1)
            x = F.pad(x, (0, 0, r, r), mode="replicate")
        return F.conv2d(x, weight, groups=c)

    def _scale_features(self, base: torch.Tensor, square: torch.Tensor, offset: torch.Tensor,
                        i: int) -> torch.Tensor:
        """smooth, grad, log, std of each base channel at scale i -> (B, c * 4, h, w).

        ``base`` is centred (``offset`` = its removed per-image mean, added back to ``smooth``)
        and ``square`` its square, so the local variance does not cancel in float32.
        """
        b, c, h, w = base.shape
        sigma = self.scaled_sigmas[i]
        kernels = getattr(self, f"k{i}")                            # (3, K): g, d1, d2
        g = kernels[:1]
        along_x = self._depthwise(base, kernels, "x").view(b, c, 3, h, w)
        # along y: g, d1, d2 after x-smoothing; g after the x-derivatives
        smooth_d = self._depthwise(along_x[:, :, 0], kernels, "y").view(b, c, 3, h, w)
        rest = self._depthwise(along_x[:, :, 1:].reshape(b, c * 2, h, w), g, "y")
        rest = rest.view(b, c, 2, h, w)
        second = self._depthwise(self._depthwise(square, g, "x"), g, "y")
        smooth, gy, gyy = smooth_d[:, :, 0], smooth_d[:, :, 1], smooth_d[:, :, 2]
        gx, gxx = rest[:, :, 0], rest[:, :, 1]
        grad = sigma * torch.sqrt(gx * gx + gy * gy)
        lap = sigma * sigma * (gxx + gyy)
        std = torch.sqrt((second - smooth * smooth).clamp(min=0.0))
        smooth = smooth + offset
        return torch.stack([smooth, grad, lap, std], dim=2).reshape(b, c * 4, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        s = self.out_stride
        od, hed = self.stains(images)
        density = od.mean(dim=1, keepdim=True)
        base = torch.cat([hed[:, :2], density], dim=1)             # (B, 3, H, W): H, E, OD
        offset = base.mean(dim=(2, 3), keepdim=True)
        centred = base - offset
        square = centred * centred
        out = [_pool(torch.cat([images, hed, density], dim=1), s)]
        pooled = {1: (centred, square)}
        for i, f in enumerate(self.factors):
            if f not in pooled:
                pooled[f] = (_pool(centred, f), _pool(square, f))
            out.append(_pool(self._scale_features(*pooled[f], offset, i), s // f))
        return torch.cat(out, dim=1)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor) if factor > 1 else x


# --------------------------------------------------------------------------- frozen features
def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """To the output grid: average pooling when finer, bilinear up-sampling when coarser."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DenseFeatures(nn.Module):
    """Frozen dense features on the output grid: (B, 3, H, W) [0, 1] -> (B, F, H/s, W/s).

    Always in eval mode (``train()`` is a no-op), every parameter has ``requires_grad=False``
    and the forward runs without autograd. The filter bank runs in float32 with autocast off;
    the encoder runs under the caller's autocast and is cast to float32.
    """

    def __init__(self, features: str, out_stride: int, *, encoder: str | None,
                 encoder_cfg: dict[str, Any] | None, sigmas: Sequence[float],
                 checkpoint: str | Path | None = None):
        super().__init__()
        self.out_stride = int(out_stride)
        self.filterbank = (FilterBank(sigmas, self.out_stride)
                           if features in ("filterbank", "both") else None)
        self.encoder: nn.Module | None = None
        self.encoder_channels = 0
        if features in ("encoder", "both"):
            cfg = dict(encoder_cfg or {})
            if is_vit_name(encoder):
                # iStar uses the token maps themselves (no untrained neck)
                taps = {k: cfg.pop(k) for k in ("tap_blocks", "token_stride") if k in cfg}
                cfg.pop("pyramid_channels", None)
                cfg.pop("grad_checkpointing", None)  # frozen: no backward through it
                self.encoder = ViTTokens("uni2-h" if is_uni2h(encoder) else encoder,
                                         vit_kwargs=cfg, checkpoint=checkpoint, **taps)
            else:
                self.encoder = TimmPyramidEncoder(encoder, checkpoint=checkpoint, **cfg)
            self.encoder_channels = int(sum(self.encoder.channels))
        self.channels = self.encoder_channels + (self.filterbank.channels
                                                 if self.filterbank is not None else 0)
        self.image_norm = ImageNormalize(*encoder_mean_std(encoder))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DenseFeatures:
        return super().train(False)

    def encoder_module(self) -> nn.Module:
        """The module holding the encoder weights (the target of a pretrained checkpoint)."""
        if isinstance(self.encoder, ViTTokens):
            return self.encoder.vit
        if isinstance(self.encoder, TimmPyramidEncoder):
            return self.encoder.backbone
        raise ValueError("these features have no encoder")

    def _encoder_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(self.image_norm(images)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (images.shape[-2] // self.out_stride, images.shape[-1] // self.out_stride)
        parts = []
        if self.encoder is not None:
            parts += [_resample(m.float(), size) for m in self._encoder_maps(images)]
        if self.filterbank is not None:
            with torch.autocast(device_type=images.device.type, enabled=False):
                parts.append(self.filterbank(images.float()))
        return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- iStar
class IStar(DenseSpotsMixin, nn.Module):
    """iStar-style dense map: frozen dense features -> per-pixel MLP -> non-negative genes.

    Args:
        n_genes: output channels of the dense map.
        features: "filterbank" (default; fixed H&E filter bank), "encoder" (frozen timm or ViT
            encoder) or "both".
        encoder: timm model name (``features_only``) or "vit"/"uni2-h"; default "resnet18"
            when the features use an encoder; must be None for "filterbank".
        encoder_cfg: encoder keyword arguments (timm: out_indices, ...; ViT: see PixNet).
        pretrained_checkpoint: local encoder weights file; registry convention: None when a
            trained ``model.pt`` is rebuilt (its state dict holds the encoder weights).
        out_stride: dense-map pixel size in input pixels (the super-pixel; any integer >= 1).
        hidden: widths of the hidden 1x1-conv layers (empty: a linear model on the features).
        dropout: dropout after every hidden layer.
        head_activation: "softplus" (default) or "relu".
        sigmas: filter-bank Gaussian scales in input pixels.
    """

    def __init__(self, n_genes: int, *, features: str = "filterbank", encoder: str | None = None,
                 encoder_cfg: dict[str, Any] | None = None,
                 pretrained_checkpoint: str | Path | None = None, out_stride: int = 4,
                 hidden: Sequence[int] = (256, 256), dropout: float = 0.1,
                 head_activation: str = "softplus", sigmas: Sequence[float] = DEFAULT_SIGMAS):
        super().__init__()
        if features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {features!r}")
        if features == "filterbank" and (encoder is not None or encoder_cfg
                                         or pretrained_checkpoint is not None):
            raise ValueError("features='filterbank' takes no encoder, encoder_cfg or "
                             "pretrained_checkpoint; use features='encoder' or 'both'")
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {HEAD_ACTIVATIONS}, got "
                             f"{head_activation!r}")
        if int(out_stride) != out_stride or out_stride < 1:
            raise ValueError(f"out_stride must be an integer >= 1, got {out_stride}")
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden}")
        if features != "filterbank" and encoder is None:
            encoder = DEFAULT_ENCODER
        self.n_genes, self.out_stride = int(n_genes), int(out_stride)
        self.head_activation = head_activation
        self._config = {  # plain data: IStar(n_genes, **config) rebuilds the model
            "features": features, "encoder": encoder,
            "encoder_cfg": copy.deepcopy(dict(encoder_cfg or {})),
            "pretrained_checkpoint": None if pretrained_checkpoint is None
            else str(pretrained_checkpoint),
            "out_stride": self.out_stride, "hidden": hidden, "dropout": float(dropout),
            "head_activation": head_activation, "sigmas": [float(s) for s in sigmas]}

        self.features = DenseFeatures(features, self.out_stride, encoder=encoder,
                                      encoder_cfg=encoder_cfg, sigmas=sigmas,
                                      checkpoint=pretrained_checkpoint)
        n_in = self.features.channels
        self.norm = nn.BatchNorm2d(n_in, affine=False)  # feature standardisation
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Conv2d(width, h, 1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, self.n_genes, 1)
        log.info("IStar: %d frozen %s features -> MLP %s -> %d genes (super-pixel %d input px)",
                 n_in, features, hidden, self.n_genes, self.out_stride)

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration that rebuilds this model with ``IStar(n_genes, **config)``."""
        return copy.deepcopy(self._config)

    def train(self, mode: bool = True) -> IStar:
        super().train(mode)
        self.features.eval()  # frozen extractor: BatchNorm statistics and dropout fixed
        return self

    def init_output_bias(self, mean_expression: torch.Tensor | np.ndarray) -> None:
        """Start the dense map at the mean training expression (head bias = inverse of the
        head activation at that mean, floored at 1e-3; see
        :func:`histomap.models.pixnet.init_dense_head_bias`)."""
        init_dense_head_bias(self.head, self.head_activation, np.asarray(mean_expression))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) RGB in [0, 1] -> (B, genes, H // out_stride, W // out_stride)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2] < self.out_stride or images.shape[-1] < self.out_stride:
            raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than one "
                             f"super-pixel ({self.out_stride} px)")
        return self._head(self.features(images))

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        g = self.head(self.mlp(self.norm(features)))
        return F.softplus(g) if self.head_activation == "softplus" else F.relu(g)

    def decode_features(self, levels: Sequence[torch.Tensor], size: Sequence[int]
                        ) -> torch.Tensor:
        """The part after the frozen encoder, from its levels (e.g. the feature cache):
        resampled to the output grid of ``size``, concatenated, MLP. Encoder features only
        (the filter bank needs the image): a CNN's pyramid or a ViT's tapped token maps."""
        if self.features.filterbank is not None or self.features.encoder is None:
            raise ValueError("cached features serve iStar with features='encoder' only")
        size = (int(size[0]), int(size[1]))
        return self._head(torch.cat([_resample(m.float(), size) for m in levels], dim=1))

