"""Start-up checks of the image encoders the config names (arrow: config -> (encoder features)).

Never a random frozen encoder by accident: a model that keeps its encoder frozen (PixNet with
``freeze_encoder: true``, the iStar-style MLP on encoder features, the linear probe, an
ST-Net-style model with ``freeze_backbone: true``, Diff-ST's tissue encoder, the SR baselines'
image branch) needs weights: a named pretrained encoder (``efficientnet_lite0_imagenet``) or a
local ``checkpoint``. Without them the config is refused, unless the model's block spells out
``pretrained: false`` (an ablation that asks for a random encoder). Contradictory settings are
refused too: ``feature_cache: true`` with an encoder that trains (``freeze_encoder: false``)
or with a random one, and ``pretrained: false`` beside weights. A ``checkpoint`` must exist.

The feature cache (``encode_slide``) is keyed by encoder name; :func:`check_encoders` fills
``features.checkpoints`` with each cached encoder's file so that the rule encodes with the
weights the model uses, and refuses two different files for one name.

Plain Python (no torch): Snakemake runs it at start-up, ``histomap validate`` alike.
"""
from __future__ import annotations

from pathlib import Path

from histomap.models.encoder_specs import (EncoderSpec, encoder_key, encoder_spec,
                                           frozen_encoder_config, is_packaged)

HOW_TO_GIVE_WEIGHTS = (
    "name a pretrained encoder (efficientnet_lite0_imagenet, packaged), point `checkpoint:` "
    "(or `{key}: {{name: ..., checkpoint: ...}}`) at the local weights file (e.g. UNI2-h's "
    "pytorch_model.bin or model.safetensors), or write `pretrained: false` in `{where}` if a "
    "random frozen encoder is the ablation you mean")


def _frozen_and_cached(family: str, block: dict) -> tuple[bool, bool, str]:
    """(encoder frozen, trained from the feature cache, the key that freezes it)."""
    if family == "pixnet":
        return bool(block.get("freeze_encoder", False)), bool(block.get("feature_cache")), \
            "freeze_encoder"
    if family == "istar":
        uses = block.get("features", "filterbank") in ("encoder", "both")
        return uses, bool(block.get("feature_cache")), "features"
    if family == "probe":
        return True, True, "(the probe always freezes it)"
    if family == "stnet":
        return bool(block.get("freeze_backbone", False)), bool(block.get("feature_cache")), \
            "freeze_backbone"
    return False, False, ""


def check_encoder(where: str, spec: EncoderSpec, *, frozen: bool, cached: bool,
                  freeze_key: str, workdir: Path | None = None, key: str = "encoder") -> None:
    """The checks of the module docstring for one encoder; ValueError naming ``where``."""
    if cached and not frozen:
        raise ValueError(
            f"config: {where} has feature_cache: true but its encoder trains ({freeze_key} is "
            "not set): cached features need a frozen encoder. Set feature_cache: false to "
            f"fine-tune the encoder, or {freeze_key}: true to train from cached features")
    if spec.pretrained is False:
        if spec.checkpoint is not None or is_packaged(spec.name):
            raise ValueError(
                f"config: {where} says pretrained: false but names weights ("
                f"{spec.checkpoint or spec.name}); drop one (for a random "
                f"efficientnet_lite0_imagenet use its timm name tf_efficientnet_lite0)")
        if cached:
            raise ValueError(
                f"config: {where} asks for a random encoder (pretrained: false) with "
                "feature_cache: true: a random network differs in every model, so its "
                "features cannot be cached; set feature_cache: false")
    elif frozen and not spec.has_weights:
        raise ValueError(
            f"config: {where} keeps its encoder {spec.name!r} frozen but gives it no weights, "
            "so it would stay random: " + HOW_TO_GIVE_WEIGHTS.format(where=where, key=key))
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if not path.is_absolute() and workdir is not None:
            path = Path(workdir) / path
        if not path.is_file():
            raise ValueError(f"config: {where}.checkpoint {spec.checkpoint} does not exist "
                             "(a local weights file: nothing is downloaded)")


def check_encoders(config: dict, models, sr=None, workdir: Path | None = None) -> None:
    """Every configured model's encoder (``models``: the plan's
    :class:`~histomap.plan.models.ModelSet`; ``sr``: its
    :class:`~histomap.plan.superres.SuperRes`), then ``features.checkpoints`` (module
    docstring)."""
    cache_files: dict[str, set] = {}
    for model in models.names:
        family = models.family(model)
        block = models.block(model)
        if encoder_key(block) not in block and family != "probe":
            continue  # no encoder (HisToGene-style, the mean, an istar filter bank)
        frozen, cached, freeze_key = _frozen_and_cached(family, block)
        spec = encoder_spec(block, model)
        check_encoder(model, spec, frozen=frozen, cached=cached, freeze_key=freeze_key,
                      workdir=workdir, key=encoder_key(block))
        if cached:
            cache_files.setdefault(spec.name, set()).add(spec.checkpoint)
            frozen_cfg = frozen_encoder_config(spec.name, block.get("encoder_cfg"))
            if frozen_cfg and frozen_cfg != frozen_encoder_config(spec.name, {}):
                raise ValueError(
                    f"config: {model} caches its ViT {spec.name!r} with encoder_cfg "
                    f"{block.get('encoder_cfg')}: encode_slide caches the default taps, token "
                    "stride and architecture; drop tap_blocks / token_stride / architecture "
                    "keys (pyramid_channels may stay) or set feature_cache: false")
    if sr is not None:
        _check_sr_encoders(sr, workdir)
    features = config.setdefault("features", {})
    given = dict(features.get("checkpoints") or {})
    for name, files in cache_files.items():
        if name in given:
            files = files | {given[name]}
        if len(files) > 1:  # None (no file: packaged weights) against a file conflicts too
            raise ValueError(
                f"config: the feature cache of encoder {name!r} (results/features/{name}/) would "
                f"serve different weights {sorted(map(str, files))} (None: no file): give "
                f"every model with this encoder the same `checkpoint` (and "
                f"features.checkpoints.{name})")
        (file,) = files
        if file is not None:
            given[name] = file
    if given:
        features["checkpoints"] = given


def _check_sr_encoders(sr, workdir: Path | None) -> None:
    """Diff-ST's tissue encoder (frozen unless freeze_tissue_backbone: false) and the SR
    baselines' image branch (always frozen) of every configured SR method."""
    if not sr.settings.get("enabled", False) and not sr.settings.get("methods"):
        return
    for name in sr.all_method_names():
        _, settings = sr.method(name)
        where = f"superres.models.{name}"
        for key, frozen in (("tissue_backbone", settings.get("freeze_tissue_backbone", True)),
                            ("image_encoder", True)):
            if not settings.get(key):
                continue
            spec = EncoderSpec(str(settings[key]), settings.get("pretrained_checkpoint"),
                               settings.get("pretrained"))
            check_encoder(f"{where}.{key}", spec, frozen=bool(frozen), cached=False,
                          freeze_key="freeze_tissue_backbone", workdir=workdir, key=key)


__all__ = ["HOW_TO_GIVE_WEIGHTS", "check_encoder", "check_encoders"]
