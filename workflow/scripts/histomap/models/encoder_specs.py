"""Encoder names and how a model's config names its encoder (plain Python, no torch: the
workflow's start-up checks read it before torch is imported).

A model block names its encoder either by a string with a separate ``checkpoint`` key::

    pixnet: {encoder: uni2-h, checkpoint: /data/uni2-h/pytorch_model.bin}

or by a mapping::

    pixnet:
      encoder: {name: uni2-h, checkpoint: /data/uni2-h/pytorch_model.bin}

(``backbone`` instead of ``encoder`` for the ST-Net-style model). :func:`encoder_spec` reads
both into an :class:`EncoderSpec`; :func:`flatten_encoder` writes the mapping form back as the
string form every model class takes. ``pretrained: false`` (in the block or in the mapping) says
that a random encoder is meant (an ablation); a frozen encoder without weights is refused
otherwise (:mod:`histomap.plan.encoders`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# named encoders whose weights come from an installed package (histomap.models.encoders)
PRETRAINED_NAMES = ("efficientnet_lite0_imagenet", "efficientnet_lite0_imagenet_sympad")
# UNI2-h's architecture (timm vit_giant_patch14_224 with MahmoodLab's kwargs); "vit" is the
# older spelling of the same
UNI2H_NAMES = ("uni2-h", "uni2h", "vit")
# timm Vision Transformer families that the token-map encoder takes by name
VIT_PREFIXES = ("vit_", "deit_", "deit3_")
ENCODER_KEYS = ("encoder", "backbone")


def is_uni2h(name: str | None) -> bool:
    return name is not None and str(name).lower() in UNI2H_NAMES


def is_vit_name(name: str | None) -> bool:
    """Whether ``name`` is built as a ViT token-map encoder (UNI2-h's architecture or a timm
    Vision Transformer) rather than a timm ``features_only`` CNN."""
    return name is not None and (is_uni2h(name) or str(name).lower().startswith(VIT_PREFIXES))


def is_packaged(name: str | None) -> bool:
    """Whether ``name`` brings its weights from an installed package."""
    return name is not None and name in PRETRAINED_NAMES


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder as a config names it: architecture, local weights, and whether a random
    encoder was asked for (``pretrained`` False; None: not said)."""

    name: str | None
    checkpoint: str | None = None
    pretrained: bool | None = None

    @property
    def has_weights(self) -> bool:
        """Whether weights come from somewhere: a packaged encoder or a local file."""
        return self.checkpoint is not None or is_packaged(self.name)


def encoder_key(block: dict) -> str:
    """``backbone`` for a block that names its encoder so (ST-Net-style), else ``encoder``."""
    return "backbone" if "backbone" in block and "encoder" not in block else "encoder"


def encoder_spec(block: dict, where: str = "config") -> EncoderSpec:
    """The encoder of a model block, from either form (module docstring). ValueError when the
    mapping form and the block's own ``checkpoint`` / ``pretrained`` disagree."""
    key = encoder_key(block)
    value: Any = block.get(key)
    checkpoint, pretrained = block.get("checkpoint"), block.get("pretrained")
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"name", "checkpoint", "pretrained"})
        if unknown or "name" not in value:
            raise ValueError(f"{where}.{key}: a mapping takes `name` (required), `checkpoint` "
                             f"and `pretrained`; got {sorted(value)}")
        for sub, outer in (("checkpoint", checkpoint), ("pretrained", pretrained)):
            if sub in value and outer is not None and value[sub] != outer:
                raise ValueError(f"{where}: `{key}.{sub}` ({value[sub]!r}) and `{sub}` "
                                 f"({outer!r}) disagree; give it once")
        checkpoint = value.get("checkpoint", checkpoint)
        pretrained = value.get("pretrained", pretrained)
        value = value["name"]
    return EncoderSpec(None if value is None else str(value),
                       None if checkpoint is None else str(checkpoint),
                       None if pretrained is None else bool(pretrained))


def flatten_encoder(block: dict, where: str = "config") -> dict:
    """A copy of ``block`` with a mapping-form encoder written as ``encoder: name`` plus
    ``checkpoint`` and ``pretrained`` keys (what the models and tasks read)."""
    key = encoder_key(block)
    if not isinstance(block.get(key), dict):
        return dict(block)
    spec = encoder_spec(block, where)
    out = {**block, key: spec.name}
    if spec.checkpoint is not None:
        out["checkpoint"] = spec.checkpoint
    if spec.pretrained is not None:
        out["pretrained"] = spec.pretrained
    return out


# keys of a ViT encoder's `encoder_cfg` that shape only PixNet's trainable neck
VIT_NECK_KEYS = ("pyramid_channels", "grad_checkpointing")


def frozen_encoder_config(name: str | None, encoder_cfg: dict | None) -> dict:
    """The part of an encoder's configuration that decides its frozen features (what a feature
    cache records and is checked against): for a ViT its taps, token stride and architecture
    overrides; nothing for a CNN (a cache holds every level of the plain encoder)."""
    cfg = dict(encoder_cfg or {})
    if not is_vit_name(name):
        return {}
    taps = cfg.pop("tap_blocks", None)
    stride = int(cfg.pop("token_stride", 16))
    for key in VIT_NECK_KEYS:
        cfg.pop(key, None)
    return {"tap_blocks": None if taps is None else [int(t) for t in taps],
            "token_stride": stride, "vit_kwargs": cfg}


__all__ = ["ENCODER_KEYS", "VIT_NECK_KEYS", "frozen_encoder_config", "EncoderSpec", "PRETRAINED_NAMES", "UNI2H_NAMES", "VIT_PREFIXES",
           "encoder_key", "encoder_spec", "flatten_encoder", "is_packaged", "is_uni2h",
           "is_vit_name"]
