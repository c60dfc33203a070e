"""Feature cache (encode_slide): training a frozen-encoder dense model from cached features gives
the same first step as running the frozen encoder on the image windows."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import zarr

from histomap.compat import torch
from histomap.data.sample import annotate_spots
from histomap.data.slide import open_slide, read_region, write_pyramid
from histomap.errors import InputError
from histomap.models import build_model
from histomap.models.encoders import create_encoder, encoder_mean_std
from histomap.tasks.dense_windows import SlideSpots, WindowDataset, pixnet_batch_loss
from histomap.tasks.feature_cache import (
    CachedWindowDataset,
    FeaturePyramid,
    cached_dense_batch_loss,
    encode_slide,
)
from tolerances import reordering_atol, stored_rounding_atol, unit_roundoff

MPP = 1.0
SIDE = 128  # slide = one window = one cache tile, so both paths see the same pixels
ENCODER = "efficientnet_lite0_imagenet"
GENES = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    image = (rng.random((SIDE, SIDE, 3)) * 80 + 150).astype(np.uint8)
    image[30:70, 40:90] = (120, 40, 140)  # a nucleus-coloured blob
    slide = write_pyramid(image, root / "slide.tif", MPP)
    centres = np.array([[64.0, 64.0], [40.0, 45.0], [90.0, 80.0], [60.0, 100.0]])
    spots = ad.AnnData(np.ones((4, 2), np.float32))
    spots.obs_names = [f"s{i}" for i in range(4)]
    spots.obsm["spatial"] = centres
    annotate_spots(spots, sample="tiny", platform="synthetic", mpp=MPP, spot_diameter_um=30.0,
                   image=str(slide))
    st = root / "tiny.h5ad"
    spots.write_h5ad(st)
    cache = encode_slide(slide, st, root / "tiny.zarr", encoder=ENCODER, mpp=MPP,
                         tile_px=SIDE, margin_px=0, crop_um=32.0)
    targets = rng.random((4, GENES)).astype(np.float32)
    return {"slide": slide, "st": st, "cache": cache, "image": image,
            "spots": SlideSpots(slide, centres, 30.0, targets, "tiny")}


def test_cache_layout_and_geometry(tiny):
    root = zarr.open_group(str(tiny["cache"]), mode="r")
    assert root.attrs["strides"] == [2, 4, 8, 16, 32]
    assert root["level0"].shape == (16, SIDE // 2, SIDE // 2)
    assert root["level4"].dtype == np.float16
    assert root["spots"].shape == (4, 1280)
    # level 4 equals the encoder on the slide image (fp16)
    enc = create_encoder(ENCODER, features_only=True).eval()
    with open_slide(tiny["slide"]) as slide:  # the JPEG-compressed slide, as stored
        rgb = read_region(slide, 0, 0, SIDE, SIDE, SIDE, SIDE)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in encoder_mean_std(ENCODER))
    with torch.no_grad():
        ref = enc((x - mean) / std)[4][0].numpy()
    # float16 storage rounds each value by at most u = 2^-11 of it; the encoder run on the
    # cache tile vs this call differs by its reordering bound at the features' magnitude
    np.testing.assert_allclose(np.asarray(root["level4"][:], np.float32), ref,
                               rtol=unit_roundoff(torch.float16),
                               atol=reordering_atol(enc) * float(np.abs(ref).max()))
    pyr = FeaturePyramid(tiny["cache"])
    assert pyr.spot_features(["s2", "s0"]).shape == (2, 1280)
    with pytest.raises(InputError, match="no cached features"):
        pyr.spot_features(["nope"])
    with pytest.raises(InputError, match="feature cache holds"):
        pyr.check("resnet18", MPP)


@pytest.mark.parametrize("model_name,cfg", [
    ("pixnet", {"encoder": ENCODER, "freeze_encoder": True, "out_stride": 4,
                "decoder_channels": [8, 8, 8, 8, 8]}),
    ("istar", {"features": "encoder", "encoder": ENCODER, "out_stride": 4, "hidden": [8],
               "dropout": 0.0}),
])
def test_cached_and_uncached_first_step_agree(tiny, model_name, cfg):
    window = {"window_px": SIDE, "input_mpp": MPP, "out_stride": 4}
    plain = WindowDataset([tiny["spots"]], augment=False, **window)
    # PixNet at out_stride 4 reads only levels 1-4, here lazily from the store
    pyramid = (FeaturePyramid(tiny["cache"], levels=[1, 2, 3, 4], max_memory_bytes=0)
               if model_name == "pixnet" else FeaturePyramid(tiny["cache"]))
    assert pyramid.in_memory == (model_name != "pixnet")
    cached = CachedWindowDataset([tiny["spots"]], [pyramid], augment=False, **window)
    assert len(plain) == len(cached) == 4
    i = 0  # the anchor at the slide centre: its window is the whole slide
    assert plain.window_origin(i) == cached.window_origin(i) == (0, 0)
    item_p, item_c = plain[i], cached[i]
    assert "image" not in item_c and item_c["level4"].dtype == torch.float16
    assert ("level0" in item_c) == (model_name == "istar")
    for key in ("centres", "radii", "valid", "targets"):
        torch.testing.assert_close(item_p[key], item_c[key])
    batch_p = {k: v[None] for k, v in item_p.items()}
    batch_c = {k: v[None] for k, v in item_c.items()}

    def first_step(batch, loss_fn):
        """{"loss": the loss, parameter name: its gradient} of a fresh model's first step."""
        torch.manual_seed(0)
        model = build_model(model_name, GENES, **cfg).train()
        loss = loss_fn(model, batch, torch.device("cpu"), None)
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.requires_grad}}

    got_p = first_step(batch_p, pixnet_batch_loss)
    got_c = first_step(batch_c, cached_dense_batch_loss)
    assert got_p.keys() == got_c.keys() and len(got_p) > 1
    # float16 storage of the features plus the encoder's reordering: the first step's
    # measured response to a perturbation of that size (tests/tolerances.py)
    atol = stored_rounding_atol(lambda b: first_step(b, cached_dense_batch_loss), batch_c,
                                [k for k in batch_c if k.startswith("level")],
                                model=build_model(model_name, GENES, **cfg))
    for name in got_p:
        torch.testing.assert_close(got_c[name], got_p[name], rtol=0, atol=atol[name], msg=name)


def test_fine_tuned_encoder_is_not_cached(tiny):
    from histomap.tasks.feature_cache import frozen_encoder_name

    model = build_model("pixnet", GENES, encoder=ENCODER, freeze_encoder=False,
                        decoder_channels=[8, 8, 8, 8, 8])
    with pytest.raises(ValueError, match="frozen encoder"):
        frozen_encoder_name(model)


def test_stnet_head_from_cached_features_matches_the_crops(tiny):
    """A frozen-backbone ST-Net-style model: the first step on cached pooled crop features
    equals the first step on the crops themselves (fp16 tolerance)."""
    from torch.utils.data import DataLoader

    from histomap.data.spot_patches import SpotDataset, extract_spot_patches
    from histomap.tasks.feature_cache import cached_spot_batch_loss
    from histomap.train import spot_batch_loss

    pyr = FeaturePyramid(tiny["cache"])
    feats = torch.from_numpy(pyr.spot_features([f"s{i}" for i in range(4)]))
    targets = torch.from_numpy(tiny["spots"].targets)
    patches = extract_spot_patches(tiny["slide"], tiny["spots"].centres_px, crop_um=32.0,
                                   out_mpp=MPP)
    crops = next(iter(DataLoader(SpotDataset(patches, tiny["spots"].targets), batch_size=4)))
    def first_step(batch, loss_fn):
        torch.manual_seed(0)
        model = build_model("stnet", GENES, backbone=ENCODER, freeze_backbone=True,
                            dropout=0.0).train()
        loss = loss_fn(model, batch, torch.device("cpu"), torch.nn.functional.mse_loss)
        loss.backward()
        assert not any(p.requires_grad for p in model.backbone.parameters())
        return {"loss": loss.detach(), "head": model.head.weight.grad.clone()}

    got_p = first_step(crops, spot_batch_loss)

    def cached_step(inputs):
        return first_step((inputs["features"], inputs["targets"]), cached_spot_batch_loss)

    inputs = {"features": feats, "targets": targets}
    got_c = cached_step(inputs)
    # float16 pooled features (tests/tolerances.py::stored_rounding_atol)
    atol = stored_rounding_atol(cached_step, inputs, ["features"],
                                model=build_model("stnet", GENES, backbone=ENCODER))
    for name in got_p:
        torch.testing.assert_close(got_c[name], got_p[name], rtol=0, atol=atol[name], msg=name)
