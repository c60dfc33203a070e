"""Non-diffusion super-resolution baselines of Diff-ST (Wang et al. 2024, Table 1).

Every baseline maps the same inputs to the HR ST map of G genes::

    model(lr_up, image, lr=None) -> hr      # (B, G, H, W)

* ``lr_up`` (B, G, H, W): the LR map already upsampled (bicubic) onto the HR grid, as
  :class:`histomap.data.srpairs.SRPairDataset` gives it (upsampled by the integer ``scale`` and cropped
  to the HR patch, so ``edge="ceil"`` LR pixels stay in place);
* ``image`` (B, 3, Hi, Wi): the H&E patch over the same tissue square, RGB float in [0, 1] (uint8
  is divided by 255), any size: each model resizes it internally;
* ``lr`` (B, G, h, w): the raw LR map (used by ``bicubic`` and ``tesla``; the CNNs and HistoGene
  ignore it).

The output is in the units of the inputs (log1p or min-max [0, 1], see
:mod:`histomap.data.srpairs`, which stores the LR map in the HR map's units, so interpolating it
already predicts the HR map in the truth's units); nothing is clamped. ``out_activation`` picks the last step: ``"identity"`` (default) or
``"softplus"`` (non-negative). Any H, W work: networks pad (replicate) to the size their
down-sampling needs and crop back.

Baselines (:data:`SR_BASELINES`, built by :func:`build_sr_baseline`):

* ``bicubic`` (:class:`BicubicSR`): the LR map upsampled bicubically; no parameters.
* ``unet`` (:class:`UNetSR`, Ronneberger et al. 2015), ``unetpp`` (:class:`UNetPlusPlusSR`,
  nested dense skips, Zhou et al. 2018), ``attention_unet`` (:class:`AttentionUNetSR`, additive
  attention gates on the skips, Oktay et al. 2018): input ``concat(lr_up, H&E resized to H x W)``
  (G + 3 channels). With ``residual=True`` (default) they predict a correction added to
  ``lr_up`` (before ``out_activation``).
* ``histogene_sr`` (:class:`HistoGeneSR`, after Pang et al. 2021): a transformer over the
  patch's HR pixels (one token per ``token_px`` x ``token_px`` block, embedding its H&E and its
  block of the upsampled LR map) and a pixel-shuffle head; ``use_lr=False`` is HistoGene itself
  (histology only).
* ``tesla`` (:class:`TeslaSR`, after Hu et al. 2023): non-parametric, each HR pixel is a weighted
  average of nearby LR pixels, weights from spatial and histology-colour distance; no training.

Diff-ST states that all its comparison methods received both the H&E image and the LR map, so
every baseline here reads it by default; ``uses_lr_map`` says whether a built model does (the
SR tables mark rows that do not).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histomap.imagenorm import ImageNormalize
from histomap.models.unet import as_float_image, resize

log = logging.getLogger(__name__)

OUT_ACTIVATIONS = ("identity", "softplus")
NORMS = ("batch", "group", "none")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


# ============================================================================ shared helpers
def _out_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in OUT_ACTIVATIONS:
        raise ValueError(f"out_activation must be one of {OUT_ACTIVATIONS}, got {name!r}")
    return F.softplus if name == "softplus" else (lambda x: x)


def _check_inputs(n_genes: int, lr_up: Tensor, image: Tensor, lr: Tensor | None) -> None:
    """Shapes of the common inputs (see the module docstring); raises ValueError."""
    if lr_up.ndim != 4 or lr_up.shape[1] != n_genes:
        raise ValueError(f"lr_up must be (B, {n_genes}, H, W), got {tuple(lr_up.shape)}")
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] != lr_up.shape[0]:
        raise ValueError(f"image must be (B={lr_up.shape[0]}, 3, Hi, Wi), got "
                         f"{tuple(image.shape)}")
    if lr is not None and (lr.ndim != 4 or lr.shape[:2] != lr_up.shape[:2]):
        raise ValueError(f"lr must be (B={lr_up.shape[0]}, {n_genes}, h, w), got "
                         f"{tuple(lr.shape)}")


def hr_image(image: Tensor, hw: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The H&E patch (B, 3, Hi, Wi) resized onto an (H, W) grid: area mean when shrinking,
    bilinear when enlarging; float RGB in [0, 1]."""
    return resize(as_float_image(image).to(dtype), hw)


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad (B, C, H, W) at the bottom/right to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def lr_scale(hr_hw: Sequence[int], lr_hw: Sequence[int], scale: int | None = None) -> int:
    """Integer HR/LR factor of a pair: ``scale`` if given, else ceil(H / h). Checks that the LR
    pixels (``scale`` HR pixels each) cover the HR grid, the last one possibly running past it
    (``edge="ceil"`` pairs)."""
    (H, W), (h, w) = hr_hw, lr_hw
    s = int(scale) if scale is not None else math.ceil(H / h)
    if s < 1 or not (h * s >= H > (h - 1) * s and w * s >= W > (w - 1) * s):
        raise ValueError(f"an LR map of {h}x{w} pixels at scale {s} does not cover the HR grid "
                         f"{H}x{W} (need (h - 1) * scale < H <= h * scale, same for W)")
    return s


def upsample_lr(lr: Tensor, hr_hw: Sequence[int], scale: int | None = None,
                mode: str = "bicubic") -> Tensor:
    """LR map (B, G, h, w) upsampled by the integer scale and cropped to (H, W), exactly as
    :class:`histomap.data.srpairs.SRPairDataset` builds ``lr_up``."""
    s = lr_scale(hr_hw, lr.shape[-2:], scale)
    kw = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(lr, size=(lr.shape[-2] * s, lr.shape[-1] * s), mode=mode, **kw)
    return up[..., :hr_hw[0], :hr_hw[1]]


def _norm_layer(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(math.gcd(ch, 8), ch)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """(3x3 conv - norm - ReLU) x 2, the U-Net stage (no conv bias in front of a norm)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch") -> None:
        bias = norm == "none"
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
                         _norm_layer(norm, out_ch), nn.ReLU(inplace=True),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
                         _norm_layer(norm, out_ch), nn.ReLU(inplace=True))


# ============================================================================ bicubic
class BicubicSR(nn.Module):
    """The LR map upsampled by interpolation (``mode``, default bicubic); no parameters.

    With ``lr`` it upsamples ``lr`` by the integer ``scale`` (None: ceil(H / h)) and crops to the
    HR grid (as the dataset builds ``lr_up``); without ``lr`` it returns ``lr_up``."""

    trainable = False

    def __init__(self, n_genes: int, *, mode: str = "bicubic", scale: int | None = None) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.n_genes, self.mode, self.scale = int(n_genes), mode, scale

    @property
    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "scale": self.scale}

    def forward(self, lr_up: Tensor, image: Tensor, lr: Tensor | None = None) -> Tensor:
        _check_inputs(self.n_genes, lr_up, image, lr)
        if lr is None:
            return lr_up
        return upsample_lr(lr.to(lr_up.dtype), lr_up.shape[-2:], self.scale, self.mode)


# ============================================================================ CNN baselines
class _SRCNN(nn.Module):
    """Shared frame of the U-Net family: input ``concat(lr_up, H&E on the HR grid)`` (the H&E
    normalised with ImageNet mean/std), replicate padding to a multiple of ``2 ** depth``, crop,
    optional residual over ``lr_up`` (``residual=True``: output = act(lr_up + net(...))), then
    ``out_activation``.

    Channels at level i are ``base_channels * 2 ** i`` for i = 0..depth (``depth`` poolings).
    ``image_encoder`` (optional, e.g. ``efficientnet_lite0_imagenet``): a frozen encoder of
    :mod:`histomap.models.encoders` on the H&E patch; its stage ``image_encoder_stage`` map is
    1x1-projected to ``image_channels``, resized to the HR grid and concatenated to the input."""

    trainable = True

    def __init__(self, n_genes: int, *, base_channels: int = 16, depth: int = 3,
                 residual: bool = True, out_activation: str = "identity",
                 norm: str = "batch", image_encoder: str | None = None,
                 image_encoder_stage: int = 2, image_channels: int = 8) -> None:
        super().__init__()
        if n_genes < 1 or base_channels < 1 or depth < 1:
            raise ValueError(f"n_genes, base_channels and depth must be >= 1, got {n_genes}, "
                             f"{base_channels}, {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self._act = _out_activation(out_activation)
        self.n_genes, self.depth, self.norm = int(n_genes), int(depth), norm
        self._config = {"base_channels": int(base_channels), "depth": int(depth),
                        "residual": bool(residual), "out_activation": out_activation,
                        "norm": norm}
        self.widths = [int(base_channels) * 2 ** i for i in range(self.depth + 1)]
        self.in_channels = self.n_genes + 3
        self.image_branch = None
        if image_encoder is not None:
            from histomap.models.diffst_hierarchy import TimmTissueEncoder  # encoder + projection

            self._config.update({"image_encoder": image_encoder,
                                 "image_encoder_stage": int(image_encoder_stage),
                                 "image_channels": int(image_channels)})
            self.image_branch = TimmTissueEncoder(image_encoder, int(image_channels),
                                                  int(image_encoder_stage), frozen=True)
            self.in_channels += int(image_channels)
        self.head = nn.Conv2d(self.widths[0], self.n_genes, 1)
        self.image_norm = ImageNormalize()

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration: ``type(model)(n_genes, **model.config)`` rebuilds it."""
        return dict(self._config)

    def features(self, x: Tensor) -> Tensor:
        """(B, G + 3, H', W') with H', W' multiples of 2 ** depth -> (B, widths[0], H', W')."""
        raise NotImplementedError

    def forward(self, lr_up: Tensor, image: Tensor, lr: Tensor | None = None) -> Tensor:
        """``lr`` is accepted for a common interface and not used."""
        _check_inputs(self.n_genes, lr_up, image, lr)
        H, W = lr_up.shape[-2:]
        img = self.image_norm(hr_image(image, (H, W), lr_up.dtype))
        parts = [lr_up, img]
        if self.image_branch is not None:
            feats = self.image_branch(as_float_image(image).to(lr_up.dtype))
            parts.append(resize(feats, (H, W)))
        x = _pad_to_multiple(torch.cat(parts, dim=1), 2 ** self.depth)
        out = self.head(self.features(x))[..., :H, :W]
        if self._config["residual"]:
            out = out + lr_up
        return self._act(out)


class UNetSR(_SRCNN):
    """U-Net (Ronneberger et al. 2015): conv blocks, max-pool down, 2x2 transposed-conv up,
    concatenated skips. Predicts a residual over ``lr_up`` when ``residual=True`` (default).

    Keywords: ``base_channels`` (16), ``depth`` (3 poolings), ``residual`` (True),
    ``out_activation`` ("identity" | "softplus"), ``norm`` ("batch" | "group" | "none")."""

    def __init__(self, n_genes: int, **config: Any) -> None:
        super().__init__(n_genes, **config)
        w = self.widths
        self.encoders = nn.ModuleList(
            [ConvBlock(self.in_channels, w[0], self.norm)]
            + [ConvBlock(w[i - 1], w[i], self.norm) for i in range(1, self.depth + 1)])
        # decoder modules indexed by the level they produce (0 = full resolution)
        self.ups = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                  for i in range(self.depth)])
        self.decoders = nn.ModuleList([ConvBlock(2 * w[i], w[i], self.norm)
                                       for i in range(self.depth)])

    def gate_skip(self, level: int, skip: Tensor, coarse: Tensor) -> Tensor:
        """The skip connection of ``level`` given the coarser decoder features (identity)."""
        return skip

    def features(self, x: Tensor) -> Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth)):
            skip = self.gate_skip(level, skips.pop(), x)
            x = self.decoders[level](torch.cat([skip, self.ups[level](x)], dim=1))
        return x


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): alpha = sigmoid(psi(ReLU(W_x x + W_g g))),
    W_x a stride-2 conv bringing the skip ``x`` to the grid of the coarser gating signal ``g``;
    alpha (B, 1, h, w) in [0, 1] is upsampled bilinearly to ``x`` and scales it; a 1x1 conv and
    norm follow (the paper's output transform W). ``last_alpha`` keeps the latest gate."""

    def __init__(self, x_ch: int, g_ch: int, inter_ch: int, norm: str = "batch") -> None:
        super().__init__()
        self.theta_x = nn.Conv2d(x_ch, inter_ch, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(g_ch, inter_ch, 1)
        self.psi = nn.Conv2d(inter_ch, 1, 1)
        self.out = nn.Sequential(nn.Conv2d(x_ch, x_ch, 1, bias=norm == "none"),
                                 _norm_layer(norm, x_ch))
        self.last_alpha: Tensor | None = None

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        f = F.relu(self.theta_x(x) + self.phi_g(g))      # skips have even sizes (padding)
        alpha = torch.sigmoid(self.psi(f))
        alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        self.last_alpha = alpha
        return self.out(alpha * x)


class AttentionUNetSR(UNetSR):
    """Attention U-Net: the U-Net with an :class:`AttentionGate` on every skip, gated by the
    next-coarser decoder features. Same keywords as :class:`UNetSR`; residual over ``lr_up``
    by default. ``last_gates`` lists the latest gates, coarsest first."""

    def __init__(self, n_genes: int, **config: Any) -> None:
        super().__init__(n_genes, **config)
        w = self.widths
        self.gates = nn.ModuleList([AttentionGate(w[i], w[i + 1], max(1, w[i] // 2), self.norm)
                                    for i in range(self.depth)])

    def gate_skip(self, level: int, skip: Tensor, coarse: Tensor) -> Tensor:
        return self.gates[level](skip, coarse)

    @property
    def last_gates(self) -> list[Tensor]:
        return [g.last_alpha for g in reversed(self.gates) if g.last_alpha is not None]


class UNetPlusPlusSR(_SRCNN):
    """U-Net++ (Zhou et al. 2018): nested dense skip pathways. Node X[i][j] (level i, column j)
    is a conv block over ``concat(X[i][0..j-1], up(X[i+1][j-1]))``; X[i][0] is the encoder; the
    output reads X[0][depth] (no deep supervision). Same keywords as :class:`UNetSR`; residual
    over ``lr_up`` by default. Upsampling is bilinear (the reference implementation)."""

    def __init__(self, n_genes: int, **config: Any) -> None:
        super().__init__(n_genes, **config)
        w, d = self.widths, self.depth
        self.nodes = nn.ModuleDict()
        for i in range(d + 1):
            for j in range(d + 1 - i):
                if j == 0:
                    in_ch = self.in_channels if i == 0 else w[i - 1]
                else:
                    in_ch = j * w[i] + w[i + 1]
                self.nodes[f"{i}_{j}"] = ConvBlock(in_ch, w[i], self.norm)

    def features(self, x: Tensor) -> Tensor:
        d = self.depth
        grid: dict[tuple[int, int], Tensor] = {}
        for i in range(d + 1):
            grid[i, 0] = self.nodes[f"{i}_0"](x if i == 0 else F.max_pool2d(grid[i - 1, 0], 2))
        for j in range(1, d + 1):
            for i in range(d + 1 - j):
                below = F.interpolate(grid[i + 1, j - 1], scale_factor=2, mode="bilinear",
                                      align_corners=False)
                grid[i, j] = self.nodes[f"{i}_{j}"](
                    torch.cat([grid[i, k] for k in range(j)] + [below], dim=1))
        return grid[0, d]


# ============================================================================ HistoGene
class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block (batch first). ``attn_dropout`` is separate from
    ``dropout`` (residual branches) because dropping attention weights of 1000+ tokens dominates
    a CPU step."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), \
            nn.Linear(dim, dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)                         # (b, heads, n, d/heads)
        a = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class HistoGeneSR(nn.Module):
    """HistoGene-style SR from histology: tokens = ``token_px`` x ``token_px`` blocks of HR
    pixels; each token's H&E (``pixel_px`` image px per HR pixel, so a square of
    ``token_px * pixel_px`` px) is flattened and embedded linearly, learned x and y position
    embeddings (``max_grid`` positions per axis) are added, a transformer encoder (``layers``,
    ``heads``, width ``dim``; ``dropout`` on embeddings and residual branches, ``attn_dropout`` on
    attention weights) mixes the tokens, and a linear head gives ``G * token_px ** 2``
    values per token, pixel-shuffled to the HR map. ``use_lr=True`` (default: every SR method
    gets the LR map) adds a linear embedding of the token's ``lr_up`` block; ``use_lr=False``
    is HistoGene itself (histology only).

    The H&E is resized to ``(H * pixel_px, W * pixel_px)``, normalised with ImageNet mean/std;
    H, W are padded (replicate) to multiples of ``token_px`` and cropped back. At 128 x 128 with
    the defaults: 1024 tokens of 16 x 16 px."""

    trainable = True

    def __init__(self, n_genes: int, *, token_px: int = 4, pixel_px: int = 4, dim: int = 64,
                 layers: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1,
                 attn_dropout: float = 0.0, max_grid: int = 64, use_lr: bool = True,
                 out_activation: str = "identity") -> None:
        super().__init__()
        if min(n_genes, token_px, pixel_px, layers, max_grid) < 1:
            raise ValueError("n_genes, token_px, pixel_px, layers and max_grid must be >= 1")
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of heads ({heads})")
        self._act = _out_activation(out_activation)
        self.n_genes = int(n_genes)
        self._config = {"token_px": int(token_px), "pixel_px": int(pixel_px), "dim": int(dim),
                        "layers": int(layers), "heads": int(heads),
                        "mlp_ratio": float(mlp_ratio), "dropout": float(dropout),
                        "attn_dropout": float(attn_dropout),
                        "max_grid": int(max_grid), "use_lr": bool(use_lr),
                        "out_activation": out_activation}
        t, p = int(token_px), int(pixel_px)
        self.token_px, self.pixel_px, self.max_grid = t, p, int(max_grid)
        self.patch_embedding = nn.Linear(3 * (t * p) ** 2, dim)
        self.lr_embedding = nn.Linear(self.n_genes * t * t, dim) if use_lr else None
        self.x_embedding = nn.Embedding(self.max_grid, dim)
        self.y_embedding = nn.Embedding(self.max_grid, dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.encoder = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, dropout,
                                                        attn_dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.n_genes * t * t)
        self.image_norm = ImageNormalize()

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration: ``HistoGeneSR(n_genes, **model.config)`` rebuilds it."""
        return dict(self._config)

    @property
    def uses_lr_map(self) -> bool:
        return self.lr_embedding is not None

    def forward(self, lr_up: Tensor, image: Tensor, lr: Tensor | None = None) -> Tensor:
        _check_inputs(self.n_genes, lr_up, image, lr)
        t, p = self.token_px, self.pixel_px
        B, G, H, W = lr_up.shape
        gy, gx = math.ceil(H / t), math.ceil(W / t)
        if max(gy, gx) > self.max_grid:
            raise ValueError(f"HR map {H}x{W} needs a {gy}x{gx} token grid; max_grid is "
                             f"{self.max_grid} (raise it or token_px)")
        img = self.image_norm(hr_image(image, (H * p, W * p), lr_up.dtype))
        img = _pad_to_multiple(img, t * p)
        tokens = self.patch_embedding(F.unfold(img, t * p, stride=t * p).transpose(1, 2))
        rows = torch.arange(gy, device=lr_up.device).repeat_interleave(gx)
        cols = torch.arange(gx, device=lr_up.device).repeat(gy)
        tokens = tokens + self.y_embedding(rows) + self.x_embedding(cols)
        if self.lr_embedding is not None:
            blocks = F.unfold(_pad_to_multiple(lr_up, t), t, stride=t).transpose(1, 2)
            tokens = tokens + self.lr_embedding(blocks)
        z = self.norm(self.encoder(self.embedding_dropout(tokens)))
        out = self.head(z).transpose(1, 2).reshape(B, G * t * t, gy, gx)
        return self._act(F.pixel_shuffle(out, t)[..., :H, :W])


# ============================================================================ TESLA
class TeslaSR(nn.Module):
    """TESLA-style histology-guided interpolation (after Hu et al. 2023); no parameters.

    Each HR pixel's expression is a weighted average of the LR pixels whose centres lie within
    ``radius`` LR pixels of its centre, with weight::

        exp(-d_xy ** 2 / (2 sigma_spatial ** 2)) * exp(-|c_hr - c_lr| ** 2 / (2 sigma_colour ** 2))

    ``d_xy`` in LR pixels, ``c_hr`` the mean RGB (in [0, 1]) of the HR pixel's H&E, ``c_lr`` the
    mean RGB over the LR pixel's part of the patch. Weights are normalised in log space, so a
    pixel whose colour is far from all neighbours still follows the closest in colour.

    Tissue masking (``tissue_threshold``; None switches it off): an HR pixel is background when
    its mean RGB exceeds the threshold (bright glass); LR pixels whose tissue fraction is below
    ``min_tissue_fraction`` are not used as neighbours. Background HR pixels, and HR pixels
    without a usable LR pixel in the radius, keep ``lr_up`` (``last_fallback_fraction`` records
    their share in the last batch).

    The original TESLA imputes superpixels from their ``num_nbs`` nearest spots in an (x, y,
    scaled colour) space with inverse-distance weights; the product of Gaussians here is the
    same idea (near in space and in histology) on a fixed grid. ``scale``: HR pixels per LR pixel
    (None: ceil(H / h)). Needs ``lr``."""

    trainable = False

    def __init__(self, n_genes: int, *, radius: float = 2.0, sigma_spatial: float = 1.0,
                 sigma_colour: float = 0.1, tissue_threshold: float | None = 0.85,
                 min_tissue_fraction: float = 0.25, scale: int | None = None) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        if not (radius > 0 and sigma_spatial > 0 and sigma_colour > 0):
            raise ValueError(f"radius, sigma_spatial and sigma_colour must be > 0, got {radius}, "
                             f"{sigma_spatial}, {sigma_colour}")
        if not 0 <= min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        self.n_genes = int(n_genes)
        self.radius, self.sigma_spatial = float(radius), float(sigma_spatial)
        self.sigma_colour = float(sigma_colour)
        self.tissue_threshold = None if tissue_threshold is None else float(tissue_threshold)
        self.min_tissue_fraction, self.scale = float(min_tissue_fraction), scale
        self.last_fallback_fraction = 0.0

    @property
    def config(self) -> dict[str, Any]:
        return {"radius": self.radius, "sigma_spatial": self.sigma_spatial,
                "sigma_colour": self.sigma_colour, "tissue_threshold": self.tissue_threshold,
                "min_tissue_fraction": self.min_tissue_fraction, "scale": self.scale}

    def _lr_colour(self, colour: Tensor, tissue: Tensor, lr_hw: Sequence[int],
                   s: int) -> tuple[Tensor, Tensor]:
        """Mean RGB (B, 3, h, w) and tissue fraction (B, h, w) of each LR pixel over its HR
        pixels inside the patch."""
        H, W = colour.shape[-2:]
        pad = (0, lr_hw[1] * s - W, 0, lr_hw[0] * s - H)
        inside = F.avg_pool2d(F.pad(torch.ones_like(colour[:, :1]), pad), s)
        mean = F.avg_pool2d(F.pad(torch.cat([colour, tissue[:, None].to(colour.dtype)], 1), pad),
                            s) / inside
        return mean[:, :3], mean[:, 3]

    @torch.no_grad()
    def forward(self, lr_up: Tensor, image: Tensor, lr: Tensor | None = None) -> Tensor:
        _check_inputs(self.n_genes, lr_up, image, lr)
        if lr is None:
            raise ValueError("TeslaSR needs the raw LR map: forward(lr_up, image, lr)")
        B, G, H, W = lr_up.shape
        h, w = lr.shape[-2:]
        s = lr_scale((H, W), (h, w), self.scale)
        colour = hr_image(image, (H, W))
        if self.tissue_threshold is None:
            tissue = torch.ones(B, H, W, dtype=torch.bool, device=lr_up.device)
        else:
            tissue = colour.mean(1) <= self.tissue_threshold
        lr_colour, lr_tissue = self._lr_colour(colour, tissue, (h, w), s)
        usable = lr_tissue >= self.min_tissue_fraction if self.tissue_threshold is not None \
            else torch.ones_like(lr_tissue, dtype=torch.bool)
        R = math.ceil(self.radius)
        lr_p = F.pad(lr.float(), (R, R, R, R))
        colour_p = F.pad(lr_colour, (R, R, R, R))
        usable_p = F.pad(usable, (R, R, R, R), value=False)
        # HR pixel centres in LR pixel units (LR pixel i has its centre at i) and home LR pixel
        ys, xs = (torch.arange(n, device=lr_up.device) for n in (H, W))
        pos_y, pos_x = (ys + 0.5) / s - 0.5, (xs + 0.5) / s - 0.5
        home_y, home_x = ys // s, xs // s
        offsets = [(dy, dx) for dy in range(-R, R + 1) for dx in range(-R, R + 1)]
        logw, index = [], []
        for dy, dx in offsets:
            iy, ix = home_y + dy, home_x + dx
            d2 = (pos_y - iy)[:, None] ** 2 + (pos_x - ix)[None, :] ** 2           # (H, W)
            c = colour_p[:, :, iy + R][:, :, :, ix + R]                             # (B, 3, H, W)
            ok = usable_p[:, iy + R][:, :, ix + R] & (d2 <= self.radius ** 2)      # (B, H, W)
            lw = -d2 / (2 * self.sigma_spatial ** 2) \
                - ((colour - c) ** 2).sum(1) / (2 * self.sigma_colour ** 2)
            logw.append(lw.masked_fill(~ok, -math.inf))
            index.append((iy + R, ix + R))
        logw_t = torch.stack(logw)                                                  # (K, B, H, W)
        top = logw_t.amax(0)
        has = torch.isfinite(top)
        weights = torch.exp(logw_t - torch.where(has, top, torch.zeros_like(top)))
        total = weights.sum(0).clamp_min(1e-30)
        out = torch.zeros(B, G, H, W, dtype=torch.float32, device=lr_up.device)
        for k, (iy, ix) in enumerate(index):
            out += weights[k][:, None] * lr_p[:, :, iy][:, :, :, ix]
        out = out / total[:, None]
        fallback = ~(has & tissue)
        self.last_fallback_fraction = float(fallback.float().mean())
        if self.last_fallback_fraction:
            log.debug("TESLA: %.1f%% of HR pixels (background or no tissue LR pixel within "
                      "%g LR px) keep lr_up", 100 * self.last_fallback_fraction, self.radius)
        return torch.where(fallback[:, None], lr_up.float(), out).to(lr_up.dtype)


# ============================================================================ registry
SR_BASELINES: dict[str, type[nn.Module]] = {
    "bicubic": BicubicSR,
    "unet": UNetSR,
    "unetpp": UNetPlusPlusSR,
    "attention_unet": AttentionUNetSR,
    "histogene_sr": HistoGeneSR,
    "tesla": TeslaSR,
}


def build_sr_baseline(name: str, n_genes: int, /, **cfg: Any) -> nn.Module:
    """Build the SR baseline ``name`` for ``n_genes`` genes from keyword ``cfg`` (an ``n_genes``
    entry, as a stored config may repeat it, is checked and dropped)."""
    try:
        cls = SR_BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown SR baseline {name!r}; known: {sorted(SR_BASELINES)}") from None
    if "n_genes" in cfg:
        stored = int(cfg.pop("n_genes"))
        if stored != n_genes:
            raise ValueError(f"SR baseline {name!r}: config says {stored} genes, "
                             f"{n_genes} requested")
    try:
        return cls(n_genes, **cfg)
    except TypeError as exc:
        raise ValueError(f"bad configuration for SR baseline {name!r} {cfg}: {exc}") from exc


__all__ = ["AttentionGate", "AttentionUNetSR", "BicubicSR", "ConvBlock", "HistoGeneSR",
           "SR_BASELINES", "TeslaSR", "TransformerBlock", "UNetPlusPlusSR", "UNetSR",
           "build_sr_baseline", "hr_image", "lr_scale", "upsample_lr"]
