"""Non-diffusion SR baselines: shapes, gradients, bicubic, TESLA's histology guidance, attention
gates, one-batch overfit, config round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from histomap.models.srnets import (
    SR_BASELINES,
    AttentionUNetSR,
    TeslaSR,
    build_sr_baseline,
    lr_scale,
    upsample_lr,
)

TRAINABLE = [n for n, cls in SR_BASELINES.items() if cls.trainable]
# (HR side, LR side): exact multiples of scale 4, and an edge="ceil" pair (10 LR -> 40 -> 38 HR)
SIZES = [(32, 8), (40, 10), (38, 10)]


def pair(n_genes: int, hr: int, lr_side: int, batch: int = 2, img: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand((batch, n_genes, lr_side, lr_side), generator=g)
    image = torch.rand((batch, 3, img, img), generator=g)
    return upsample_lr(lr, (hr, hr)), image, lr


def test_registry_flags():
    assert set(SR_BASELINES) == {"bicubic", "unet", "unetpp", "attention_unet", "histogene_sr",
                                 "tesla"}
    for name, cls in SR_BASELINES.items():
        model = build_sr_baseline(name, 5)
        n_params = sum(p.numel() for p in model.parameters())
        assert cls.trainable == (name not in ("bicubic", "tesla"))
        assert (n_params > 0) == cls.trainable, name


@pytest.mark.parametrize("n_genes", [5, 10])
@pytest.mark.parametrize("hr,lr_side", SIZES)
@pytest.mark.parametrize("name", sorted(SR_BASELINES))
def test_output_shapes(name, hr, lr_side, n_genes):
    torch.manual_seed(0)
    model = build_sr_baseline(name, n_genes)
    lr_up, image, lr = pair(n_genes, hr, lr_side)
    out = model(lr_up, image, lr)
    assert out.shape == (2, n_genes, hr, hr)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        model(lr_up[:, :-1], image, lr[:, :-1])      # wrong gene count


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_sr_baseline(name, 5)
    lr_up, image, lr = pair(5, 38, 10)
    target = torch.rand_like(lr_up)
    F.mse_loss(model(lr_up, image, lr), target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient at {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient at {pname}"


def test_histogene_reads_the_lr_map_by_default():
    """Every SR method gets the LR map (issue 13): histogene_sr reads it unless asked to be
    HistoGene itself (use_lr=False), and says so in ``uses_lr_map``."""
    torch.manual_seed(0)
    lr_up, image, lr = pair(5, 32, 8)
    model = build_sr_baseline("histogene_sr", 5, dropout=0.0).eval()
    assert model.uses_lr_map
    assert not torch.allclose(model(lr_up, image), model(lr_up * 2 + 1, image))
    assert not torch.equal(model(lr_up, image), model(lr_up, image.flip(-1)))
    histology_only = build_sr_baseline("histogene_sr", 5, dropout=0.0, use_lr=False).eval()
    assert not histology_only.uses_lr_map
    assert torch.equal(histology_only(lr_up, image, lr), histology_only(lr_up * 2 + 1, image, lr))


def test_residual_and_softplus_options():
    torch.manual_seed(0)
    lr_up, image, lr = pair(5, 32, 8)
    model = build_sr_baseline("unet", 5).eval()
    plain = build_sr_baseline("unet", 5, residual=False).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(lr_up, image), plain(lr_up, image) + lr_up, atol=1e-6)
    soft = build_sr_baseline("unet", 5, out_activation="softplus").eval()
    soft.load_state_dict(model.state_dict())
    assert torch.allclose(soft(lr_up, image), F.softplus(model(lr_up, image)), atol=1e-6)
    with pytest.raises(ValueError, match="out_activation"):
        build_sr_baseline("unet", 5, out_activation="relu6")


# ------------------------------------------------------------------------------------ bicubic
@pytest.mark.parametrize("hr,lr_side", SIZES)
def test_bicubic_is_interpolation_of_lr(hr, lr_side):
    lr_up, image, lr = pair(4, hr, lr_side, seed=3)
    s = 4
    expected = F.interpolate(lr, size=(lr_side * s, lr_side * s), mode="bicubic",
                             align_corners=False)[..., :hr, :hr]
    model = build_sr_baseline("bicubic", 4)
    assert torch.allclose(model(torch.zeros_like(lr_up), image, lr), expected, atol=1e-6)
    assert torch.equal(model(lr_up, image), lr_up)          # no raw LR: the given lr_up


def test_lr_scale_checks_coverage():
    assert lr_scale((128, 128), (26, 26)) == 5
    assert lr_scale((125, 125), (25, 25)) == 5
    with pytest.raises(ValueError, match="does not cover"):
        lr_scale((128, 128), (26, 26), scale=4)


# -------------------------------------------------------------------------------------- TESLA
PINK, PURPLE = torch.tensor([0.85, 0.45, 0.6]), torch.tensor([0.35, 0.2, 0.55])


def two_colour_image(batch: int, side: int, boundary: int, left=PINK, right=PURPLE):
    image = torch.empty(batch, 3, side, side)
    image[..., :boundary] = left[:, None, None]
    image[..., boundary:] = right[:, None, None]
    return image


def test_tesla_follows_the_histology_edge_better_than_bicubic():
    hr, s, genes = 32, 4, 3
    lr = torch.zeros(1, genes, hr // s, hr // s)
    lr[..., hr // s // 2:] = 1.0                        # step at HR column 16
    truth = torch.zeros(1, genes, hr, hr)
    truth[..., hr // 2:] = 1.0
    lr_up = upsample_lr(lr, (hr, hr))
    image = two_colour_image(1, 64, 32)                 # colour edge at the same place
    tesla = TeslaSR(genes)
    out = tesla(lr_up, image, lr)
    near = slice(hr // 2 - 4, hr // 2 + 4)              # 4 HR pixels either side of the edge
    err_tesla = (out - truth)[..., near].abs().mean()
    err_bicubic = (lr_up - truth)[..., near].abs().mean()
    assert err_tesla < 0.25 * err_bicubic, (err_tesla, err_bicubic)
    assert tesla.last_fallback_fraction == 0.0
    # the colour term is what does it: on a uniform image TESLA is a spatial smoother
    flat = tesla(lr_up, two_colour_image(1, 64, 32, right=PINK), lr)
    assert (flat - truth)[..., near].abs().mean() > 2 * err_tesla


def test_tesla_constant_map_stays_constant():
    g = torch.Generator().manual_seed(1)
    lr = torch.full((2, 4, 10, 10), 0.37)
    image = torch.rand((2, 3, 80, 80), generator=g)
    image[:, :, :20] = 1.0                              # background band (white glass)
    out = TeslaSR(4)(upsample_lr(lr, (38, 38)), image, lr)
    assert out.shape == (2, 4, 38, 38)
    assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-5)


def test_tesla_background_keeps_lr_up_and_needs_lr():
    lr_up, _, lr = pair(3, 32, 8, batch=1)
    image = two_colour_image(1, 32, 16, right=torch.ones(3))   # right half is glass
    tesla = TeslaSR(3)
    out = tesla(lr_up, image, lr)
    assert torch.equal(out[..., 16:], lr_up[..., 16:])
    assert not torch.allclose(out[..., :16], lr_up[..., :16])
    assert tesla.last_fallback_fraction == pytest.approx(0.5)
    with pytest.raises(ValueError, match="raw LR map"):
        tesla(lr_up, image)


# ---------------------------------------------------------------------------- attention gates
def test_attention_gates_are_in_unit_interval():
    torch.manual_seed(0)
    model = AttentionUNetSR(5, depth=3)
    lr_up, image, lr = pair(5, 38, 10)                  # padded to 40 internally
    model(lr_up, image, lr)
    gates = model.last_gates
    assert [tuple(g.shape) for g in gates] == [(2, 1, 10, 10), (2, 1, 20, 20), (2, 1, 40, 40)]
    for gate in gates:
        assert gate.min() >= 0 and gate.max() <= 1
        assert gate.std() > 0


# -------------------------------------------------------------------------------- overfitting
def test_unet_overfits_one_batch():
    torch.manual_seed(0)
    genes, hr, s = 5, 32, 4
    g = torch.Generator().manual_seed(2)
    image = torch.rand((4, 3, hr, hr), generator=g)
    # HR truth: histology-driven texture on top of a smooth field; LR = its block means
    weights = torch.rand((genes, 3), generator=g)
    truth = torch.einsum("gc,bchw->bghw", weights, image) / 3
    lr = F.avg_pool2d(truth, s)
    lr_up = upsample_lr(lr, (hr, hr))
    model = build_sr_baseline("unet", genes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(model(lr_up, image, lr), truth)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    assert losses[-1] < F.mse_loss(lr_up, truth).item()     # learnt detail bicubic lacks


# ------------------------------------------------------------------------------ config round trip
CONFIGS = {
    "bicubic": {"mode": "bilinear"},
    "unet": {"base_channels": 8, "depth": 2, "norm": "group", "residual": False},
    "unetpp": {"base_channels": 8, "depth": 2, "out_activation": "softplus"},
    "attention_unet": {"base_channels": 8, "depth": 2, "norm": "none"},
    "histogene_sr": {"dim": 32, "layers": 1, "heads": 2, "token_px": 2, "use_lr": True},
    "tesla": {"radius": 1.5, "sigma_colour": 0.2, "tissue_threshold": None},
}


@pytest.mark.parametrize("name", sorted(SR_BASELINES))
def test_config_round_trip(name):
    torch.manual_seed(0)
    model = build_sr_baseline(name, 5, **CONFIGS[name]).eval()
    rebuilt = build_sr_baseline(name, 5, **{**model.config, "n_genes": 5}).eval()
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    state, new_state = model.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in new_state.items()}
    rebuilt.load_state_dict(state)
    lr_up, image, lr = pair(5, 32, 8)
    assert torch.equal(model(lr_up, image, lr), rebuilt(lr_up, image, lr))
    with pytest.raises(ValueError, match="genes"):
        build_sr_baseline(name, 6, **{**model.config, "n_genes": 5})


def test_unknown_name_and_keyword():
    with pytest.raises(ValueError, match="unknown SR baseline"):
        build_sr_baseline("srcnn", 5)
    with pytest.raises(ValueError, match="bad configuration"):
        build_sr_baseline("unet", 5, channels=4)
