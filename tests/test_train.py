"""Spot patches, the shared training loop (logs, checkpoints, early stopping, exact resume),
model.pt round trips and spot predictions."""
from __future__ import annotations

import csv
import logging

import anndata as ad
import numpy as np
import pytest
from torch import nn
from torch.utils.data import TensorDataset

import histomap.train as train_mod
from histomap.compat import torch
from histomap.data.slide import write_pyramid
from histomap.data.spot_patches import SpotDataset, dihedral, extract_spot_patches
from histomap.errors import InputError
from histomap.imagenorm import IMAGENET_MEAN, IMAGENET_STD
from histomap.models import STNet
from histomap.tasks.predict import predict_spots, spots_prediction_anndata
from histomap.train import TrainConfig, fit, load_model, save_model

BACKBONE = "test_resnet"  # timm's ~0.4 M parameter test network


RED, BLUE, GREY = (220, 30, 30), (30, 30, 220), (200, 200, 200)


# --------------------------------------------------------------------------- spot patches

@pytest.fixture(scope="module")
def toy_slide(tmp_path_factory):
    """640 x 512 px slide at 0.5 mpp: grey, a red 20 px square centred at (x=100, y=300) and a
    blue one at (x=500, y=120)."""
    image = np.full((512, 640, 3), GREY, dtype=np.uint8)
    image[290:310, 90:110] = RED
    image[110:130, 490:510] = BLUE
    return write_pyramid(image, tmp_path_factory.mktemp("slide") / "slide.tif", mpp=0.5)


def _close(pixels, colour, tol=30):
    return np.abs(pixels.astype(int) - np.array(colour)).max() <= tol


def test_extract_spot_patches_shape_and_content(toy_slide):
    centres = np.array([[100.0, 300.0], [500.0, 120.0]])
    patches = extract_spot_patches(toy_slide, centres, crop_um=20, out_mpp=0.5)
    assert patches.shape == (2, 40, 40, 3) and patches.dtype == np.uint8
    # the 20 px (10 um) square fills the central 20 px of the 40 px (20 um) patch
    assert _close(patches[0, 12:28, 12:28], RED)
    assert _close(patches[1, 12:28, 12:28], BLUE)
    for p in patches:
        assert _close(p[:6, :6], GREY) and _close(p[-6:, -6:], GREY)
        assert _close(p[:6, -6:], GREY) and _close(p[-6:, :6], GREY)
    # coarser output mpp: same physical crop in fewer pixels
    coarse = extract_spot_patches(toy_slide, centres, crop_um=20, out_mpp=1.0)
    assert coarse.shape == (2, 20, 20, 3)
    assert _close(coarse[0, 7:13, 7:13], RED) and _close(coarse[0, :3, :3], GREY)


def test_extract_spot_patches_checks_geometry(toy_slide, caplog):
    with pytest.raises(InputError, match="outside"):
        extract_spot_patches(toy_slide, np.array([[5000.0, 100.0]]), crop_um=10, out_mpp=0.5)
    with caplog.at_level(logging.WARNING, logger="histomap.data.spot_patches"):
        patches = extract_spot_patches(toy_slide, np.array([[100.0, 300.0], [-50.0, 10.0]]),
                                       crop_um=10, out_mpp=0.5)
    assert "1 of 2 spot centres lie outside" in caplog.text
    assert _close(patches[1], (255, 255, 255), tol=2)  # off-slide is white, not dropped
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        extract_spot_patches(toy_slide, np.zeros((3, 3)), crop_um=10, out_mpp=0.5)


def test_spot_dataset_normalises_to_chw():
    patches = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    patches[1] = 255
    targets = np.arange(6, dtype=np.float32).reshape(3, 2)
    ds = SpotDataset(patches, targets)
    image, target = ds[1]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 0, 0], expected)
    assert torch.equal(target, torch.tensor([2.0, 3.0]))
    assert SpotDataset(patches)[0].shape == (3, 8, 8)  # no targets: the image alone
    with pytest.raises(ValueError, match="targets"):
        SpotDataset(patches, targets[:2])
    with pytest.raises(ValueError, match="uint8"):
        SpotDataset(patches.astype(np.float32))


def test_augmentation_is_dihedral_only():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(1, 6, 6, 3), dtype=np.uint8)
    plain = SpotDataset(patches)[0]
    variants = [dihedral(plain, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8
    ds = SpotDataset(patches, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        item = ds[0]
        match = [k for k, v in enumerate(variants) if torch.equal(item, v)]
        assert len(match) == 1  # exactly one dihedral transform, no other change
        seen.add(match[0])
    assert seen == set(range(8))


# --------------------------------------------------------------------------- training loop

def _spot_data(n, side=32, genes=3, seed=0, augment=False):
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    # targets depend on the image (mean colour), so there is something to learn
    targets = patches.reshape(n, -1, 3).mean(axis=1)[:, :genes].astype(np.float32) / 64.0
    return SpotDataset(patches, targets, augment=augment)


def _stnet(seed, genes=3, dropout=0.5):
    torch.manual_seed(seed)
    return STNet(genes, backbone=BACKBONE, dropout=dropout)


def _read_log(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_fit_writes_log_checkpoints_and_model(tmp_path):
    genes = ["ERBB2", "ESR1", "KRT5"]
    model = _stnet(0)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, patience=5, seed=1)
    summary = fit(model, _spot_data(10, augment=True), _spot_data(4, seed=1),
                  loss_fn=nn.functional.mse_loss, out_dir=tmp_path, cfg=cfg,
                  model_meta={"model_name": "stnet", "genes": genes,
                              "extra": {"crop_um": 112.0, "out_mpp": 0.5}})
    rows = _read_log(tmp_path / "train_log.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss"))
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(1e-3)  # cosine
    for name in ("last.pt", "best.pt", "model.pt"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob("*.partial"))
    val_losses = [float(r["val_loss"]) for r in rows]
    assert summary["best_epoch"] == 1 + int(np.argmin(val_losses))
    best = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())

    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["genes"] == genes and meta["model_name"] == "stnet"
    assert meta["model_config"]["backbone"] == BACKBONE and meta["extra"]["crop_um"] == 112.0
    ds = _spot_data(5, seed=2)
    np.testing.assert_allclose(predict_spots(loaded, ds, batch_size=2, device="cpu"),
                               predict_spots(model, ds, batch_size=2, device="cpu"), atol=1e-6)

    # a finished run is not trained again
    again = fit(_stnet(9), _spot_data(10), _spot_data(4, seed=1), loss_fn=nn.functional.mse_loss,
                out_dir=tmp_path, cfg=cfg)
    assert again["resumed_from"] == 2 and len(_read_log(tmp_path / "train_log.csv")) == 2


def test_early_stopping(tmp_path):
    """lr = 0: the validation loss never improves after epoch 1, so training stops after
    1 + patience epochs."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 2)
    model = nn.Linear(5, 2)
    cfg = TrainConfig(epochs=20, batch_size=4, lr=0.0, patience=2, seed=0)
    summary = fit(model, TensorDataset(x, y), TensorDataset(x[:4], y[:4]),
                  loss_fn=nn.functional.mse_loss, out_dir=tmp_path, cfg=cfg)
    assert summary["stopped_early"] and summary["epochs_done"] == 3
    assert summary["best_epoch"] == 1
    assert len(_read_log(tmp_path / "train_log.csv")) == 3


def test_pluggable_batch_to_loss(tmp_path):
    """A model whose batches are dicts trains through its own batch_to_loss."""
    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"tiles": torch.full((4,), float(i)), "target": torch.tensor([2.0 * i])}

    def batch_to_loss(model, batch, device, loss_fn):
        return ((model(batch["tiles"].to(device)) - batch["target"].to(device)) ** 2).mean()

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    cfg = TrainConfig(epochs=30, batch_size=4, lr=0.05, patience=None, schedule="constant")
    summary = fit(model, DictData(), DictData(), loss_fn=None, out_dir=tmp_path, cfg=cfg,
                  batch_to_loss=batch_to_loss)
    losses = [r["train_loss"] for r in summary["history"]]
    assert losses[-1] < 0.1 * losses[0]


class _Killed(Exception):
    pass


def _kill_after(epochs):
    def callback(row):
        if row["epoch"] == epochs:
            raise _Killed
    return callback


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _resume_run(out_dir, cfg, interrupt):
    """Train 4 epochs into ``out_dir``, interrupted after epoch 2 when ``interrupt``."""
    args = dict(loss_fn=nn.functional.mse_loss, out_dir=out_dir)
    train, val = _spot_data(12, augment=True), _spot_data(4, seed=1)
    if interrupt == "kill":
        with pytest.raises(_Killed):
            fit(_stnet(0), train, val, cfg=cfg, on_epoch_end=_kill_after(2), **args)
    elif interrupt == "extend":
        fit(_stnet(0), train, val, cfg=TrainConfig(**{**cfg.to_dict(), "epochs": 2}), **args)
    first = _stnet(0 if interrupt is None else 123)  # a resumed run starts from last.pt
    return first, fit(first, train, val, cfg=cfg, **args)


@pytest.mark.parametrize("interrupt, schedule", [("kill", "cosine"), ("extend", "constant")])
def test_resume_matches_uninterrupted_run(tmp_path, interrupt, schedule):
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, patience=None, seed=7, schedule=schedule)
    model_a, summary_a = _resume_run(tmp_path / "a", cfg, None)
    model_b, summary_b = _resume_run(tmp_path / "b", cfg, interrupt)
    assert summary_b["resumed_from"] == 2 and summary_b["epochs_done"] == 4
    last_a, last_b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    for key, value in last_a.items():
        assert torch.allclose(value.float(), last_b[key].float(), atol=1e-6), key
    for (key, value), other in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.allclose(value.float(), other.float(), atol=1e-6), key
    for row_a, row_b in zip(summary_a["history"], summary_b["history"], strict=True):
        assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-6)
        assert row_a["val_loss"] == pytest.approx(row_b["val_loss"], rel=1e-6)


def test_resume_without_rng_restore_differs(tmp_path, monkeypatch):
    """Control for the test above: without restoring RNG states (dropout, augmentation) the
    resumed run diverges, so the equality above really checks the RNG handling."""
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, patience=None, seed=7)
    _resume_run(tmp_path / "a", cfg, None)
    monkeypatch.setattr(train_mod, "set_rng_states", lambda states: None)
    _resume_run(tmp_path / "b", cfg, "kill")
    last_a, last_b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert not all(torch.allclose(v.float(), last_b[k].float(), atol=1e-6)
                   for k, v in last_a.items())


def test_a_foreign_checkpoint_is_discarded(tmp_path, caplog):
    """Another model's last.pt in the folder (its fingerprint differs) is not resumed from: it is
    discarded with a log line and training starts over."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    cfg = TrainConfig(epochs=1, batch_size=4)
    fit(nn.Linear(5, 2), TensorDataset(x, y), None, loss_fn=nn.functional.mse_loss,
        out_dir=tmp_path, cfg=cfg)
    with caplog.at_level(logging.WARNING, logger="histomap.train"):
        summary = fit(nn.Linear(5, 3), TensorDataset(x, y[:, :1].repeat(1, 3)), None,
                      loss_fn=nn.functional.mse_loss, out_dir=tmp_path, cfg=TrainConfig(epochs=2))
    assert summary["resumed_from"] == 0 and summary["epochs_done"] == 2
    assert "another training" in caplog.text and "last.pt" in caplog.text


def test_train_config_rejects_unknown_keys():
    assert TrainConfig.from_dict({"epochs": 3}).epochs == 3
    with pytest.raises(ValueError, match="lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0})


def test_save_and_load_model_errors(tmp_path):
    model = _stnet(0)
    with pytest.raises(ValueError, match="3 genes"):
        save_model(tmp_path / "m.pt", model, model_name="stnet", genes=["A", "B"])
    with pytest.raises(ValueError, match="not registered"):
        save_model(tmp_path / "m.pt", model, model_name="nope", genes=["A", "B", "C"])
    with pytest.raises(InputError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a histomap model"):
        load_model(tmp_path / "other.pt")


def test_spot_and_sr_model_loaders_share_the_payload_checks(tmp_path):
    """load_model and load_sr_model read model.pt through one reader: a missing, unreadable or
    other-format file is an InputError naming it, saying which kind of model was expected."""
    from histomap.tasks.superres import load_sr_model

    model = _stnet(0)
    save_model(tmp_path / "spot.pt", model, model_name="stnet", genes=["A", "B", "C"])
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases = [(load_sr_model, "missing.pt", "does not exist \\(run the train_diffst"),
             (load_sr_model, "junk.pt", "cannot read as a histomap SR model"),
             (load_sr_model, "spot.pt", "not a histomap SR model file \\(expected format "
                                        "histomap.srmodel/1"),
             (load_model, "junk.pt", "cannot read as a histomap model")]
    for load, name, message in cases:
        with pytest.raises(InputError, match=message) as err:
            load(tmp_path / name)
        assert err.value.path == str(tmp_path / name)
    loaded, meta = load_model(tmp_path / "spot.pt")
    assert meta["genes"] == ["A", "B", "C"] and "state_dict" not in meta


# --------------------------------------------------------------------------- prediction

def test_predict_spots_keeps_order():
    model = _stnet(0).eval()
    ds = _spot_data(7)
    pred = predict_spots(model, ds, batch_size=3, device="cpu")
    assert pred.shape == (7, 3) and pred.dtype == np.float32
    with torch.no_grad():
        expected = model(torch.stack([ds[i][0] for i in range(7)])).numpy()
    # batches of 3 against one batch of 7: the CPU kernels may order their sums differently by
    # batch shape, so the bound is the network's reordering bound (tests/tolerances.py) for
    # outputs of this magnitude; a mixed-up order of spots is off by O(1)
    from tolerances import reordering_atol

    atol = reordering_atol(model, scale=max(1.0, float(np.abs(expected).max())))
    np.testing.assert_allclose(pred, expected, rtol=0, atol=atol)


def test_spots_prediction_anndata_contract(tmp_path):
    pred = np.arange(6, dtype=np.float64).reshape(3, 2)
    geometry = {"sample": "B1", "platform": "legacy_st", "mpp": 0.5, "spot_diameter_um": 100.0,
                "image": "B1.jpg"}
    adata = spots_prediction_anndata(
        pred, ["10x11", "12x13", "14x15"], ["ERBB2", "ESR1"], np.ones((3, 2)) * 5, geometry,
        55.0, model_info={"name": "stnet", "config": {"pretrained_checkpoint": None}})
    assert adata.X.dtype == np.float32 and np.array_equal(adata.X, pred)
    assert list(adata.obs_names) == ["10x11", "12x13", "14x15"]
    assert list(adata.var_names) == ["ERBB2", "ESR1"]
    assert np.array_equal(adata.obs["diameter_um"], [55.0] * 3)
    assert adata.obsm["spatial"].dtype == np.float64
    uns = adata.uns["histomap"]
    assert uns["sample"] == "B1" and uns["spot_diameter_um"] == 55.0
    assert uns["model"]["name"] == "stnet"
    adata.write_h5ad(tmp_path / "spots.h5ad")  # None in metadata must not break h5ad
    back = ad.read_h5ad(tmp_path / "spots.h5ad")
    assert back.uns["histomap"]["model"]["config"]["pretrained_checkpoint"] == ""
    with pytest.raises(ValueError, match="do not match"):
        spots_prediction_anndata(pred, ["a", "b"], ["ERBB2", "ESR1"], np.ones((2, 2)),
                                 geometry, 55.0)
