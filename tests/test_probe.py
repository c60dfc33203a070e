"""Linear probe: ridge regression against a closed-form hand computation, penalty selection on
validation spots, and the fitted probe as a registered model."""
from __future__ import annotations

import numpy as np
import pytest

from histomap.compat import torch
from histomap.models.probe import LinearProbe, ridge_fit, ridge_predict, select_ridge


def _tiny(seed=0, n=7, f=3, g=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * [1.0, 5.0, 0.2] + [0.0, 3.0, -1.0]
    w = rng.normal(size=(f, g))
    y = x @ w + rng.normal(scale=0.3, size=(n, g)) + [2.0, -1.0]
    return x, y


def test_ridge_matches_the_closed_form_by_hand():
    x, y = _tiny()
    lam = 0.7
    weight, intercept, mean, std = ridge_fit(x, y, lam)
    # by hand: standardise with the training mean and (population) std, centre the targets,
    # solve the normal equations with lam on the diagonal; the intercept is the target mean
    z = (x - x.mean(0)) / x.std(0)
    yc = y - y.mean(0)
    expected = np.linalg.solve(z.T @ z + lam * np.eye(3), z.T @ yc)
    np.testing.assert_allclose(weight, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(intercept, y.mean(0))
    np.testing.assert_allclose(ridge_predict(x, weight, intercept, mean, std),
                               z @ expected + y.mean(0), rtol=1e-10)
    # lam -> 0 is least squares; a huge lam predicts the mean
    ls = np.linalg.lstsq(np.c_[z, np.ones(len(z))], y, rcond=None)[0]
    np.testing.assert_allclose(ridge_fit(x, y, 0.0)[0], ls[:3], rtol=1e-8, atol=1e-10)
    flat = ridge_predict(x, *ridge_fit(x, y, 1e12))
    np.testing.assert_allclose(flat, np.broadcast_to(y.mean(0), y.shape), atol=1e-6)


def test_penalty_is_the_one_with_lowest_validation_mse():
    x, y = _tiny(1, n=20)
    xv, yv = _tiny(2, n=6)
    alphas = [0.001, 0.1, 10.0]
    alpha, rows = select_ridge(x, y, xv, yv, alphas)
    by_hand = []
    for a in alphas:
        z = (x - x.mean(0)) / x.std(0)
        w = np.linalg.solve(z.T @ z + a * len(x) * np.eye(3), z.T @ (y - y.mean(0)))
        pred = (xv - x.mean(0)) / x.std(0) @ w + y.mean(0)
        by_hand.append(np.mean((pred - yv) ** 2))
    np.testing.assert_allclose([r["val_mse"] for r in rows], by_hand, rtol=1e-10)
    assert alpha == alphas[int(np.argmin(by_hand))]
    with pytest.raises(ValueError, match="no validation spot"):
        select_ridge(x, y, xv[:0], yv[:0], alphas)


def test_fitted_probe_module_predicts_like_the_ridge():
    probe = LinearProbe(2, encoder="resnet10t")
    features = np.random.default_rng(4).normal(size=(5, probe.num_features))
    wide = np.random.default_rng(5).normal(size=(40, probe.num_features))
    fitted = ridge_fit(wide, np.random.default_rng(6).normal(size=(40, 2)), 3.0)
    probe.set_ridge(*fitted)
    got = probe.predict_features(torch.as_tensor(features, dtype=torch.float32)).detach()
    # float32 against float64: the inputs and weights rounded to float32 (relative eps / 2
    # each) and a float32 sum of F terms (F eps of the terms' absolute sum), per output
    weight, intercept, mean, std = fitted
    terms = np.abs((features - mean) / std) @ np.abs(weight) + np.abs(intercept)
    atol = (probe.num_features + 2) * np.finfo(np.float32).eps * terms
    expect = ridge_predict(features, *fitted)
    assert (np.abs(got.numpy() - expect) <= atol).all(), np.abs(got.numpy() - expect) / atol
    assert not any(p.requires_grad for p in probe.parameters())
    out = probe(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 2)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    """Two tiny slides whose spot expression follows the stain darkness under the spot."""
    import anndata as ad

    from histomap.data.sample import annotate_spots
    from histomap.data.slide import write_pyramid

    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        side = 192
        grid = np.array([[x, y] for x in range(24, side, 24) for y in range(24, side, 24)],
                        dtype=np.float64)
        image = np.full((side, side, 3), 230, np.uint8)
        darkness = rng.random(len(grid))
        for (x, y), d in zip(grid, darkness):
            image[int(y) - 8:int(y) + 8, int(x) - 8:int(x) + 8] = (230 - 150 * d, 120, 200)
        slide = write_pyramid(image, root / f"s{k}.tif", 1.0)
        expr = np.c_[darkness * 3, 1 - darkness, rng.random(len(grid))].astype(np.float32)
        spots = ad.AnnData(expr)
        spots.var_names = ["dark", "light", "noise"]
        spots.obs_names = [f"s{k}_{i}" for i in range(len(grid))]
        spots.obsm["spatial"] = grid
        annotate_spots(spots, sample=f"s{k}", platform="synthetic", mpp=1.0,
                       spot_diameter_um=16.0, image=str(slide))
        st = root / f"s{k}.h5ad"
        spots.write_h5ad(st)
        out.append((st, slide))
    return root, out


@pytest.mark.slow
def test_train_probe_from_cache_and_from_slide_agree(two_slides):
    import anndata as ad

    from histomap.tasks.feature_cache import encode_slide
    from histomap.tasks.probe import train_probe
    from histomap.tasks.spot import predict_spot_model
    from histomap.train import load_model

    from histomap.compat import timm

    root, pairs = two_slides
    # a user's checkpoint (random weights in timm's format) fixes the encoder for the cache
    weights = root / "user" / "pytorch_model.bin"
    weights.parent.mkdir()
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    cfg = {"encoder": "resnet10t", "checkpoint": str(weights), "input_mpp": 1.0,
           "crop_um": 32.0, "alphas": [0.01, 1.0]}
    st_paths, slides = [p[0] for p in pairs], [p[1] for p in pairs]
    with pytest.raises(ValueError, match="no weights to cache"):
        encode_slide(slides[0], st_paths[0], root / "x.zarr", encoder="resnet10t", mpp=1.0)
    caches = [encode_slide(sl, st, root / f"f{i}.zarr", encoder="resnet10t", mpp=1.0,
                           crop_um=32.0, tile_px=128, margin_px=32, checkpoint=weights)
              for i, (st, sl) in enumerate(pairs)]
    validation = {"fraction": 0.25, "block_um": 48}
    genes = ["dark", "light", "noise"]
    fits = []
    for name, kwargs in (("cached", {"feature_caches": caches}), ("slide", {})):
        summary = train_probe(st_paths, slides, genes, model_cfg=cfg, validation=validation,
                              seed=0, out_model=root / name / "model.pt",
                              out_log=root / name / "log.csv", **kwargs)
        fits.append(summary)
    assert fits[0]["alpha"] == fits[1]["alpha"]
    model, meta = load_model(root / "cached" / "model.pt")
    assert meta["model_name"] == "probe" and meta["extra"]["crop_um"] == 32.0
    pred = predict_spot_model(root / "cached" / "model.pt", st_paths[0], slides[0],
                              root / "pred.h5ad", device="cpu")
    other = predict_spot_model(root / "slide" / "model.pt", st_paths[0], slides[0],
                               root / "pred2.h5ad", device="cpu")
    np.testing.assert_allclose(pred.X, other.X, rtol=2e-2, atol=2e-2)
    truth = ad.read_h5ad(st_paths[0])
    r = np.corrcoef(pred.X[:, 0], truth.X[:, 0])[0, 1]
    assert r > 0.5  # the probe learns the stain darkness of its training spots


@pytest.mark.slow
def test_stnet_head_trains_from_the_cache_and_predicts_from_crops(two_slides):
    """train_spot_model with feature caches (frozen backbone): only the head trains, the saved
    model predicts from the slide's crops of the cache's crop size."""
    from histomap.tasks.feature_cache import encode_slide
    from histomap.tasks.spot import predict_spot_model, train_spot_model
    from histomap.train import load_model

    root, pairs = two_slides
    name = "efficientnet_lite0_imagenet"
    caches = [encode_slide(sl, st, root / f"lite{i}.zarr", encoder=name, mpp=1.0, crop_um=32.0,
                           tile_px=128, margin_px=32) for i, (st, sl) in enumerate(pairs)]
    cfg = {"backbone": name, "input_mpp": 1.0, "freeze_backbone": True, "dropout": 0.0}
    genes = ["dark", "light", "noise"]
    kwargs = dict(model_name="stnet", train_cfg={"epochs": 2, "batch_size": 8, "device": "cpu"},
                  validation={"fraction": 0.25, "block_um": 48}, seed=0)
    with pytest.raises(ValueError, match="freeze_backbone"):
        train_spot_model([p[0] for p in pairs], [p[1] for p in pairs], genes,
                         model_cfg={**cfg, "freeze_backbone": False}, out_model=root / "x.pt",
                         out_log=root / "x.csv", checkpoint_dir=root / "xc",
                         feature_caches=caches, **kwargs)
    train_spot_model([p[0] for p in pairs], [p[1] for p in pairs], genes, model_cfg=cfg,
                     out_model=root / "st" / "model.pt", out_log=root / "st" / "log.csv",
                     checkpoint_dir=root / "st" / "ck", feature_caches=caches, **kwargs)
    model, meta = load_model(root / "st" / "model.pt")
    assert meta["extra"]["crop_um"] == 32.0 and meta["extra"]["feature_cache"]
    from histomap.models.encoders import create_encoder
    fresh = create_encoder(name, num_classes=0)
    torch.testing.assert_close(model.backbone.conv_stem.weight, fresh.conv_stem.weight)
    pred = predict_spot_model(root / "st" / "model.pt", pairs[0][0], pairs[0][1],
                              root / "st_pred.h5ad", device="cpu")
    assert pred.X.shape == (49, 3) and np.isfinite(pred.X).all()
