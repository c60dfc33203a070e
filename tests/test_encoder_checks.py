"""Never a random frozen encoder by accident: the start-up checks of histomap.plan.encoders,
through validate_config (what the workflow and `histomap validate` run), on the demo config."""
from __future__ import annotations

import copy

import pytest
import yaml

from histomap.plan import load_config, validate_config
from test_plan import DEMO, REPO, tiny_config

PIXNET = load_config([], defaults=DEMO)["pixnet"]


def pixnet(**keys) -> dict:
    return {**copy.deepcopy(PIXNET), **keys}


@pytest.mark.parametrize("overrides,message", [
    # a frozen timm network without weights (what her2st_full.yaml's resnet50 was)
    ({"pixnet": pixnet(encoder="resnet50")},
     r"pixnet keeps its encoder 'resnet50' frozen but gives it no weights.*pretrained: false"),
    # UNI2-h's architecture without its file
    ({"pixnet": pixnet(encoder="uni2-h")}, r"'uni2-h' frozen but gives it no weights"),
    # the contradictory pair: a fine-tuned encoder cannot be cached
    ({"pixnet": pixnet(encoder="resnet10t", freeze_encoder=False)},
     r"feature_cache: true but its encoder trains.*feature_cache: false"),
    # a random encoder asked for, but cached
    ({"pixnet": pixnet(encoder="resnet10t", pretrained=False)},
     r"random encoder \(pretrained: false\) with feature_cache: true"),
    # random on purpose, and weights named
    ({"pixnet": pixnet(pretrained=False, feature_cache=False)},
     r"pretrained: false but names weights"),
    ({"models": ["mean", "probe"], "probe": {"encoder": "resnet18", "input_mpp": 1.0}},
     r"probe keeps its encoder 'resnet18' frozen"),
    ({"models": ["mean", "stnet"],
      "stnet": {"backbone": "resnet18", "input_mpp": 1.0, "freeze_backbone": True}},
     r"stnet keeps its encoder 'resnet18' frozen.*`backbone: \{name"),
    ({"models": ["mean", "istar"], "istar": {"features": "encoder", "encoder": "resnet18",
                                             "input_mpp": 1.0, "window_px": 64}},
     r"istar keeps its encoder 'resnet18' frozen"),
    ({"pixnet": pixnet(encoder={"name": "uni2-h", "checkpoint": "/nowhere/pytorch_model.bin"})},
     r"pixnet.checkpoint /nowhere/pytorch_model.bin does not exist"),
    # the workflow caches a ViT's default taps: other taps cannot train from that cache
    ({"pixnet": pixnet(encoder="uni2-h", checkpoint=__file__,
                       encoder_cfg={"tap_blocks": [1, 2, 3, 4], "pyramid_channels": 64})},
     r"caches its ViT 'uni2-h' with encoder_cfg"),
])
def test_refused_at_start_up(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(tiny_config(tmp_path, **overrides), tmp_path)


def test_the_cli_refuses_with_the_same_message(tmp_path, capfd):
    from histomap.cli import main

    cfg = tmp_path / "frozen_random.yaml"
    cfg.write_text(yaml.safe_dump({"pixnet": pixnet(encoder="resnet50")}))
    assert main(["validate", str(cfg), "--directory", str(REPO)]) == 1
    assert "'resnet50' frozen but gives it no weights" in capfd.readouterr().err


@pytest.mark.parametrize("block", [
    pixnet(encoder="resnet10t", pretrained=False, feature_cache=False),  # the ablation
    pixnet(encoder="resnet10t", freeze_encoder=False, feature_cache=False),  # fine-tuned
])
def test_allowed_random_encoders(tmp_path, block):
    plan = validate_config(tiny_config(tmp_path, pixnet=block), tmp_path)
    assert "pretrained" not in plan.models.params("pixnet")  # not a PixNet argument


def test_encoder_mapping_names_the_cache_checkpoint(tmp_path):
    weights = tmp_path / "UNI2-h" / "pytorch_model.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"")  # existence is what start-up checks; encode_slide reads it
    config = tiny_config(tmp_path, models=["mean", "pixnet", "probe"],
                         pixnet=pixnet(encoder={"name": "uni2-h", "checkpoint": str(weights)}),
                         probe={"encoder": {"name": "uni2-h", "checkpoint": str(weights)},
                                "input_mpp": 1.0})
    plan = validate_config(config, tmp_path)
    block = plan.models.block("pixnet")
    assert (block["encoder"], block["checkpoint"]) == ("uni2-h", str(weights))
    assert config["features"]["checkpoints"] == {"uni2-h": str(weights)}
    fold = plan.folds.names[0]
    assert all(f.startswith("results/features/uni2-h/1/")
               for f in plan.files.feature_cache_files("pixnet", fold))


def test_one_cache_cannot_serve_two_weight_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"")
    b.write_bytes(b"")
    config = tiny_config(tmp_path, models=["mean", "pixnet", "probe"],
                         pixnet=pixnet(encoder="uni2-h", checkpoint=str(a)),
                         probe={"encoder": "uni2-h", "checkpoint": str(b), "input_mpp": 1.0})
    with pytest.raises(ValueError, match="feature cache of encoder 'uni2-h'"):
        validate_config(config, tmp_path)


def test_full_her2st_config_defaults_to_the_packaged_encoder():
    """config/her2st_full.yaml on config/her2st.yaml: every image encoder that stays frozen has
    weights (the packaged EfficientNet-Lite0 unless a foundation checkpoint is given)."""
    full = yaml.safe_load((REPO / "config" / "her2st_full.yaml").read_text())
    assert full["pixnet"]["encoder"] == "efficientnet_lite0_imagenet"
    assert full["stnet"]["backbone"] == "efficientnet_lite0_imagenet"
    text = (REPO / "config" / "her2st_full.yaml").read_text()
    assert "encoder: {name: uni2-h, checkpoint:" in text  # the commented UNI2-h block
    config = load_config([REPO / "config" / "her2st.yaml", REPO / "config" / "her2st_full.yaml"],
                         defaults=DEMO)
    if not (REPO.parent / "shared" / "data" / "her2st").is_dir():
        pytest.skip("HER2ST sections not found (the shared data folder)")
    plan = validate_config(config, REPO)
    assert "stnet_frozen" in plan.models.names
