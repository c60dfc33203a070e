"""Foundation encoders from a local file, through the feature cache.

Every checkpoint here is written by the test from a small random-weight timm model (no
download): each on-disk format loads into the same features as the source model; a missing,
mis-shaped or unmapped tensor is an InputError naming the file and the tensor; and a
UNI2-h-shaped checkpoint (UNI2-h's architecture family and key names, tiny width and depth)
trains PixNet from cached features (encode_slide -> cache -> a few optimiser steps).
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import zarr

from histomap.compat import timm, torch
from histomap.data.sample import annotate_spots
from histomap.data.slide import write_pyramid
from histomap.errors import InputError
from histomap.models import build_model
from histomap.models.encoders import create_encoder
from histomap.models.foundation import UNI2H_TIMM_NAME, vit_arguments
from tolerances import reordering_atol, stored_rounding_atol

# UNI2-h's family (patch 14, SwiGLU-packed MLP, LayerScale, 8 register tokens, no class-token
# position embedding) at a width and depth that run in a second
TINY_UNI2H = {"embed_dim": 48, "depth": 4, "num_heads": 4}
VIT = "vit_tiny_patch16_224"
VIT_KW = {"depth": 2}
CONVNEXT = "convnext_atto"
CONVNEXT_KW = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}


def _save(state: dict, path, fmt: str):
    """Write ``state`` as a user would have it on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "bin":
        torch.save(state, path)
    elif fmt == "bin_model_prefix":
        torch.save({f"model.{k}": v for k, v in state.items()}, path)
    elif fmt == "bin_module_wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
                   path)
    return path


FORMATS = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin",
           "bin_model_prefix": "pytorch_model.bin", "bin_module_wrapped": "checkpoint.pth"}


@pytest.fixture(scope="module")
def sources():
    torch.manual_seed(0)
    vit = timm.create_model(VIT, pretrained=False, num_classes=7, dynamic_img_size=True,
                            **VIT_KW).eval()  # with a classifier head: the file carries it
    convnext = timm.create_model(CONVNEXT, pretrained=False, num_classes=5,
                                 **CONVNEXT_KW).eval()
    return {"vit": vit, "convnext": convnext}


def _image(side: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_vit_checkpoint_formats_give_the_source_features(tmp_path, sources, fmt):
    src = sources["vit"]
    path = _save(src.state_dict(), tmp_path / fmt / FORMATS[fmt], fmt)
    x = _image(64)  # 4 x 4 tokens of 16 px: no resizing (token_stride = patch size)
    pooled = create_encoder(VIT, checkpoint=path, num_classes=0,
                            vit_kwargs=VIT_KW).eval()
    maps = create_encoder(VIT, checkpoint=path, features_only=True, tap_blocks=[0, 1],
                          vit_kwargs=VIT_KW).eval()
    with torch.no_grad():
        ref_pooled = src.forward_head(src.forward_features(x), pre_logits=True)
        ref_maps = src.forward_intermediates(x, indices=[0, 1], norm=False,
                                             output_fmt="NCHW", intermediates_only=True)
        got_pooled, got_maps = pooled(x), maps(x)
    atol = reordering_atol(src)
    torch.testing.assert_close(got_pooled, ref_pooled, rtol=0, atol=atol)
    assert [m.shape for m in got_maps] == [(1, 192, 4, 4)] * 2
    for got, ref in zip(got_maps, ref_maps):
        torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    assert maps.strides == [16.0, 16.0] and maps.channels == [192, 192]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_convnext_checkpoint_formats_give_the_source_features(tmp_path, sources, fmt):
    src = sources["convnext"]
    path = _save(src.state_dict(), tmp_path / fmt / FORMATS[fmt], fmt)
    x = _image(64)
    pooled = create_encoder(CONVNEXT, checkpoint=path, num_classes=0, **CONVNEXT_KW).eval()
    pyramid = create_encoder(CONVNEXT, checkpoint=path, features_only=True,
                             **CONVNEXT_KW).eval()
    with torch.no_grad():
        ref_pooled = src.forward_head(src.forward_features(x), pre_logits=True)
        ref_maps = src.forward_intermediates(x, intermediates_only=True)
        got_pooled, got_maps = pooled(x), pyramid(x)
    atol = reordering_atol(src)
    torch.testing.assert_close(got_pooled, ref_pooled, rtol=0, atol=atol)
    assert len(got_maps) == len(ref_maps) == 4
    for got, ref in zip(got_maps, ref_maps):
        torch.testing.assert_close(got, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("break_it,match", [
    (lambda s: s.pop("blocks.1.attn.qkv.weight"), "missing.*blocks.1.attn.qkv.weight"),
    (lambda s: s.__setitem__("blocks.0.mlp.fc2.weight", torch.zeros(3, 3)),
     "shape.*blocks.0.mlp.fc2.weight"),
    (lambda s: s.__setitem__("blocks.7.extra.weight", torch.zeros(3)),
     "no place.*blocks.7.extra.weight"),
])
def test_a_bad_tensor_is_named_with_the_file(tmp_path, sources, break_it, match):
    state = dict(sources["vit"].state_dict())
    break_it(state)
    path = _save(state, tmp_path / "bad" / "model.safetensors", "safetensors")
    with pytest.raises(InputError, match=match) as err:
        create_encoder(VIT, checkpoint=path, num_classes=0, vit_kwargs=VIT_KW)
    assert "model.safetensors" in str(err.value)


def test_unreadable_and_missing_files_are_input_errors(tmp_path):
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="pytorch_model.bin"):
        create_encoder(CONVNEXT, checkpoint=junk, num_classes=0, **CONVNEXT_KW)
    with pytest.raises(InputError, match="does not exist"):
        create_encoder(CONVNEXT, checkpoint=tmp_path / "nope.safetensors", num_classes=0)


def test_uni2h_architecture_is_timms_giant_vit_with_the_model_card_kwargs():
    from histomap.models.foundation import vit_parameter_count

    name, kwargs = vit_arguments("uni2-h")
    assert name == UNI2H_TIMM_NAME
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["reg_tokens"],
            kwargs["patch_size"]) == (1536, 24, 24, 8, 14)
    assert vit_parameter_count("uni2-h") == 681_394_176  # built on the meta device


# --------------------------------------------------------------------------- the done criterion
MPP = 1.0
SIDE = 128  # slide = one training window = one cache tile: cached and uncached see one image
GENES = 3


@pytest.fixture(scope="module")
def uni2h_slide(tmp_path_factory):
    """A slide, its spots and a UNI2-h-shaped checkpoint in timm / HF-hub names."""
    root = tmp_path_factory.mktemp("uni2h")
    rng = np.random.default_rng(0)
    image = (rng.random((SIDE, SIDE, 3)) * 80 + 150).astype(np.uint8)
    image[30:70, 40:90] = (120, 40, 140)
    slide = write_pyramid(image, root / "slide.tif", MPP)
    centres = np.array([[64.0, 64.0], [40.0, 45.0], [90.0, 80.0], [60.0, 100.0],
                        [30.0, 95.0], [95.0, 30.0]])
    spots = ad.AnnData(rng.random((len(centres), GENES)).astype(np.float32))
    spots.obs_names = [f"s{i}" for i in range(len(centres))]
    spots.var_names = [f"g{i}" for i in range(GENES)]
    spots.obsm["spatial"] = centres
    annotate_spots(spots, sample="tiny", platform="synthetic", mpp=MPP, spot_diameter_um=30.0,
                   image=str(slide))
    st = root / "tiny.h5ad"
    spots.write_h5ad(st)
    torch.manual_seed(5)
    name, kwargs = vit_arguments("uni2-h", TINY_UNI2H)
    source = timm.create_model(name, pretrained=False, **kwargs)
    checkpoint = root / "UNI2-h" / "pytorch_model.bin"
    checkpoint.parent.mkdir()
    torch.save(source.state_dict(), checkpoint)
    return {"slide": slide, "st": st, "checkpoint": checkpoint, "source": source, "root": root}


def test_uni2h_shaped_checkpoint_trains_pixnet_from_cached_features(uni2h_slide):
    from histomap.tasks.dense import train_pixnet
    from histomap.tasks.feature_cache import FeaturePyramid, encode_slide

    s = uni2h_slide
    cache = encode_slide(s["slide"], s["st"], s["root"] / "features.zarr", encoder="uni2-h",
                         mpp=MPP, checkpoint=s["checkpoint"], tile_px=SIDE, margin_px=0,
                         crop_um=32.0, encoder_cfg=TINY_UNI2H, device="cpu")
    root = zarr.open_group(str(cache), mode="r")
    assert root.attrs["strides"] == [16] * 4 and root.attrs["channels"] == [48] * 4
    assert root.attrs["encoder_cfg"]["tap_blocks"] == [0, 1, 2, 3]
    assert root["level0"].shape == (48, SIDE // 16, SIDE // 16)
    assert root["spots"].shape == (6, 48)
    # the cached taps are the source network's block outputs (fp16 storage)
    pyr = FeaturePyramid(cache)
    assert np.abs(pyr.levels[3]).max() > 0

    model_cfg = {"encoder": "uni2-h", "encoder_cfg": {**TINY_UNI2H, "pyramid_channels": 8},
                 "freeze_encoder": True, "checkpoint": str(s["checkpoint"]),
                 "decoder_channels": [8, 8, 8, 8], "out_stride": 4, "window_px": SIDE,
                 "input_mpp": MPP, "loss": "mse"}
    out = s["root"] / "run"
    summary = train_pixnet([s["st"]], [s["slide"]], [f"g{i}" for i in range(GENES)],
                           model_cfg=model_cfg,
                           train_cfg={"epochs": 2, "batch_size": 2, "lr": 1e-3,
                                      "weight_decay": 0.0, "patience": 5, "amp": False,
                                      "device": "cpu"},
                           validation={"fraction": 0.0, "block_um": 50}, seed=0,
                           out_model=out / "model.pt", out_log=out / "train_log.csv",
                           checkpoint_dir=out / "ckpt", feature_caches=[cache])
    assert summary is not None and (out / "model.pt").is_file()
    log = (out / "train_log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 epochs
    trained = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    state = trained["state_dict"] if "state_dict" in trained else trained["model"]
    source = s["source"].state_dict()
    # the frozen UNI2-h-shaped encoder is the file's, untouched by training
    for key, value in source.items():
        torch.testing.assert_close(state[f"encoder.vit.{key}"], value, rtol=0, atol=0)


def test_uni2h_cached_first_step_equals_the_encoder_run_on_the_window(uni2h_slide):
    """Training from the cache is training with the frozen UNI2-h-shaped encoder run on the
    window: same loss and gradients up to the cache's float16 rounding."""
    from histomap.tasks.dense_windows import SlideSpots, WindowDataset, pixnet_batch_loss
    from histomap.tasks.feature_cache import (CachedWindowDataset, FeaturePyramid,
                                              cached_dense_batch_loss, encode_slide)

    s = uni2h_slide
    cache = encode_slide(s["slide"], s["st"], s["root"] / "features_step.zarr",
                         encoder="uni2-h", mpp=MPP, checkpoint=s["checkpoint"], tile_px=SIDE,
                         margin_px=0, crop_um=32.0, encoder_cfg=TINY_UNI2H, device="cpu")
    spots = ad.read_h5ad(s["st"])
    slide_spots = SlideSpots(s["slide"], np.asarray(spots.obsm["spatial"]), 30.0,
                             np.asarray(spots.X), "tiny")
    window = {"window_px": SIDE, "input_mpp": MPP, "out_stride": 4}
    plain = WindowDataset([slide_spots], augment=False, **window)
    cached = CachedWindowDataset([slide_spots], [FeaturePyramid(cache)], augment=False,
                                 **window)
    assert plain.window_origin(0) == cached.window_origin(0) == (0, 0)
    cfg = {"encoder": "uni2-h", "encoder_cfg": {**TINY_UNI2H, "pyramid_channels": 8},
           "freeze_encoder": True, "pretrained_checkpoint": s["checkpoint"],
           "decoder_channels": [8, 8, 8, 8], "out_stride": 4}

    def first_step(batch, loss_fn):
        """{"loss": the loss, parameter name: its gradient} of a fresh model's first step."""
        torch.manual_seed(0)
        model = build_model("pixnet", GENES, **cfg).train()
        loss = loss_fn(model, batch, torch.device("cpu"), None)
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.requires_grad}}

    batch_p = {k: v[None] for k, v in plain[0].items()}
    batch_c = {k: v[None] for k, v in cached[0].items()}
    got_p = first_step(batch_p, pixnet_batch_loss)
    got_c = first_step(batch_c, cached_dense_batch_loss)
    assert got_p.keys() == got_c.keys() and len(got_p) > 1
    assert not any(n.startswith("encoder.vit.") for n in got_p)  # frozen
    # float16 storage of the taps (relative rounding u = 2^-11) plus the encoder's reordering
    # (cache tiles vs the window): the first step's measured response to a perturbation of
    # that size, times 4 (tests/tolerances.py::stored_rounding_atol)
    atol = stored_rounding_atol(lambda b: first_step(b, cached_dense_batch_loss), batch_c,
                                [k for k in batch_c if k.startswith("level")],
                                model=build_model("pixnet", GENES, **cfg))
    for name in got_p:
        torch.testing.assert_close(got_c[name], got_p[name], rtol=0, atol=atol[name], msg=name)
