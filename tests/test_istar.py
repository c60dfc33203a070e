"""iStar-style baseline: frozen dense features (H&E filter bank, timm/ViT encoder) + per-pixel
MLP; shapes, frozen extractor, colour deconvolution, equivariance, spot aggregation, overfit
through PixNet's window task, config round trip, drop-in train/predict."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from skimage.color import rgb2hed

from histomap.data.io.synthetic import read as read_synthetic
from histomap.data.preprocess import normalise_spots
from histomap.data.slide import write_pyramid
from histomap.data.synthetic import simulate_sample
from histomap.data.tiling import tile_slide
from histomap.models.istar import FilterBank, IStar, gaussian_kernels, pyramid_factor
from histomap.models.pixnet import loss_terms
from histomap.models.roi import roi_aggregate
from histomap.tasks import dense as pixnet_task
from histomap.tasks.dense_windows import SlideSpots, WindowDataset, make_loss_fn, pixnet_batch_loss
from histomap.tasks.dense_map import read_dense
from histomap.train import load_model, save_model

CNN = "test_resnet"  # timm's tiny ResNet (strides 2..32), as in test_pixnet.py
TINY_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2}
MODES = {"filterbank": {}, "encoder": {"encoder": CNN}, "both": {"encoder": CNN},
         "vit": {"features": "encoder", "encoder": "vit", "encoder_cfg": TINY_VIT}}
# stain optical densities (R, G, B) of Ruifrok & Johnston
H_OD, E_OD = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])


def _images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(mode: str, n_genes: int = 5, seed: int = 0, **kwargs) -> IStar:
    torch.manual_seed(seed)
    cfg = {"features": mode, **MODES[mode], "hidden": (16,), **kwargs}
    return IStar(n_genes, **cfg)


def _stained(h: float, e: float, shape=(1, 1)) -> np.ndarray:
    """RGB in [0, 1] of ``h`` and ``e`` units of stain (Beer-Lambert)."""
    rgb = np.exp(-(h * H_OD + e * E_OD))
    return np.broadcast_to(rgb, (*shape, 3)).copy()


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("mode, out_stride", [("filterbank", 4), ("filterbank", 2),
                                              ("encoder", 4), ("both", 4), ("vit", 4)])
def test_dense_map_shape_and_non_negative(mode, out_stride):
    model = _model(mode, out_stride=out_stride).train()
    g = model(_images())
    assert g.shape == (2, 5, 64 // out_stride, 64 // out_stride)
    assert torch.all(g >= 0) and g.dtype == torch.float32
    g.mean().backward()
    assert model.head.weight.grad.abs().sum() > 0
    relu = _model(mode, out_stride=out_stride, head_activation="relu").eval()
    assert torch.all(relu(_images()) >= 0)


def test_feature_channel_counts():
    bank = _model("filterbank").features
    assert bank.channels == 7 + 4 * 3 * 4 == len(bank.filterbank.names)
    encoder = _model("encoder").features
    assert encoder.channels == sum(encoder.encoder.channels)
    both = _model("both").features
    assert both.channels == bank.channels + encoder.channels
    assert _model("vit").features.channels == 4 * 32  # four tapped blocks of 32 dims


# --------------------------------------------------------------------------- frozen extractor
@pytest.mark.parametrize("mode", ["both", "vit"])
def test_feature_extractor_is_frozen(mode):
    model = _model(mode, dropout=0.0).train()
    assert model.training and not model.features.training
    assert not any(m.training for m in model.features.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mlp.", "head.")) for n in trainable)
    frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
    assert any("running_mean" in k for k in frozen) or mode == "vit"
    head_before = model.head.weight.detach().clone()
    # the training loop's optimiser: AdamW over model.parameters(), weight decay on
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(2):
        model(_images(seed=seed)).mean().backward()
        for p in model.features.parameters():
            assert p.grad is None
        opt.step()
        opt.zero_grad()
    for key, value in model.features.state_dict().items():
        torch.testing.assert_close(value, frozen[key], msg=f"frozen {key} changed")
    assert not torch.equal(model.head.weight, head_before)


# --------------------------------------------------------------------------- filter bank
def test_colour_deconvolution_matches_skimage():
    rgb = np.random.default_rng(0).uniform(0.05, 1.0, (6, 7, 3))
    _, hed = FilterBank().stains(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
    ours = hed[0].permute(1, 2, 0).numpy() / -np.log(1e-6)  # skimage's log scaling
    # skimage uses the unnormalised stain vectors (norms 0.998..1.004) and clips at 0
    np.testing.assert_allclose(np.maximum(ours, 0), rgb2hed(rgb), atol=5e-3)


def test_haematoxylin_channel_separates_purple_from_pink():
    bank = FilterBank(out_stride=4)
    purple = _stained(1.0, 0.3, (32, 32))   # nuclei: mostly haematoxylin
    pink = _stained(0.1, 1.0, (32, 32))     # stroma/cytoplasm: mostly eosin
    feats = bank(torch.from_numpy(np.stack([purple, pink])).permute(0, 3, 1, 2).float())
    names = bank.names
    for stain, (hi, lo) in {"H": (0, 1), "E": (1, 0)}.items():
        for name in (stain, f"smooth_{stain}_s2", f"smooth_{stain}_s8"):
            j = names.index(name)
            assert feats[hi, j].mean() > feats[lo, j].mean() + 0.5, name
    # the deconvolution recovers the stain amounts themselves
    j_h, j_e = names.index("H"), names.index("E")
    assert feats[0, j_h].mean().item() == pytest.approx(1.0, abs=0.02)
    assert feats[1, j_e].mean().item() == pytest.approx(1.0, abs=0.02)


def test_filter_bank_on_constant_and_textured_images():
    bank = FilterBank(out_stride=4)
    names = bank.names
    flat = bank(torch.full((1, 3, 48, 48), 0.6))
    derivative = [j for j, n in enumerate(names) if n.split("_")[0] in ("grad", "log", "std")]
    assert flat[:, derivative].abs().max() < 1e-4
    smooth = [j for j, n in enumerate(names) if n.startswith("smooth_OD")]
    torch.testing.assert_close(flat[:, smooth], torch.full_like(flat[:, smooth], -np.log(0.6)))
    # stripes of haematoxylin (4 px period): texture shows at small scales, not in the mean
    stripes = np.where((np.arange(48) // 2) % 2 == 0, 1.0, 0.0)[None, :].repeat(48, 0)
    rgb = np.exp(-stripes[..., None] * H_OD)
    feats = bank(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
    inner = feats[0, :, 3:-3, 3:-3].mean(dim=(1, 2))
    assert inner[names.index("std_H_s1")] > 0.3 and inner[names.index("grad_H_s1")] > 0.2
    assert inner[names.index("std_H_s8")] > 0.3  # the window at 8 px still spans stripes
    assert inner[names.index("grad_H_s8")] < 0.05 * inner[names.index("grad_H_s1")]


def test_gaussian_kernels_and_pyramid():
    g, d1, d2 = gaussian_kernels(2.0)
    x = torch.arange(-6, 7, dtype=torch.float32)
    assert g.sum() == pytest.approx(1.0) and d1.sum() == pytest.approx(0, abs=1e-7)
    assert d2.sum() == pytest.approx(0, abs=1e-7)
    assert (x * x * g).sum() == pytest.approx(4.0, rel=0.02)   # variance sigma^2
    assert (d1 * x).sum() == pytest.approx(-1.0, rel=0.02)     # correlation with a ramp
    assert [pyramid_factor(s, 4) for s in (1, 2, 4, 8, 16)] == [1, 1, 2, 4, 4]
    assert [pyramid_factor(s, 6) for s in (4, 8)] == [2, 3]


def test_filter_bank_is_dihedral_equivariant():
    model = _model("filterbank").eval()
    x = _images(1, 64)
    with torch.no_grad():
        g = model(x)
        torch.testing.assert_close(model(torch.rot90(x, 1, (2, 3))), torch.rot90(g, 1, (2, 3)),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(torch.flip(x, (3,))), torch.flip(g, (3,)),
                                   rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- spots
def test_forward_spots_is_roi_aggregate_of_the_map():
    model = _model("both").eval()
    centres = torch.tensor([[[4.0, 4.0], [8.5, 3.2], [2.0, 13.0]],
                            [[10.0, 12.0], [1.0, 1.0], [7.7, 7.7]]])
    radii = torch.tensor([[2.0, 1.5, 0.3], [3.0, 2.0, 5.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        for mode in ("mean", "sum"):
            g, spots = model.forward_spots(_images(), centres, radii, mode=mode, valid=valid)
            assert g.shape == (2, 5, 16, 16) and spots.shape == (2, 3, 5)
            torch.testing.assert_close(spots, roi_aggregate(model(_images()), centres, radii,
                                                            mode=mode, valid=valid))
            assert torch.all(spots[valid] > 0) and torch.all(spots[~valid] == 0)


def test_init_output_bias_starts_at_the_mean():
    for activation in ("softplus", "relu"):
        model = IStar(3, hidden=(8,), head_activation=activation).eval()
        torch.nn.init.zeros_(model.head.weight)
        model.init_output_bias(np.array([0.5, 2.0, 4.0]))  # what train_pixnet calls
        g = model(_images())
        torch.testing.assert_close(g.mean(dim=(0, 2, 3)), torch.tensor([0.5, 2.0, 4.0]))
    with pytest.raises(ValueError, match="3 outputs"):
        model.init_output_bias(np.ones(4))


# --------------------------------------------------------------------------- window task
@pytest.fixture(scope="module")
def stained_spots(tmp_path_factory):
    """White slide (0.5 um/px) with 16 stained spots: haematoxylin fraction a, eosin 1 - a.

    Targets follow a (two linear genes, one non-linear); the MLP must read them from colour.
    """
    rng = np.random.default_rng(0)
    side, mpp = 400, 0.5
    grid = (np.arange(4) * 90 + 65).astype(float)
    centres = np.array([(x, y) for y in grid for x in grid]) + rng.uniform(-5, 5, (16, 2))
    a = rng.permutation(np.linspace(0.0, 1.0, 16))
    image = np.broadcast_to(_stained(0.0, 0.08), (side, side, 3)).copy()
    yy, xx = np.mgrid[:side, :side] + 0.5
    for (cx, cy), frac in zip(centres, a):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 24 ** 2  # 12 um radius, spot is 10 um
        image[disc] = _stained(1.2 * frac, 1.2 * (1 - frac))
    image = np.clip(image * rng.uniform(0.97, 1.03, image.shape), 0, 1)
    path = tmp_path_factory.mktemp("istar") / "slide.tif"
    write_pyramid((image * 255).round().astype(np.uint8), path, mpp)
    targets = np.column_stack([0.5 + 3 * a, 3.5 - 3 * a, 1 + 8 * a * (1 - a)])
    return SlideSpots(path, centres, 20.0, targets.astype(np.float32), "stained")


def test_one_batch_overfit_through_window_task(stained_spots):
    ds = WindowDataset([stained_spots], window_px=64, input_mpp=1.0, out_stride=4)
    assert len(ds) == 16
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    model = IStar(3, hidden=(64, 64), dropout=0.0).train()
    model.init_output_bias(ds.targets.mean(axis=0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn, cpu = make_loss_fn("mse"), torch.device("cpu")
    losses = []
    for _ in range(150):
        loss = pixnet_batch_loss(model, batch, cpu, loss_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.02 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    model.eval()
    with torch.no_grad():
        _, pred = model.forward_spots(batch["image"].float() / 255, batch["centres"],
                                      batch["radii"], valid=batch["valid"])
    _, pcc = loss_terms(pred, batch["targets"], batch["valid"])
    assert pcc.item() > 0.9  # eval mode (running feature statistics) keeps the fit


# --------------------------------------------------------------------------- persistence
def test_config_and_checkpoint_round_trip(tmp_path):
    source = _model("both", seed=1).eval()
    weights = tmp_path / "cnn.pt"
    torch.save(source.features.encoder.backbone.state_dict(), weights)
    model = _model("both", seed=2, pretrained_checkpoint=weights, sigmas=(1.5, 3.0)).eval()
    for key, value in source.features.encoder.state_dict().items():
        torch.testing.assert_close(model.features.encoder.state_dict()[key], value)
    config = model.config
    assert config["pretrained_checkpoint"] == str(weights) and config["sigmas"] == [1.5, 3.0]
    config["pretrained_checkpoint"] = None  # what histomap.train.load_model does
    rebuilt = IStar(model.n_genes, **config).eval()
    assert not torch.allclose(rebuilt(_images()), model(_images()))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(_images()), model(_images()))
    # through model.pt and the registry
    save_model(tmp_path / "model.pt", model, model_name="istar", genes=list("abcde"))
    loaded, meta = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, IStar) and meta["model_config"]["features"] == "both"
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images()), model(_images()))


def test_bad_configuration():
    with pytest.raises(ValueError, match="features"):
        IStar(3, features="hipt")
    with pytest.raises(ValueError, match="filterbank"):
        IStar(3, encoder=CNN)
    with pytest.raises(ValueError, match="head_activation"):
        IStar(3, head_activation="elu")
    with pytest.raises(ValueError, match="out_stride"):
        IStar(3, out_stride=0)
    with pytest.raises(ValueError, match="sigma"):
        IStar(3, sigmas=(0.0,))
    with pytest.raises(ValueError, match="images"):
        IStar(3)(torch.rand(2, 1, 16, 16))


# --------------------------------------------------------------------------- drop-in
def test_drop_in_for_pixnet_train_and_predict(tmp_path):
    root = tmp_path
    simulate_sample(root / "s1", seed=3, size_um=(400.0, 400.0))
    st = normalise_spots(read_synthetic("s1", root / "s1").spots, min_counts=10, min_genes=5)
    st.write_h5ad(root / "s1.h5ad")
    tile_slide(root / "s1" / "he.tif", root / "tiles.zarr", root / "tiles.parquet", tile_px=64,
               tile_mpp=2.0, mask_mpp=8.0)
    genes = list(st.var_names[np.argsort(-np.asarray(st.X.mean(axis=0)).ravel())[:4]])
    out = root / "istar"
    summary = pixnet_task.train_pixnet(
        [root / "s1.h5ad"], [root / "s1" / "he.tif"], genes,
        model_cfg={"hidden": [32], "out_stride": 4, "input_mpp": 2.0, "loss": "mse"},
        train_cfg={"epochs": 1, "batch_size": 8, "lr": 1e-3, "patience": None, "amp": False,
                   "device": "cpu"},
        validation={"fraction": 0.2, "block_um": 150}, seed=0, out_model=out / "model.pt",
        out_log=out / "train_log.csv", checkpoint_dir=out / "checkpoints", window_px=64,
        model_name="istar")
    assert summary["epochs_done"] == 1
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, IStar) and meta["model_name"] == "istar"
    spot_files = {55.0: out / "spots_55um.h5ad", 20.0: out / "spots_20um.h5ad"}
    pixnet_task.predict_pixnet(out / "model.pt", root / "s1" / "he.tif", root / "tiles.parquet",
                               out / "dense.zarr", root / "s1.h5ad", spot_files, device="cpu")
    dmap = read_dense(out / "dense.zarr")
    assert dmap.genes == genes and dmap.mpp == 2.0 * 4
    dense, mask = dmap.read(), np.asarray(dmap.mask[:]) > 0
    assert mask.any() and np.all(dense[:, mask] > 0)
    for path in spot_files.values():
        pred = ad.read_h5ad(path)
        assert pred.shape == (st.n_obs, 4) and np.isfinite(pred.X).all()
