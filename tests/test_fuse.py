"""BatchNorm folded into the convolution before it (histomap.models.fuse): the same function up to
float rounding, the original kept where a fold would change it, and the dense map unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histomap.models.fuse import fold_batchnorm
from tolerances import reordering_atol


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def fold_atol(model: nn.Module, scale: float) -> float:
    """A fold rounds each folded weight once and drops one rounding of the normalisation: a
    relative change of about eps per layer, D eps over D layers in a chain, within the bound of
    one reordering of the longest dot product (2 n eps, n >= D in these networks)."""
    depth = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    atol = reordering_atol(model, scale=max(1.0, scale))
    assert depth * torch.finfo(torch.float32).eps * max(1.0, scale) <= atol
    return atol


def _n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["efficientnet_lite0_imagenet", "test_resnet"])
def test_folded_encoder_gives_the_same_pyramid_up_to_rounding(name):
    from histomap.models.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder(name, features_only=True)
    if name == "test_resnet":
        _with_statistics(encoder)
    encoder.eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fused = fold_batchnorm(encoder, x[:1])
    assert fused is not encoder and _n_batchnorms(encoder) > 0 and _n_batchnorms(fused) == 0
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # untouched
    with torch.no_grad():
        for want, got in zip(encoder(x), fused(x)):
            atol = fold_atol(encoder, float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
            assert float(want.std()) > 100 * atol


class NormNotAfterConv(nn.Module):
    """A BatchNorm registered right after a convolution but applied to the block's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(x) + self.bn(x)


def test_a_fold_that_changes_the_outputs_keeps_the_model():
    model = _with_statistics(NormNotAfterConv())
    x = torch.rand(1, 3, 16, 16)
    assert fold_batchnorm(model, x) is model
    assert fold_batchnorm(model) is not model  # unchecked: the caller's responsibility


def test_training_mode_is_refused_and_a_model_without_batchnorm_is_returned_as_is(monkeypatch):
    import histomap.models.fuse as fuse

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    plain = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LayerNorm(4), nn.ReLU()).eval()
    # nothing to fold: the weights are not copied (a foundation ViT is GBs)
    monkeypatch.setattr(fuse.copy, "deepcopy", lambda m: pytest.fail("copied"))
    assert fold_batchnorm(plain, torch.rand(1, 3, 4, 4)) is plain


def test_dense_map_with_folded_encoder_equals_the_unfolded_one(tmp_path, monkeypatch):
    """predict_dense_map runs the folded copy; the map is the one of the model as given (up to
    the fold's rounding), and the caller's model keeps its BatchNorms."""
    import histomap.tasks.dense_map as dense_map
    from histomap.data.slide import write_pyramid
    from histomap.models.pixnet import PixNet

    rng = np.random.default_rng(0)
    slide = tmp_path / "slide.tif"
    write_pyramid(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8), slide, 1.0)
    torch.manual_seed(0)
    model = PixNet(4, encoder="test_resnet", decoder_channels=[8, 8, 16, 16, 16],
                   out_stride=4, freeze_encoder=True)
    _with_statistics(model.encoder)
    kw = dict(input_mpp=1.0, tile_px=64, overlap_px=16, device="cpu", batch_size=2)
    folded = dense_map.predict_dense_map(model, slide, (0, 0, 240, 200),
                                         out_zarr=tmp_path / "folded.zarr", **kw).read()
    assert _n_batchnorms(model) > 0
    monkeypatch.setattr(dense_map, "fold_batchnorm", lambda m, probe: m)
    plain = dense_map.predict_dense_map(model, slide, (0, 0, 240, 200),
                                        out_zarr=tmp_path / "plain.zarr", **kw).read()
    atol = fold_atol(model, float(np.abs(plain).max()))
    np.testing.assert_allclose(folded, plain, rtol=0, atol=atol)
    assert np.ptp(plain) > 100 * atol
