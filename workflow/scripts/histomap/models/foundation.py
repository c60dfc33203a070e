"""Vision-Transformer foundation encoders (UNI2-h and any timm ViT) as dense and pooled
encoders, weights from a local file: part of the "(encoder features)" arrow of DESIGN.md.

* :func:`build_vit`: UNI2-h's architecture is timm's ``vit_giant_patch14_224`` with the kwargs
  of MahmoodLab's model card (:data:`UNI2H_VIT_KWARGS`: patch 14, width 1536, depth 24, 24 heads,
  SwiGLU-packed MLP, LayerScale 1e-5, 8 register tokens, no class-token position embedding; 681 M
  parameters), built with ``pretrained=False``; any other timm ViT name (``vit_*``, ``deit*``) is
  built by timm with ``num_classes=0``. ``vit_kwargs`` override either (e.g. a smaller width for
  a test). Every ViT is built with ``dynamic_img_size`` so any token grid works.
* :class:`ViTTokens`: the token maps of ``tap_blocks`` (raw block outputs, prefix tokens
  dropped), (B, D, H / token_stride, W / token_stride) each. The image is resized so that one
  token covers ``token_stride`` input pixels (16 by default: x14/16 for a patch-14 ViT), so the
  maps sit on an integer grid of the input. These maps are what a frozen ViT contributes to
  PixNet (whose trainable neck turns tap i into pyramid level i, strides 4/8/16/32, as the
  PixNet paper builds its pyramid from UNI2 blocks), to the iStar-style MLP (resampled and
  concatenated) and to the feature cache (``encode_slide`` stores them, one level per tap).
* :class:`ViTPooled`: the ViT's pooled embedding (timm's ``global_pool``: the class token for
  UNI2-h) of a crop resized the same way: the linear probe's and ST-Net-style model's features.

Both standardise nothing themselves: inputs are standardised RGB (ImageNet's statistics, also
UNI2-h's).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn

from histomap.compat import timm, torch
from histomap.models.encoder_specs import is_uni2h

UNI2H_TIMM_NAME = "vit_giant_patch14_224"
# MahmoodLab/UNI2-h's timm kwargs (model card); the layer classes by name, resolved in build_vit
UNI2H_VIT_KWARGS: dict[str, Any] = {
    "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
    "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
    "mlp_layer": "swiglu_packed", "act_layer": "silu", "reg_tokens": 8,
    "dynamic_img_size": True,
}
DEFAULT_TOKEN_STRIDE = 16
# keys of a ViT encoder's config that change its frozen features (the rest configures the
# trainable PixNet neck): what a feature cache records and checks
FROZEN_VIT_KEYS = ("tap_blocks", "token_stride", "vit_kwargs")


def _layer(value: Any, table: dict[str, Any], key: str) -> Any:
    if isinstance(value, str):
        if value.lower() not in table:
            raise ValueError(f"unknown ViT {key} {value!r}; choose from {sorted(table)}")
        return table[value.lower()]
    return value


def vit_arguments(name: str, vit_kwargs: dict[str, Any] | None = None) -> tuple[str, dict]:
    """(timm name, kwargs) of the ViT encoder ``name`` with ``vit_kwargs`` overrides."""
    from timm.layers import Mlp, SwiGLU, SwiGLUPacked

    if is_uni2h(name):
        timm_name, kwargs = UNI2H_TIMM_NAME, {**UNI2H_VIT_KWARGS, **(vit_kwargs or {})}
    else:
        timm_name, kwargs = name, {"num_classes": 0, "dynamic_img_size": True,
                                   **(vit_kwargs or {})}
    if "mlp_layer" in kwargs:
        kwargs["mlp_layer"] = _layer(kwargs["mlp_layer"], {
            "swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU, "mlp": Mlp}, "mlp_layer")
    if "act_layer" in kwargs:
        kwargs["act_layer"] = _layer(kwargs["act_layer"], {
            "silu": nn.SiLU, "gelu": nn.GELU}, "act_layer")
    return timm_name, kwargs


def build_vit(name: str, vit_kwargs: dict[str, Any] | None = None,
              checkpoint: str | Path | None = None) -> nn.Module:
    """A timm VisionTransformer for ``name`` (module docstring), random or filled strictly
    from the local ``checkpoint`` (:func:`histomap.models.checkpoint_io.load_checkpoint`)."""
    timm_name, kwargs = vit_arguments(name, vit_kwargs)
    vit = timm.create_model(timm_name, pretrained=False, **kwargs)
    if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "patch_embed"):
        raise ValueError(f"{name!r} is not a Vision Transformer with token outputs")
    if checkpoint is not None:
        from histomap.models.checkpoint_io import load_checkpoint

        load_checkpoint(vit, checkpoint, architecture_keys=head_keys(timm_name, kwargs),
                        what=f"{name} encoder")
    return vit


def head_keys(timm_name: str, kwargs: dict[str, Any]) -> list[str]:
    """Tensor names of the architecture with its default classifier head (built on the meta
    device: no memory), so that a file's head is accepted and left out."""
    full = {k: v for k, v in kwargs.items() if k not in ("num_classes", "features_only",
                                                          "out_indices")}
    with torch.device("meta"):
        return list(timm.create_model(timm_name, pretrained=False, **full).state_dict())


def default_taps(depth: int, n: int = 4) -> list[int]:
    """``n`` blocks spread evenly, the last one the final block (24 blocks: 5, 11, 17, 23)."""
    return [max(depth * (i + 1) // n - 1, 0) for i in range(n)]


def token_grid(h: int, w: int, token_stride: int) -> tuple[int, int]:
    return max(round(h / token_stride), 1), max(round(w / token_stride), 1)


def resize_to_tokens(images: torch.Tensor, patch_size: int, token_stride: int) -> torch.Tensor:
    """Resize (B, 3, H, W) so that one ``patch_size`` patch covers ``token_stride`` pixels."""
    h, w = images.shape[-2:]
    grid = token_grid(h, w, token_stride)
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                         antialias=size[0] < h)


class ViTTokens(nn.Module):
    """Token maps of tapped ViT blocks: (B, 3, H, W) standardised RGB -> list of
    (B, D, H / token_stride, W / token_stride), earliest tap first (module docstring).

    ``strides`` (all ``token_stride``) and ``channels`` (all D) describe the maps.
    """

    def __init__(self, name: str = "uni2-h", *, tap_blocks: Sequence[int] | None = None,
                 token_stride: int = DEFAULT_TOKEN_STRIDE,
                 vit_kwargs: dict[str, Any] | None = None,
                 checkpoint: str | Path | None = None, grad_checkpointing: bool = False):
        super().__init__()
        self.vit = build_vit(name, vit_kwargs, checkpoint)
        depth, dim = len(self.vit.blocks), int(self.vit.embed_dim)
        taps = default_taps(depth) if tap_blocks is None else [int(i) for i in tap_blocks]
        if not taps or any(not 0 <= i < depth for i in taps):
            raise ValueError(f"tap_blocks must be block indices in [0, {depth}), got {taps}")
        if token_stride < 1:
            raise ValueError(f"token_stride must be >= 1, got {token_stride}")
        self.tap_blocks = taps
        self.token_stride = int(token_stride)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim = dim
        self.strides = [float(self.token_stride)] * len(taps)
        self.channels = [dim] * len(taps)
        if grad_checkpointing:
            self.vit.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = resize_to_tokens(images, self.patch_size, self.token_stride)
        return list(self.vit.forward_intermediates(x, indices=self.tap_blocks, norm=False,
                                                   stop_early=True, output_fmt="NCHW",
                                                   intermediates_only=True))


class ViTPooled(nn.Module):
    """A ViT's pooled embedding of a crop: (B, 3, s, s) standardised RGB -> (B, D); the crop
    is resized so that one token covers ``token_stride`` pixels, as for :class:`ViTTokens`."""

    def __init__(self, name: str = "uni2-h", *, token_stride: int = DEFAULT_TOKEN_STRIDE,
                 vit_kwargs: dict[str, Any] | None = None,
                 checkpoint: str | Path | None = None, **_ignored: Any):
        super().__init__()
        self.vit = build_vit(name, vit_kwargs, checkpoint)
        self.token_stride = int(token_stride)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.num_features = int(self.vit.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(resize_to_tokens(images, self.patch_size, self.token_stride))


def vit_parameter_count(name: str, vit_kwargs: dict[str, Any] | None = None) -> int:
    """Parameters of the ViT ``name`` (meta device: no memory), e.g. 681 M for UNI2-h."""
    timm_name, kwargs = vit_arguments(name, vit_kwargs)
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    return int(sum(math.prod(p.shape) for p in model.parameters()))


__all__ = ["DEFAULT_TOKEN_STRIDE", "FROZEN_VIT_KEYS", "UNI2H_TIMM_NAME", "UNI2H_VIT_KWARGS",
           "ViTPooled", "ViTTokens", "build_vit", "default_taps", "head_keys",
           "resize_to_tokens", "vit_arguments", "vit_parameter_count"]
