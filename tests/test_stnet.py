"""STNet: shapes, gradients, local checkpoints, registry and the capacity to fit a batch."""
from __future__ import annotations


import pytest

from histomap.compat import timm, torch
from histomap.errors import InputError
from histomap.models import MODELS, STNet, build_model

BACKBONE = "resnet10t"


def _patches(n=4, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g)


def test_forward_shapes_and_gradients():
    torch.manual_seed(0)
    model = STNet(7, backbone=BACKBONE)
    out = model(_patches(3))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0
    assert model.backbone.conv1[0].weight.grad.abs().sum() > 0  # gradient reaches the stem


def test_rejects_zero_genes():
    with pytest.raises(ValueError, match="n_genes"):
        STNet(0, backbone=BACKBONE)


def test_local_checkpoint_loads_backbone(tmp_path):
    torch.manual_seed(1)
    source = STNet(5, backbone=BACKBONE).eval()
    state = {f"module.{k}": v for k, v in source.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 512)  # a classifier head the backbone does not have
    ckpt = tmp_path / "foundation.pth"
    torch.save({"state_dict": state, "epoch": 3}, ckpt)

    torch.manual_seed(2)
    fresh = STNet(5, backbone=BACKBONE).eval()
    x = _patches(2)
    assert not torch.allclose(fresh.backbone(x), source.backbone(x))
    # a classifier head of any size is the architecture's: left out; every backbone tensor
    # comes from the file (histomap.models.checkpoint_io)
    loaded = STNet(5, backbone=BACKBONE, pretrained_checkpoint=str(ckpt)).eval()
    loaded.head.load_state_dict(source.head.state_dict())
    assert torch.equal(loaded(x), source(x))
    assert loaded.config["pretrained_checkpoint"] == str(ckpt)


def test_checkpoint_with_model_wrapper_and_missing_keys(tmp_path):
    source = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
    state = source.state_dict()
    ckpt = tmp_path / "wrapped.pt"
    torch.save({"model": state}, ckpt)
    loaded = STNet(2, backbone=BACKBONE, pretrained_checkpoint=ckpt)
    key = "conv1.0.weight"
    assert torch.equal(loaded.backbone.state_dict()[key], source.state_dict()[key])
    dropped = next(k for k in state if k.endswith("running_var"))
    del state[dropped]
    torch.save({"model": state}, ckpt)
    with pytest.raises(InputError, match=rf"wrapped.pt.*missing.*{dropped}"):
        STNet(2, backbone=BACKBONE, pretrained_checkpoint=ckpt)


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(InputError, match="nope.pth"):
        STNet(3, backbone=BACKBONE, pretrained_checkpoint=str(missing))


def test_unrelated_checkpoint_is_an_error(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, ckpt)
    with pytest.raises(InputError, match=r"other.pt.*no place.*encoder.weight"):
        STNet(3, backbone=BACKBONE, pretrained_checkpoint=ckpt)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pt"):
        STNet(3, backbone=BACKBONE, pretrained_checkpoint=bad)


def test_registry_builds_by_name():
    assert MODELS["stnet"] is STNet
    model = build_model("stnet", 4, backbone=BACKBONE, dropout=0.0)
    assert isinstance(model, STNet) and model.head.out_features == 4
    assert build_model("stnet", 4, **model.config).config == model.config
    assert build_model("stnet", 4, n_genes=4, backbone=BACKBONE).head.out_features == 4
    with pytest.raises(ValueError, match="config says 5 genes"):
        build_model("stnet", 4, n_genes=5, backbone=BACKBONE)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("pixnot", 4)
    with pytest.raises(ValueError, match="bad configuration"):
        build_model("stnet", 4, backbon=BACKBONE)


def test_overfits_one_batch():
    """8 patches, 4 genes: the loss of one batch must fall by > 90% within 100 steps."""
    torch.manual_seed(0)
    x = _patches(8, seed=3)
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    model = STNet(4, backbone=BACKBONE, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_output_bias_starts_at_training_mean():
    from histomap.models.stnet import STNet
    model = STNet(3, backbone="resnet10t").eval()
    model.head.weight.data.zero_()
    model.init_output_bias(torch.tensor([1.0, 2.0, 3.0]))
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out, torch.tensor([[1.0, 2.0, 3.0]] * 2))
