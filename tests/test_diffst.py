"""Diff-ST network: CAM, disentangling, CIGC graph, curriculum, ablations, one-batch overfit."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histomap.models.diffst import (
    ConditionalUNet,
    CrossModalModulation,
    CurriculumSchedule,
    DiffST,
    DiffSTConfig,
    Disentangler,
    GeneGraph,
    coexpression_adjacency,
    local_cross_gram,
    normalize_adjacency,
    select_subpatches,
    split_subpatches,
    subpatch_entropy,
    topk_adjacency,
)
from histomap.models.diffusion import GaussianDiffusion

G, HR, LR, IMG, GRID = 3, 16, 4, 32, 4


def tiny_cfg(**overrides) -> DiffSTConfig:
    base = dict(base_channels=8, channel_mult=(1, 2), tissue_channels=8, cell_channels=8,
                attn_channels=8, fusion_channels=8, gene_node_channels=4, cell_grid=GRID,
                cell_patch_px=8, cam_region=3)
    base.update(overrides)
    return DiffSTConfig(**base)


def graded_image(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """H&E stand-in whose sub-patch k (row-major) holds k + 1 equally frequent grey levels, so its
    entropy (and the complexity ranking) grows with k; patch 0 is flat. ``seed`` shuffles pixels."""
    g = torch.Generator().manual_seed(seed)
    cell = IMG // GRID
    img = torch.empty(batch, 3, IMG, IMG)
    for k in range(GRID * GRID):
        r, c = divmod(k, GRID)
        levels = 0.1 + 0.05 * (torch.arange(cell * cell) % (k + 1)).float()
        for i in range(batch):
            shuffled = levels[torch.randperm(cell * cell, generator=g)].reshape(cell, cell)
            img[i, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = shuffled
    return img


def batch(seed: int = 0, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lr_map": torch.rand((n, G, LR, LR), generator=g), "image": graded_image(n, seed)}


def assert_all_grads(module: torch.nn.Module, may_be_zero: str | None = None) -> None:
    """Every parameter gets a finite, non-zero gradient (except names starting ``may_be_zero``)."""
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        if may_be_zero is None or not name.startswith(may_be_zero):
            assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


# ------------------------------------------------------------------------------------------ CAM
@pytest.mark.parametrize("mode,region", [("channel", 3), ("channel", 2), ("spatial", 3)])
def test_cam_shapes_gradients_and_cross_dependence(mode, region):
    torch.manual_seed(0)
    cam = CrossModalModulation(8, region, mode)
    f_y = torch.randn(2, 8, 6, 6, requires_grad=True)
    f_h = torch.randn(2, 8, 6, 6, requires_grad=True)
    y_out, h_out = cam(f_y, f_h)
    assert y_out.shape == f_y.shape and h_out.shape == f_h.shape
    # each modality's output is modulated by the other one
    (grad_h,) = torch.autograd.grad(y_out.pow(2).sum(), f_h, retain_graph=True)
    (grad_y,) = torch.autograd.grad(h_out.pow(2).sum(), f_y, retain_graph=True)
    assert grad_h.abs().sum() > 0 and grad_y.abs().sum() > 0
    w = torch.randn_like(y_out)
    ((y_out * w).sum() + (h_out * w.flip(1)).sum()).backward()
    assert_all_grads(cam)


def test_local_cross_gram_matches_unfolded_regions():
    g = torch.Generator().manual_seed(1)
    y, h = torch.randn((1, 3, 7, 7), generator=g), torch.randn((1, 3, 7, 7), generator=g)
    a = 3
    gram = local_cross_gram(y, h, a)                                    # (1, 7, 7, C, C)
    a_y = F.unfold(y, a, padding=1).reshape(1, 3, a * a, 7, 7)          # zero-padded regions
    a_h = F.unfold(h, a, padding=1).reshape(1, 3, a * a, 7, 7)
    for p in [(3, 3), (1, 5)]:                                          # interior pixels
        A_y, A_h = a_y[0, :, :, p[0], p[1]].T, a_h[0, :, :, p[0], p[1]].T  # (a^2, C)
        assert torch.allclose(gram[0, p[0], p[1]], A_y.T @ A_h / (a * a), atol=1e-5)
    # corner: the mean over the 4 in-image neighbours
    A_y, A_h = y[0, :, :2, :2].reshape(3, 4).T, h[0, :, :2, :2].reshape(3, 4).T
    assert torch.allclose(gram[0, 0, 0], A_y.T @ A_h / 4, atol=1e-5)


def test_spatial_cam_requires_divisible_grid():
    cam = CrossModalModulation(4, 4, "spatial")
    with pytest.raises(ValueError, match="divisible"):
        cam(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))


def test_disentangling_loss_and_gradients():
    torch.manual_seed(0)
    dis = Disentangler(8, 12)
    f_y = torch.randn(2, 8, 5, 5)
    f_h = torch.randn(2, 8, 5, 5)
    fused, loss = dis(f_y, f_h)
    assert fused.shape == (2, 12, 5, 5)
    assert torch.isfinite(loss) and loss.item() > 0
    (fused.pow(2).mean() + loss).backward()
    assert_all_grads(dis)
    # hand value without normalisation: ||1 - 0|| / ||2 - 0|| = 1/2
    raw = Disentangler(2, 2, normalize=False)
    ones = torch.ones(1, 2, 3, 3)
    value = raw.loss(ones, 0 * ones, 2 * ones, 0 * ones)
    assert value.item() == pytest.approx(0.5, rel=1e-5)
    # normalised: scaling the shared or unique parts does not change the loss
    s_y, s_h, u_y, u_h = (torch.randn(1, 4, 3, 3) for _ in range(4))
    assert dis.loss(s_y, s_h, u_y, u_h).item() == pytest.approx(
        dis.loss(0.01 * s_y, 0.01 * s_h, 10 * u_y, 10 * u_h).item(), rel=1e-4)


# ------------------------------------------------------------------------------------ CIGC graph
def test_coexpression_adjacency_hand_example(caplog):
    x = np.array([[1, 0, 2],
                  [2, 1, 0],
                  [0, 3, 1],
                  [1, 1, 1]], dtype=float)
    # totals 4, 5, 4; sum_o min(x_i, x_j) = 2 for every pair
    # p(0|1) = 2/5, p(1|0) = 2/4 -> 0.45; p(0|2) = p(2|0) = 2/4 -> 0.5; p(1|2) = 2/4, p(2|1) = 2/5
    expected = np.array([[1.0, 0.45, 0.5],
                         [0.45, 1.0, 0.45],
                         [0.5, 0.45, 1.0]])
    assert np.allclose(coexpression_adjacency(x), expected)
    # binarised: every gene is on in 3 obs, every pair in 2 -> 2/3
    binary = coexpression_adjacency(x, binarize=True)
    assert np.allclose(binary, np.where(np.eye(3, dtype=bool), 1.0, 2 / 3))
    import scipy.sparse as sp
    assert np.allclose(coexpression_adjacency(sp.csr_matrix(x)), expected)
    with caplog.at_level(logging.WARNING, logger="histomap.models.diffst_graph"):
        silent = coexpression_adjacency(np.c_[x, np.zeros(4)])
    assert "never expressed" in caplog.text
    assert silent[3, 3] == 1 and (silent[3, :3] == 0).all()
    with pytest.raises(ValueError, match="non-negative"):
        coexpression_adjacency(-x)


def test_normalize_adjacency():
    a = torch.tensor([[1.0, 1.0], [1.0, 3.0]])       # degrees 2 and 4
    n = normalize_adjacency(a)
    expected = torch.tensor([[1 / 2, 1 / math.sqrt(8)], [1 / math.sqrt(8), 3 / 4]])
    assert torch.allclose(n, expected)


def test_gene_graph_shapes_gradients_and_coupling():
    torch.manual_seed(0)
    graph = GeneGraph(3, node_channels=4, alpha=0.2)
    maps = torch.randn(2, 3, 5, 5)
    out = graph(maps)
    assert out.shape == (2, 3, 4, 5, 5)
    out.pow(2).mean().backward()
    assert_all_grads(graph)
    # identity graph: gene 0's nodes ignore gene 1; a co-expression graph couples them
    bumped = maps.clone()
    bumped[:, 1] += 1.0
    with torch.no_grad():
        assert torch.allclose(graph(maps)[:, 0], graph(bumped)[:, 0])
        graph.set_adjacency(np.array([[1, 0.9, 0], [0.9, 1, 0], [0, 0, 1.0]]))
        assert not torch.allclose(graph(maps)[:, 0], graph(bumped)[:, 0])
        assert torch.allclose(graph(maps)[:, 2], graph(bumped)[:, 2])   # gene 2 is not linked
        # residual mix: alpha = 0 returns the node embeddings unchanged
        graph.alpha = 0.0
        nodes = graph.encode(maps.reshape(6, 1, 5, 5)).reshape(2, 3, 4, 5, 5)
        assert torch.allclose(graph(maps), nodes)
    with pytest.raises(ValueError, match="adjacency must be"):
        graph.set_adjacency(np.eye(4))


def _random_adjacency(g: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return coexpression_adjacency(rng.gamma(0.5, size=(40, g)) * (rng.random((40, g)) > 0.3))


def test_topk_adjacency_keeps_each_genes_strongest_neighbours():
    a = np.array([[1.0, 0.9, 0.1, 0.5],
                  [0.9, 1.0, 0.2, 0.3],
                  [0.1, 0.2, 1.0, 0.05],
                  [0.5, 0.3, 0.05, 1.0]])
    kept = topk_adjacency(a, 1)
    # row 0 -> 1, row 1 -> 0, row 2 -> 1, row 3 -> 0; symmetric union plus the diagonal
    expected = np.array([[1.0, 0.9, 0.0, 0.5],
                         [0.9, 1.0, 0.2, 0.0],
                         [0.0, 0.2, 1.0, 0.0],
                         [0.5, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(kept, expected)
    a = _random_adjacency(30)
    kept = topk_adjacency(a, 4)
    assert (kept == kept.T).all() and ((kept > 0).sum(1) - 1 >= 4).all()
    assert ((kept > 0).sum() - 30) / 2 < 30 * 4 + 1   # O(genes x k) edges, not genes^2
    np.testing.assert_array_equal(topk_adjacency(a, 29), a)     # every neighbour: the dense graph
    np.testing.assert_array_equal(topk_adjacency(a, None), a)


def test_topk_graph_with_every_neighbour_equals_the_dense_graph():
    """cigc_topk = genes gives exactly the dense graph's model output."""
    g = 12
    adj = _random_adjacency(g, seed=1)
    outs = []
    for topk in (None, g):
        torch.manual_seed(0)
        model = DiffST(g, tiny_cfg(cigc_topk=topk)).eval()
        model.set_adjacency(adj)
        torch.manual_seed(1)
        x = torch.randn(2, g, HR, HR)
        with torch.no_grad():
            outs.append(model(x, torch.tensor([3, 7]), lr_map=torch.rand(2, g, LR, LR),
                              image=torch.rand(2, 3, IMG, IMG))[0])
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(0)
    sparse = DiffST(g, tiny_cfg(cigc_topk=2)).eval()
    sparse.set_adjacency(adj)
    assert int((sparse.graph.adjacency > 0).sum()) < g * g // 2


def test_gene_graph_mixing_equals_the_einsum_and_the_sparse_product():
    """The batched matmul (and the CSR product of a sparse graph) give the old einsum's result."""
    torch.manual_seed(0)
    g = 60
    graph = GeneGraph(g, node_channels=3, topk=2)
    graph.set_adjacency(_random_adjacency(g, seed=2))
    nodes = torch.randn(2, g, 3, 5, 5)
    old = torch.einsum("ij,bjchw->bichw", graph.adjacency, nodes)
    density = float((graph.adjacency != 0).float().mean())
    # two float32 sums of g terms in other orders: within 2 g eps of the terms' absolute sum
    bound = 2 * g * torch.finfo(torch.float32).eps * torch.einsum(
        "ij,bjchw->bichw", graph.adjacency.abs(), nodes.abs())
    for threshold in (0.0, 1.0):   # dense product, then the sparse one
        graph.SPARSE_DENSITY = threshold
        graph._sparse = None
        assert (graph._sparse_adjacency() is not None) == (density <= threshold)
        assert ((graph.mix(nodes) - old).abs() <= bound).all()
    out = graph(torch.randn(2, g, 5, 5, requires_grad=True))
    out.pow(2).mean().backward()   # the sparse product trains
    assert graph.w_g.grad is not None and graph.encode[0].weight.grad is not None


# ------------------------------------------------------------------------------------ curriculum
def test_curriculum_schedule_values():
    sched = CurriculumSchedule.over_training(30)                 # thirds: 0.25 -> 0.5 -> 1.0
    assert sched.milestones == (0.0, 10.0, 20.0)
    assert [sched.fraction(e) for e in (0, 9, 9.99, 10, 19, 20, 29)] == \
        [0.25, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    custom = CurriculumSchedule(milestones=(5, 8), fractions=(0.4, 0.9))
    assert custom.fraction(0) == 0.4 and custom.fraction(8) == 0.9
    gamma = CurriculumSchedule((0, 2), (0.0, 0.6), mode="threshold")
    assert gamma.fraction(1) == 0.0 and gamma.fraction(3) == 0.6
    with pytest.raises(ValueError):
        CurriculumSchedule((0, 1), (0.5,))
    with pytest.raises(ValueError):
        CurriculumSchedule((2, 1), (0.5, 1.0))
    with pytest.raises(ValueError):
        CurriculumSchedule((0,), (0.0,))                          # a kept fraction of 0


def test_subpatch_entropy_and_layout():
    img = torch.full((1, 3, 64, 64), 0.3)
    img[:, :, 16:32, 32:48] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ent = subpatch_entropy(img, grid=4, bins=64)
    assert ent.shape == (1, 16)
    assert int(ent.argmax()) == 1 * 4 + 2                        # row 1, column 2, row-major
    assert ent[0, 6] > 0.7 and torch.all(ent[0, torch.arange(16) != 6] == 0)
    patches = split_subpatches(img, grid=4, patch_px=8)
    assert patches.shape == (1, 16, 3, 8, 8)
    spread = patches.flatten(2).std(-1)[0]
    assert int(spread.argmax()) == 6 and spread[torch.arange(16) != 6].max() < 1e-6
    # uint8 input is read as 0..255
    assert torch.allclose(subpatch_entropy((img * 255).round().to(torch.uint8), 4), ent,
                          atol=0.05)


def test_select_subpatches_directions():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert select_subpatches(ent, keep_fraction=0.5).tolist() == [[False, True, True, False]]
    assert select_subpatches(ent, keep_fraction=0.5, keep="low").tolist() == \
        [[True, False, False, True]]
    assert select_subpatches(ent, threshold=0.4).tolist() == [[False, True, True, False]]
    assert select_subpatches(ent, threshold=0.95).tolist() == [[False, True, False, False]]
    assert select_subpatches(ent).all()


def test_keep_fraction_changes_attention_mask_and_output():
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg()).train()  # the curriculum acts in training mode only
    b = batch()
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([10, 600])
    sched = CurriculumSchedule.over_training(3)
    with torch.no_grad():
        assert sched.apply(model, epoch=0) == 0.25
        eps_quarter, _ = model(x_t, t, **b)
        mask = model.last_cell_mask
        assert mask.sum(1).tolist() == [4, 4]                   # ceil(0.25 * 16)
        assert mask[:, 12:].all() and not mask[:, :12].any()    # the 4 most complex patches
        weights = model.cell_attention.last_weights             # (B, heads, queries, M)
        assert torch.all(weights[..., :12] == 0)
        assert torch.allclose(weights.sum(-1), torch.ones(()))
        sched.apply(model, epoch=2)
        assert float(model.keep_fraction) == 1.0
        eps_all, _ = model(x_t, t, **b)
        assert model.last_cell_mask.all()
    assert not torch.allclose(eps_quarter, eps_all, atol=1e-6)


def test_entropy_threshold_curriculum():
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg(curriculum_mode="threshold")).train()
    b = batch()
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([10, 600])
    ent = subpatch_entropy(b["image"], GRID)
    kept = []
    with torch.no_grad():
        for gamma in (0.0, float(ent.median()), 0.99):
            model.set_curriculum(entropy_threshold=gamma)
            model(x_t, t, **b)
            kept.append(model.last_cell_mask.sum().item())
            most_complex = ent == ent.max(1, keepdim=True).values
            assert torch.equal(model.last_cell_mask, (ent > gamma) | most_complex)
    assert kept[0] > kept[1] > kept[2] >= 2                       # one patch per image at least
    with pytest.raises(ValueError):
        model.set_curriculum(keep_fraction=0.0)


# ------------------------------------------------------------------------------ whole networks
@pytest.mark.parametrize("overrides", [
    {}, {"cam": False}, {"cigc": False}, {"hierarchical": False},
    {"cam_mode": "spatial", "cam_region": 4}, {"cigc_on": "lr"}, {"fusion_downsample": 2},
    {"keep": "low", "cross_attn_heads": 2}, {"lr_input": True, "rgb_input": True},
    {"tissue_backbone": "resnet10t", "tissue_px": 32},
    {"tissue_backbone": "resnet10t", "tissue_px": 32, "freeze_tissue_backbone": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "full")
def test_ablation_switches_build_and_run(overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(**overrides)
    model = DiffST(G, cfg)
    model.set_adjacency(coexpression_adjacency(np.random.default_rng(0).poisson(2, (50, G))))
    model.set_curriculum(keep_fraction=0.5)
    eps, aux = model(torch.randn(2, G, HR, HR), torch.tensor([3, 900]), **batch())
    assert eps.shape == (2, G, HR, HR) and torch.isfinite(eps).all()
    assert "dis" in aux  # the disentangling network stays without CAM
    assert (model.cam is None) == (not cfg.cam)
    assert model.graph.fixed_identity == (not cfg.cigc)
    assert (model.last_cell_mask is None) == (not cfg.hierarchical)
    (eps.pow(2).mean() + sum(aux.values())).backward()
    if cfg.tissue_backbone and cfg.freeze_tissue_backbone:
        # frozen (the default): no gradient and fixed BatchNorm statistics in training mode
        backbone = model.tissue_encoder.backbone
        assert all(p.grad is None for p in backbone.parameters())
        assert not backbone.training and model.train().tissue_encoder.proj.training
        assert not model.tissue_encoder.backbone.training
        trainable = torch.nn.ModuleDict({n: m for n, m in model.named_children()
                                         if n != "tissue_encoder"})
        assert_all_grads(trainable)
        assert model.tissue_encoder.proj.weight.grad.abs().sum() > 0
    elif cfg.tissue_backbone:
        # timm zero-initialises each residual block's last norm, so the convs inside the blocks
        # get no gradient at step 0; the stem in front of them does
        assert_all_grads(model, may_be_zero="tissue_encoder.backbone.layer")
        assert model.tissue_encoder.backbone.conv1[0].weight.grad.abs().sum() > 0
    else:
        assert_all_grads(model)


def test_registry_style_construction_and_state_dict_roundtrip():
    torch.manual_seed(0)
    model = DiffST(G, **tiny_cfg().to_dict())
    model.set_adjacency(np.array([[1, 0.5, 0.2], [0.5, 1, 0.1], [0.2, 0.1, 1.0]]))
    model.set_curriculum(keep_fraction=0.5, entropy_threshold=0.3)
    rebuilt = DiffST(G, **model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert float(rebuilt.keep_fraction) == 0.5
    assert float(rebuilt.entropy_threshold) == pytest.approx(0.3)
    assert torch.equal(rebuilt.graph.adjacency, model.graph.adjacency)
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model.eval()(x_t, t, **batch())[0], rebuilt.eval()(x_t, t, **batch())[0])
    with pytest.raises(ValueError, match="unknown Diff-ST config"):
        DiffST(G, channels=3)
    with pytest.raises(ValueError, match="cam_mode"):
        DiffST(G, cam_mode="pixel")


def test_conditional_unet_baseline_uses_lr_and_image():
    torch.manual_seed(0)
    model = ConditionalUNet(G, tiny_cfg())
    b = batch()
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([5, 50])
    eps = model(x_t, t, **b)
    assert eps.shape == (2, G, HR, HR)
    eps.pow(2).mean().backward()
    assert_all_grads(model)
    with torch.no_grad():
        assert not torch.allclose(model(x_t, t, b["lr_map"] + 1, b["image"]), eps)
        assert not torch.allclose(model(x_t, t, b["lr_map"], 1 - b["image"]), eps)


@pytest.mark.parametrize("lr_input,rgb_input", [(True, False), (False, True), (True, True)])
def test_direct_inputs_reach_the_unet_input(lr_input, rgb_input):
    """``lr_input`` / ``rgb_input``: the LR map (upsampled) and/or the H&E patch (resized) on the
    HR grid are U-Net input channels beside x_t; with the fused condition held fixed, the output
    still follows them."""
    torch.manual_seed(0)
    cfg = tiny_cfg(lr_input=lr_input, rgb_input=rgb_input)
    model = DiffST(G, cfg).eval()
    plain = DiffST(G, tiny_cfg()).eval()
    widths = [m.in_channels for m in (model.unet, plain.unet)
              for m in [next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d))]]
    extra = (G if lr_input else 0) + (3 if rgb_input else 0)
    assert widths == [G * cfg.gene_node_channels + extra, G * cfg.gene_node_channels]
    b = batch()
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([5, 50])
    with torch.no_grad():
        cond = model.encode_condition(b["lr_map"], b["image"], hr_shape=(HR, HR))
        want = ([F.interpolate(b["lr_map"], (HR, HR), mode="bilinear", align_corners=False)]
                if lr_input else []) + ([F.adaptive_avg_pool2d(b["image"], (HR, HR))]
                                        if rgb_input else [])
        assert torch.allclose(cond.unet_input, torch.cat(want, dim=1))
        out = model(x_t, t, condition=cond)[0]
        assert torch.equal(out, model(x_t, t, **b)[0])
        moved = dataclasses.replace(cond, unet_input=cond.unet_input + 1)
        assert not torch.allclose(model(x_t, t, condition=moved)[0], out)
        with pytest.raises(ValueError, match="rgb_input"):
            model(x_t, t, condition=dataclasses.replace(cond, unet_input=None))


def test_sampling_encodes_the_condition_once():
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg()).eval()
    calls = []
    encode = model.encode_condition

    def counting(*args, **kwargs):
        calls.append(kwargs.get("hr_shape"))
        return encode(*args, **kwargs)

    model.encode_condition = counting
    d = GaussianDiffusion(T=50, clip_x0=(-1, 1))
    stats = d.sample(model, (2, G, HR, HR), batch(), sampler="ddim", steps=4, n_samples=2,
                     generator=torch.Generator().manual_seed(0))
    assert calls == [(HR, HR)]
    assert stats.mean.shape == (2, G, HR, HR) and stats.std.shape == (2, G, HR, HR)
    assert stats.mean.abs().max() <= 1 and (stats.std > 0).any()


def test_overfits_two_samples():
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg(base_channels=16))
    x_hr = torch.rand(2, G, HR, HR, generator=torch.Generator().manual_seed(5)) * 2 - 1
    model.set_adjacency(coexpression_adjacency(((x_hr + 1) / 2).permute(0, 2, 3, 1)
                                               .reshape(-1, G).numpy()))
    cond = batch()
    d = GaussianDiffusion(T=1000)
    t = torch.tensor([50, 400])
    noise = torch.randn(x_hr.shape, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = d.p_losses(model, x_hr, cond, t=t, noise=noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        if losses[-1] < 0.3 * losses[0]:
            break
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# ------------------------------------------------------------------ ablations remove one part
def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("switch, removed", [("cigc", ()), ("cam", ("cam.",)),
                                             ("hierarchical", ("cell_encoder.",
                                                               "cell_attention."))])
def test_ablation_removes_only_its_part(switch, removed):
    """Each ablated model has every parameter of the full model with the same shape, except the
    removed part's own (issue 13: without CIGC Diff-ST used to lose its per-gene stem and three
    quarters of the U-Net input channels; without CAM also the disentangling network)."""
    full, ablated = DiffST(G, tiny_cfg()), DiffST(G, tiny_cfg(**{switch: False}))
    want = {n: s for n, s in _shapes(full).items() if not n.startswith(removed)}
    assert _shapes(ablated) == want
    assert removed or sum(p.numel() for p in ablated.parameters()) == \
        sum(p.numel() for p in full.parameters())
    assert ablated.unet.conv_in.in_channels == full.unet.conv_in.in_channels == G * 4
    # the condition map the U-Net gets has the same channels and grid
    b = batch()
    with torch.no_grad():
        cond_full = full.eval().encode_condition(**b, hr_shape=(HR, HR))
        cond_abl = ablated.eval().encode_condition(**b, hr_shape=(HR, HR))
    assert cond_full.features.shape == cond_abl.features.shape
    assert set(cond_full.aux) == set(cond_abl.aux) == {"dis"}


def test_cigc_ablation_keeps_an_identity_graph():
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg(cigc=False))
    model.set_adjacency(np.ones((G, G)))
    assert torch.equal(model.graph.adjacency, torch.eye(G))
    full = DiffST(G, tiny_cfg())
    full.load_state_dict(model.state_dict())   # same layers: the weights transfer
    full.set_adjacency(np.ones((G, G)))
    x = torch.randn(1, G, HR, HR)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        own, other = model.graph(x), model.graph(x2)
        coupled, coupled2 = full.graph(x), full.graph(x2)
    assert torch.equal(own[:, 1:], other[:, 1:])           # genes are not coupled
    assert not torch.allclose(coupled[:, 1:], coupled2[:, 1:])


def test_inference_and_validation_use_every_subpatch():
    """A model whose curriculum state keeps a quarter of its sub-patches (the state saved with an
    early best epoch) attends to all of them in eval mode; training mode follows the curriculum."""
    torch.manual_seed(0)
    model = DiffST(G, tiny_cfg())
    model.set_curriculum(keep_fraction=0.25)
    x_t, t = torch.randn(2, G, HR, HR), torch.tensor([10, 600])
    with torch.no_grad():
        model.train()
        model(x_t, t, **batch())
        assert model.last_cell_mask.sum(1).tolist() == [4, 4]
        model.eval()
        eps_eval, _ = model(x_t, t, **batch())
        assert model.last_cell_mask.all()
        model.set_curriculum(keep_fraction=1.0)
        eps_all, _ = model(x_t, t, **batch())
    assert torch.equal(eps_eval, eps_all)
