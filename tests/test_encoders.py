"""Encoder registry: the packaged EfficientNet-Lite0 weights mapped onto timm, and user
checkpoints in the format foundation models ship in (a timm ``pytorch_model.bin`` state dict)."""
from __future__ import annotations

import pytest

from histomap.compat import timm, torch
from histomap.errors import InputError
from histomap.models.encoders import (
    PRETRAINED,
    WeightMappingError,
    create_encoder,
    efficientnet_lite0_weights_path,
    load_mapped_state,
    map_efficientnet_lite0,
)

NAME = "efficientnet_lite0_imagenet"


@pytest.fixture(scope="module")
def packaged_state():
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


def _depths(model):
    return [len(stage) for stage in model.blocks]


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_every_packaged_tensor_is_mapped_with_its_shape(packaged_state, name):
    model = timm.create_model(PRETRAINED[name].timm_name, pretrained=False)
    mapped = map_efficientnet_lite0(packaged_state, _depths(model))
    own = model.state_dict()
    assert len(packaged_state) == 296 and len(mapped) == 296
    assert set(mapped) == set(own)  # one to one: no packaged tensor dropped, none missing
    for key, value in own.items():
        assert mapped[key].shape == value.shape, key
    # the mapping is not a reordering by shape: spot checks against the source names
    assert mapped["blocks.0.0.conv_pw.weight"] is packaged_state["_blocks.0._project_conv.weight"]
    assert mapped["blocks.1.0.conv_pw.weight"] is packaged_state["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.5.3.bn3.running_var"] is packaged_state["_blocks.14._bn2.running_var"]
    assert mapped["classifier.weight"] is packaged_state["_fc.weight"]


def test_created_encoders_hold_the_packaged_weights(packaged_state):
    full = create_encoder(NAME)
    torch.testing.assert_close(full.conv_head.weight, packaged_state["_conv_head.weight"])
    torch.testing.assert_close(full.blocks[6][0].conv_pwl.weight,
                               packaged_state["_blocks.15._project_conv.weight"])
    pyramid = create_encoder(NAME, features_only=True)
    assert pyramid.feature_info.channels() == [16, 24, 40, 112, 320]
    torch.testing.assert_close(pyramid.conv_stem.weight, packaged_state["_conv_stem.weight"])
    pooled = create_encoder(NAME, num_classes=0)
    assert pooled.num_features == 1280
    control = create_encoder(NAME, random_init=True)
    assert not torch.equal(control.conv_stem.weight, full.conv_stem.weight)


def test_mis_shaped_tensor_is_rejected(packaged_state):
    broken = dict(packaged_state)
    broken["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # 5x5 in lite0
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_efficientnet_lite0(broken, _depths(model))
    with pytest.raises(WeightMappingError, match=r"blocks\.2\.0\.conv_dw\.weight"):
        load_mapped_state(model, mapped, "broken weights")


def test_unmapped_tensor_is_rejected(packaged_state):
    extra = dict(packaged_state)
    extra["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)  # lite0 has no SE
    with pytest.raises(WeightMappingError, match="_se_reduce"):
        map_efficientnet_lite0(extra, [1, 2, 2, 3, 3, 4, 1])
    extra = dict(packaged_state)
    extra["_blocks.16._bn0.weight"] = torch.zeros(4)  # one block too many
    with pytest.raises(WeightMappingError, match="_blocks.16"):
        map_efficientnet_lite0(extra, [1, 2, 2, 3, 3, 4, 1])


def test_missing_tensor_is_rejected(packaged_state):
    short = {k: v for k, v in packaged_state.items() if k != "_bn0.running_mean"}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(WeightMappingError, match="bn1.running_mean"):
        load_mapped_state(model, map_efficientnet_lite0(short, _depths(model)), "short")


def test_user_checkpoint_in_timm_format_loads(tmp_path):
    """A randomly initialised timm model saved as ``pytorch_model.bin`` (the way UNI2-h and
    other foundation models are distributed) fills the encoder exactly; the packaged weights
    are not used when a checkpoint is given."""
    torch.manual_seed(3)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    path = tmp_path / "uni_like" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    for kwargs in ({"num_classes": 0}, {"features_only": True}):
        model = create_encoder("resnet10t", checkpoint=path, **kwargs)
        own = model.state_dict()
        for key, value in source.state_dict().items():
            if key in own:
                torch.testing.assert_close(own[key], value)
    wrong = tmp_path / "wrong.bin"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), wrong)
    with pytest.raises(InputError, match="wrong.bin"):
        create_encoder("resnet10t", checkpoint=wrong, num_classes=0)


def test_models_take_the_named_encoder(packaged_state):
    from histomap.models import build_model

    stem = packaged_state["_conv_stem.weight"]
    stnet = build_model("stnet", 3, backbone=NAME)
    torch.testing.assert_close(stnet.backbone.conv_stem.weight, stem)
    pixnet = build_model("pixnet", 3, encoder=NAME, decoder_channels=[8, 8, 8, 8, 8])
    torch.testing.assert_close(pixnet.encoder.backbone.conv_stem.weight, stem)
    out = pixnet(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3, 16, 16)
    istar = build_model("istar", 3, features="encoder", encoder=NAME, hidden=[8])
    torch.testing.assert_close(istar.features.encoder.backbone.conv_stem.weight, stem)


def test_crop_models_see_the_encoders_colour_statistics():
    """Crops arrive in ImageNet units (SpotDataset); the EfficientNet-Lite weights expect
    TF-Lite's 0.5 / 0.5, so STNet and the probe convert before the backbone."""
    from histomap.imagenorm import IMAGENET_MEAN, IMAGENET_STD
    from histomap.models.encoders import Restandardise, encoder_mean_std

    rgb = torch.rand(2, 3, 8, 8)
    imagenet = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(Restandardise(NAME)(imagenet), (rgb - 0.5) / 0.5)
    assert encoder_mean_std(NAME) == ((0.5,) * 3, (0.5,) * 3)
    assert Restandardise("resnet18")(imagenet) is imagenet


def test_diffst_tissue_encoder_takes_the_named_encoder(packaged_state):
    from histomap.models.diffst_hierarchy import TimmTissueEncoder

    enc = TimmTissueEncoder(NAME, 8, stage=2)
    torch.testing.assert_close(enc.backbone.conv_stem.weight, packaged_state["_conv_stem.weight"])
    torch.testing.assert_close(enc.mean.flatten(), torch.full((3,), 0.5))
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 8, 8, 8)


def test_sr_baseline_image_branch_takes_the_named_encoder(packaged_state):
    from histomap.models.srnets import build_sr_baseline

    model = build_sr_baseline("unet", 4, base_channels=4, depth=2, image_encoder=NAME,
                              image_channels=3).train()
    branch = model.image_branch.backbone
    torch.testing.assert_close(branch.conv_stem.weight, packaged_state["_conv_stem.weight"])
    assert not branch.training and not any(p.requires_grad for p in branch.parameters())
    out = model(torch.rand(2, 4, 16, 16), torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 4, 16, 16)
    out.sum().backward()
    assert model.image_branch.proj.weight.grad is not None
    rebuilt = build_sr_baseline("unet", 4, **model.config)
    assert rebuilt.in_channels == model.in_channels == 4 + 3 + 3
