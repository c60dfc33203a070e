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

This module assembles the model (:class:`DiffSTConfig`, :class:`DiffST`, the guided-diffusion
baseline :class:`ConditionalUNet`, the :class:`CurriculumSchedule`); the blocks live beside it:
:mod:`histomap.models.unet` (the U-Net), :mod:`histomap.models.diffst_hierarchy` (tissue and cell
encoders, sub-patch entropy, cell-to-tissue attention), :mod:`histomap.models.diffst_cam` (CAM and
disentangling) and :mod:`histomap.models.diffst_graph` (the CIGC gene graph).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

# the blocks, importable from here too (``__all__``): Diff-ST is assembled from them
from histomap.models.diffst_cam import CrossModalModulation, Disentangler, local_cross_gram
from histomap.models.diffst_graph import (GeneGraph, coexpression_adjacency, normalize_adjacency,
                                          topk_adjacency)
from histomap.models.diffst_hierarchy import (CellEncoder, CellToTissueAttention, ConvEncoder,
                                              TimmTissueEncoder, encode_without_border,
                                              select_subpatches,
                                              split_subpatches, subpatch_entropy)
from histomap.models.unet import (ResBlock, SelfAttention2d, UNet, as_float_image, conv3x3, resize,
                                  timestep_embedding)


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
    # patch borders: "replicate" pads every 3x3 convolution with the border pixel and encodes
    # the H&E mirrored outward (histomap.models.diffst_hierarchy.encode_without_border);
    # "zeros" (the former default) pads with zeros, a dark frame around every patch that the model
    # drew as a band along the patch's left and bottom edges
    padding_mode: Literal["zeros", "replicate"] = "replicate"
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
            "padding_mode must be 'zeros' or 'replicate'":
                self.padding_mode in ("zeros", "replicate"),
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
        pm = cfg.padding_mode
        self.lr_encoder = nn.Sequential(conv3x3(y_ch, cf, padding_mode=pm),
                                        ResBlock(cf, cf, padding_mode=pm))
        if cfg.tissue_backbone:
            self.tissue_encoder: nn.Module = TimmTissueEncoder(
                cfg.tissue_backbone, cfg.tissue_channels, cfg.backbone_stage,
                cfg.pretrained_checkpoint, frozen=cfg.freeze_tissue_backbone)
        else:
            self.tissue_encoder = ConvEncoder(cfg.tissue_channels, padding_mode=pm)
        if cfg.hierarchical:
            self.cell_encoder = CellEncoder(cfg.cell_channels, padding_mode=pm)
            self.cell_attention = CellToTissueAttention(cfg.tissue_channels, cfg.cell_channels,
                                                        cfg.attn_channels, cfg.cross_attn_heads)
        self.hist_proj = nn.Conv2d(cfg.tissue_channels, cf, 1)
        # without CAM the modulation is the identity; the disentangling network stays
        self.cam = CrossModalModulation(cf, cfg.cam_region, cfg.cam_mode) if cfg.cam else None
        self.disentangle = Disentangler(cf, cf, cfg.dis_normalize)
        self.unet = UNet(unet_in, n_genes, cfg.base_channels, cfg.channel_mult,
                         cfg.num_res_blocks, cfg.dropout, cond_ch=cf,
                         bottleneck_attention=cfg.bottleneck_attention, attn_heads=cfg.attn_heads,
                         padding_mode=pm)
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
        image = as_float_image(image)
        tissue_in = image if cfg.tissue_px is None else resize(image, (cfg.tissue_px,) * 2)
        tissue = (encode_without_border(self.tissue_encoder, tissue_in)
                  if cfg.padding_mode == "replicate" else self.tissue_encoder(tissue_in))
        tissue = resize(tissue, grid_hw)
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
        lr = resize(lr_map.float(), grid, cfg.lr_upsample_mode)
        if cfg.cigc_on == "lr":
            lr = self.graph(lr).flatten(1, 2)
        f_y = self.lr_encoder(lr)
        hist, mask = self.histology_features(image, grid, cell_entropy)
        f_h = self.hist_proj(hist)
        self.last_cell_mask = mask
        if self.cam is not None:
            f_y, f_h = self.cam(f_y, f_h)
        fused, dis = self.disentangle(f_y, f_h)
        direct = ([resize(lr_map.float(), hr, cfg.lr_upsample_mode)] if cfg.lr_input else []) \
            + ([resize(as_float_image(image), hr)] if cfg.rgb_input else [])
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
                         bottleneck_attention=cfg.bottleneck_attention, attn_heads=cfg.attn_heads,
                         padding_mode=cfg.padding_mode)

    @property
    def config(self) -> dict[str, Any]:
        """Keyword configuration: ``ConditionalUNet(n_genes, **config)`` rebuilds this model."""
        return self.cfg.to_dict()

    def forward(self, x_t: Tensor, t: Tensor, lr_map: Tensor, image: Tensor,
                cell_entropy: Tensor | None = None) -> Tensor:
        """``cell_entropy`` is accepted so Diff-ST batches can be reused, and is not used."""
        hw = x_t.shape[-2:]
        lr = resize(lr_map.to(x_t.dtype), hw, self.cfg.lr_upsample_mode)
        img = resize(as_float_image(image).to(x_t.dtype), hw)
        return self.unet(torch.cat([x_t, lr, img], dim=1), t)


__all__ = ["CellEncoder", "CellToTissueAttention", "Condition", "ConditionalUNet",
           "ConvEncoder", "CrossModalModulation", "CurriculumSchedule", "DiffST", "DiffSTConfig",
           "Disentangler", "GeneGraph", "ResBlock", "SelfAttention2d", "TimmTissueEncoder",
           "UNet", "coexpression_adjacency", "local_cross_gram", "normalize_adjacency",
           "topk_adjacency",
           "select_subpatches", "split_subpatches", "subpatch_entropy", "timestep_embedding"]
