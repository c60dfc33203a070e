"""Super-resolution task layer: Diff-ST and baselines trained, predicted and scored end to end on
tiny synthetic pairs; curriculum, gene graph, validation split, atomic outputs, signed PCC."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from histomap.data import srmaps
from histomap.data.slide import write_pyramid
from histomap.data.srpairs.dataset import SRPairDataset
from histomap.data.srpairs.normalisation import denormalise
from histomap.data.srpairs.points import build_sr_pairs
from histomap.data.srpairs.spot_grid import build_spot_grid_pairs
from histomap.data.srpairs.store import read_sr_pairs
from histomap.data.synthetic import simulate_sample
from histomap.data.srpairs.mass import block_sums, lr_counts_of
from histomap.evaluation import srmetrics as sr_metrics
from histomap.evaluation import srreport as sr_report
from histomap.models.diffst import DiffST, normalize_adjacency
from histomap.models.diffusion import GaussianDiffusion
from histomap.tasks.superres import methods as sr_methods
from histomap.tasks.superres import prediction as sr_prediction
from histomap.tasks.superres.bin_centres import hr_pixel_centres
from histomap.tasks.superres.methods import build_sr_model, is_trainable
from histomap.tasks.superres.model_file import load_sr_model
from histomap.tasks.superres.objectives import (
    DiffusionObjective,
    DiffusionTarget,
    ValueRange,
    masked_mse,
)
from histomap.tasks.superres.prediction import predict_sr
from histomap.tasks.superres.sampling import (
    SR_BATCH_CHAINS_CPU,
    SR_CPU_BF16_DEFAULT,
    predict_chains,
    sampling_modes,
)
from histomap.tasks.superres.sampling_speed import time_sampling
from histomap.tasks.superres.training import train_sr
from histomap.tasks.superres.training_data import split_patches, training_adjacency

N_GENES = 5
DIFFST_CFG = dict(base_channels=8, channel_mult=[1, 2], tissue_channels=8, cell_channels=8,
                  attn_channels=8, fusion_channels=8, gene_node_channels=4, cell_grid=4,
                  cell_patch_px=8, cam_region=3)
TRAIN = dict(epochs=3, batch_size=4, lr=2e-3, weight_decay=0.0, patience=5, amp=False,
             device="cpu")
VALIDATION = {"fraction": 0.2, "block_um": 80}
DIFFUSION = {"T": 100}


# --------------------------------------------------------------------------- fake baselines
class _Baseline(nn.Module):
    trainable = False

    def __init__(self, n_genes: int, **cfg):
        super().__init__()
        self.n_genes, self._cfg = n_genes, dict(cfg)

    @property
    def config(self) -> dict:
        return dict(self._cfg)


class FakeBicubic(_Baseline):
    def forward(self, lr_up, image, lr=None):
        return lr_up


class FakeNegated(_Baseline):
    def forward(self, lr_up, image, lr=None):
        return -lr_up


class FakeConstant(_Baseline):
    def forward(self, lr_up, image, lr=None):
        return torch.zeros_like(lr_up)


class FakeConvNet(_Baseline):
    """Trainable: a 3x3 conv over (lr_up, image resized to the HR grid), residual on lr_up."""
    trainable = True

    def __init__(self, n_genes: int, width: int = 8):
        super().__init__(n_genes, width=width)
        self.net = nn.Sequential(nn.Conv2d(n_genes + 3, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, n_genes, 3, padding=1))

    def forward(self, lr_up, image, lr=None):
        img = F.interpolate(image, size=lr_up.shape[-2:], mode="area")
        return lr_up + self.net(torch.cat([lr_up, img], dim=1))


FAKES = {"bicubic": FakeBicubic, "negated": FakeNegated, "constant": FakeConstant,
         "unet": FakeConvNet}


@pytest.fixture(autouse=True)
def fake_baselines(monkeypatch):
    """The baselines module is written separately; these stand-ins follow its interface."""
    fake = SimpleNamespace(SR_BASELINES=FAKES,
                           build_sr_baseline=lambda name, n, **cfg: FAKES[name](n, **cfg))
    monkeypatch.setattr(sr_methods, "_baselines", lambda: fake)


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """400 x 400 um synthetic section; its 5 most expressed genes."""
    folder = tmp_path_factory.mktemp("syn") / "sample"
    simulate_sample(folder, seed=12, size_um=(400.0, 400.0), n_genes=40)
    cells = ad.read_h5ad(folder / "cells.h5ad")
    totals = np.asarray(cells.X.sum(axis=0)).ravel()
    genes = [str(g) for g in cells.var_names[np.argsort(-totals)[:N_GENES]]]
    return cells, folder / "he.tif", genes


def _pairs(synthetic, out, cells=None, **kw):
    base_cells, slide, genes = synthetic
    args = dict(patch_um=160, lr_um=20, scale=4, stride_um=80, min_tissue=0.2,
                normalisation="minmax", image_mpp=5.0, edge="ceil")
    args.update(kw)
    build_sr_pairs(base_cells if cells is None else cells, slide, genes, out, **args)
    return out


@pytest.fixture(scope="module")
def pairs(synthetic, tmp_path_factory):
    """Training pairs: 32 x 32 HR (5 um), 8 x 8 LR (20 um), overlapping patches."""
    return _pairs(synthetic, tmp_path_factory.mktemp("pairs") / "train.zarr")


@pytest.fixture(scope="module")
def other_pairs(synthetic, tmp_path_factory):
    """Pairs of a different 'section': the same cells with the genes' counts shuffled."""
    cells, _, genes = synthetic
    shuffled = cells.copy()
    x = shuffled.X.toarray()
    idx = [list(cells.var_names).index(g) for g in genes]
    x[:, idx] = x[np.random.default_rng(0).permutation(len(x))][:, idx[::-1]]
    shuffled.X = sp.csr_matrix(x)
    return _pairs(synthetic, tmp_path_factory.mktemp("pairs") / "other.zarr", cells=shuffled)


@pytest.fixture(scope="module")
def trained_diffst(pairs, tmp_path_factory):
    """Diff-ST trained 3 epochs with the 0.25 -> 0.5 -> 1.0 curriculum (module-wide)."""
    folder = tmp_path_factory.mktemp("diffst")
    torch.set_num_threads(1)
    epochs = []
    summary = train_sr(
        "diffst", [pairs], model_cfg={**DIFFST_CFG, "curriculum": {"values": [0.25, 0.5, 1.0]}},
        train_cfg=TRAIN, validation=VALIDATION, seed=0, out_model=folder / "model.pt",
        out_log=folder / "train_log.csv", checkpoint_dir=folder / "ckpt", diffusion=DIFFUSION,
        variant="diffst", on_epoch_end=epochs.append)
    return SimpleNamespace(folder=folder, model=folder / "model.pt", summary=summary,
                           log=pd.read_csv(folder / "train_log.csv"), epochs=epochs)


# --------------------------------------------------------------------------- training
def test_curriculum_takes_effect_and_is_logged(trained_diffst):
    log_df = trained_diffst.log
    assert list(log_df["epoch"]) == [1, 2, 3]
    assert list(log_df["keep_fraction"]) == [0.25, 0.5, 1.0]
    # the model really attended to that share of its 16 sub-patches in each epoch
    np.testing.assert_allclose(log_df["kept_observed"], [0.25, 0.5, 1.0], atol=1e-6)
    assert log_df["kept_observed"].nunique() == 3
    assert (log_df["dis"] > 0).all() and (log_df["denoise"] > 0).all()
    assert np.isfinite(log_df["val_loss"]).all()
    assert [e["keep_fraction"] for e in trained_diffst.epochs] == [0.25, 0.5, 1.0]


def test_adjacency_comes_from_training_patches_only(trained_diffst, pairs, other_pairs):
    model, meta = load_sr_model(trained_diffst.model)
    assert isinstance(model, DiffST) and meta["train_pairs"] == [str(pairs)]
    train_idx = [tr for tr, _ in split_patches([pairs], seed=0, **VALIDATION)]
    expected = training_adjacency([pairs], train_idx, seed=0)
    np.testing.assert_allclose(meta["adjacency"].numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.graph.adjacency.numpy(),
                               normalize_adjacency(torch.as_tensor(expected,
                                                                   dtype=torch.float32)).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert bool(model.graph.adjacency_set)
    # with validation patches or another section's patches the graph would differ
    everything = training_adjacency([pairs], [np.arange(len(read_sr_pairs(pairs)[0]
                                                                    ["hr"]))], seed=0)
    other = training_adjacency([pairs, other_pairs],
                                       [train_idx[0], np.arange(4)], seed=0)
    assert not np.allclose(everything, expected) and not np.allclose(other, expected)


def test_validation_patches_are_spatially_separate(pairs):
    (train, val), = split_patches([pairs], seed=0, **VALIDATION)
    arrays, attrs = read_sr_pairs(pairs)
    assert len(val) and len(train) and not set(train) & set(val)
    origin = arrays["origin_um"]
    side = attrs["patch_um"]
    for t in train:  # no training patch shares tissue with a validation patch
        assert (np.abs(origin[val] - origin[t]) >= side - 1e-6).any(axis=1).all()


def test_one_batch_overfit_diffst(pairs):
    torch.manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1]),
                                                  batch_size=2)))
    model = DiffST(N_GENES, **{**DIFFST_CFG, "base_channels": 16})
    model.set_adjacency(training_adjacency([pairs], [np.array([0, 1])]))
    objective = DiffusionObjective(
        GaussianDiffusion(T=100), ValueRange(), schedule=None, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fixed = torch.Generator().manual_seed(3)
    state = fixed.get_state()
    losses = []
    model.train()
    for _ in range(150):
        fixed.set_state(state)  # the same t and noise every step: one batch, one target
        out = objective.diffusion.p_losses(
            model, objective.vrange.to_model(batch["hr"]),
            {"lr_map": objective.vrange.to_model(batch["lr_up"]), "image": batch["image"]},
            mask=batch["mask"][:, None], generator=fixed)
        opt.zero_grad()
        out["denoise"].backward()
        opt.step()
        losses.append(out["denoise"].item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.2 * losses[0], losses[::15]


def test_validation_loss_uses_every_subpatch_at_every_stage(pairs, trained_diffst):
    """Issue 13: the validation loss that picks the checkpoint is computed with every sub-patch
    at every curriculum stage (the early stages keep a quarter in training only), and the saved
    model predicts with every sub-patch."""
    from histomap.models.diffst import CurriculumSchedule

    torch.manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1]),
                                                  batch_size=2)))
    model = DiffST(N_GENES, **DIFFST_CFG)
    objective = DiffusionObjective(
        GaussianDiffusion(T=100), ValueRange(),
        schedule=CurriculumSchedule.over_training(3), seed=0)
    losses = []
    for stage in (0, 1, 2):
        objective.epoch = stage
        model.eval()
        with torch.no_grad():
            losses.append(float(objective(model, batch, torch.device("cpu"))))
        assert model.last_cell_mask.all()
        model.train()
        objective(model, batch, torch.device("cpu"))
        assert model.last_cell_mask.float().mean().item() == [0.25, 0.5, 1.0][stage]
    assert losses[0] == losses[1] == losses[2]  # same weights, same t and noise: same loss
    loaded, _ = load_sr_model(trained_diffst.model)
    assert float(loaded.keep_fraction) == 1.0


def test_trainable_baseline_fits_with_masked_mse(pairs, tmp_path):
    summary = train_sr(
        "unet", [pairs], model_cfg={"width": 8}, train_cfg={**TRAIN, "epochs": 4},
        validation=VALIDATION, seed=0, out_model=tmp_path / "model.pt",
        out_log=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt")
    log_df = pd.read_csv(tmp_path / "log.csv")
    assert summary["trainable"] and len(log_df) == 4
    assert log_df["train_loss"].iloc[-1] < log_df["train_loss"].iloc[0]
    model, meta = load_sr_model(tmp_path / "model.pt")
    assert meta["trainable"] and meta["model_config"] == {"width": 8}
    assert isinstance(model, FakeConvNet)


def test_flip_augmentation_is_a_training_option(pairs, tmp_path):
    """``train.augment`` flips the training patches (not a TrainConfig field: it is taken out
    before, saved with the model and part of the fingerprint); off, the run is unchanged."""
    states = {}
    for augment in (False, True):
        out = tmp_path / str(augment)
        train_sr("unet", [pairs], model_cfg={"width": 8},
                         train_cfg={**TRAIN, "epochs": 2, "augment": augment},
                         validation=VALIDATION, seed=0, out_model=out / "model.pt",
                         out_log=out / "log.csv", checkpoint_dir=out / "ckpt")
        model, meta = load_sr_model(out / "model.pt")
        assert meta["train"]["augment"] == ("flips" if augment else False)
        states[augment] = model.state_dict()
    assert any(not torch.equal(states[False][k], states[True][k]) for k in states[False])


def test_dihedral_augmentation_moves_every_map_and_the_image_together(pairs):
    """``augment: dihedral``: flips and quarter turns, the same for the HR, LR and upsampled LR
    maps, the mask and the H&E; an LR pixel still sums the HR block it covers."""
    plain = SRPairDataset(pairs, indices=[0])[0]
    seen = set()
    turned = SRPairDataset(pairs, indices=[0], augment="dihedral")
    torch.manual_seed(0)
    for _ in range(40):
        item = turned[0]
        for k in range(4):
            for flip in (False, True):
                base = {key: plain[key].flip(-1) if flip else plain[key]
                        for key in ("hr", "lr", "lr_up", "image", "mask")}
                moved = {key: torch.rot90(v, k, dims=(-2, -1)) for key, v in base.items()}
                if all(torch.equal(moved[key], item[key]) for key in moved):
                    seen.add((k, flip))
    # the 8 symmetries of the square are all drawn (a flip up-down is a turn and a flip)
    assert len(seen) == 8
    with pytest.raises(ValueError, match="superres.train.augment"):
        SRPairDataset(pairs, augment="rotate")


def test_max_patches_trains_on_a_fixed_subset_of_the_training_patches():
    from histomap.tasks.superres.training_data import limit_training_patches

    splits = [(np.arange(10), np.array([10, 11])), (np.arange(6), np.array([], int))]
    small = limit_training_patches(splits, 5, seed=3)
    assert sum(len(tr) for tr, _ in small) == 5
    assert all(set(tr) <= set(full) for (tr, _), (full, _) in zip(small, splits))
    assert [list(va) for _, va in small] == [[10, 11], []]      # validation untouched
    again = limit_training_patches(splits, 5, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(small, again))
    assert limit_training_patches(splits, 100, seed=3) is splits
    assert limit_training_patches(splits, None, seed=3) is splits
    with pytest.raises(ValueError, match="max_patches"):
        limit_training_patches(splits, 0, seed=3)


def test_sections_with_different_he_sizes_train_together(synthetic, pairs, tmp_path):
    """Spot-grid sections differ by a pixel in H&E patch size; batches mix sections, so every
    patch is resized to the most common size, which prediction reuses."""
    other = _pairs(synthetic, tmp_path / "other.zarr", image_mpp=4.8)
    sizes = [tuple(read_sr_pairs(p, lazy=True)[0]["he"].shape[-2:]) for p in
             (pairs, other)]
    assert sizes[0] != sizes[1]
    train = {**TRAIN, "epochs": 1, "batch_size": 64}  # one batch holds patches of both
    train_sr("unet", [pairs, pairs, other], model_cfg={"width": 8}, train_cfg=train,
                     validation={"fraction": 0.0, "block_um": 80}, seed=0,
                     out_model=tmp_path / "model.pt", out_log=tmp_path / "log.csv",
                     checkpoint_dir=tmp_path / "ckpt")
    _, meta = load_sr_model(tmp_path / "model.pt")
    assert tuple(meta["pairs"]["image_hw"]) == sizes[0]
    item = SRPairDataset(other, image_hw=sizes[0])[0]
    assert tuple(item["image"].shape) == (3, *sizes[0])
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_masked_mse_ignores_pixels_outside_the_mask():
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[..., 0, 0] = 100.0  # wrong only outside the mask
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    assert masked_mse(pred, target, mask).item() == 0.0
    mask[0, 0, 0] = True
    assert masked_mse(pred, target, mask).item() == pytest.approx(2 * 100.0 ** 2 / 32)


def test_untrainable_method_saves_config_only(pairs, tmp_path):
    summary = train_sr("bicubic", [pairs], model_cfg={}, train_cfg=TRAIN,
                               validation=VALIDATION, seed=0, out_model=tmp_path / "m.pt",
                               out_log=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt")
    assert summary == {"trainable": False}
    assert not (tmp_path / "ckpt").exists()
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["state_dict"] == {} and payload["method"] == "bicubic"
    assert pd.read_csv(tmp_path / "log.csv").empty


def test_resumed_training_continues_the_curriculum(pairs, tmp_path):
    kwargs = dict(model_cfg={**DIFFST_CFG, "curriculum": {"values": [0.25, 0.5, 1.0]}},
                  train_cfg=TRAIN, validation=VALIDATION, seed=0, out_model=tmp_path / "m.pt",
                  out_log=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt",
                  diffusion=DIFFUSION)

    def killed(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sr("diffst", [pairs], on_epoch_end=killed, **kwargs)
    assert not (tmp_path / "m.pt").exists()
    seen = []
    train_sr("diffst", [pairs], on_epoch_end=seen.append, **kwargs)
    assert [r["epoch"] for r in seen] == [3] and seen[0]["kept_observed"] == 1.0
    log_df = pd.read_csv(tmp_path / "log.csv")
    assert list(log_df["keep_fraction"]) == [0.25, 0.5, 1.0]


# --------------------------------------------------------------------------- prediction
def test_diffst_predict_maps_bins_and_evaluate(trained_diffst, pairs, tmp_path, caplog):
    maps, bins = tmp_path / "maps.zarr", tmp_path / "bins.h5ad"
    info = predict_sr(trained_diffst.model, pairs, maps, bins, sampler="respaced",
                              steps=4, n_samples=2, batch_size=3, device="cpu", seed=1,
                              sample="S1")
    arrays, attrs = read_sr_pairs(pairs)
    out, m_attrs = srmaps.read_sr_maps(maps)
    n, g, h, w = arrays["hr"].shape
    assert info["n_patches"] == n and m_attrs["steps"] == 4 and m_attrs["n_samples"] == 2
    assert m_attrs["hr_um"] == attrs["hr_um"] and m_attrs["genes"] == attrs["genes"]
    # how it was computed: chains batched by default, fp32 on the CPU, the torch threads
    assert m_attrs["batch_chains"] is SR_BATCH_CHAINS_CPU and m_attrs["device"] == "cpu"
    assert m_attrs["autocast"] is None and m_attrs["threads"] == torch.get_num_threads()
    # the maps as sampled (pred_raw) lie in the min-max range; the delivered ones are
    # mass-projected: every full LR block of predicted counts adds up to the LR pixel's counts
    assert m_attrs["mass_projection"] is True
    pred, std = out["pred_raw"][...], out["pred_std"][...]
    assert pred.shape == (n, g, h, w) and np.isfinite(pred).all()
    assert (std > 0).mean() > 0.5 and pred.min() >= -1e-5 and pred.max() <= 1 + 1e-5
    s2 = attrs["scale"] ** 2
    lr_counts = lr_counts_of(arrays, attrs)
    for i in range(n):
        full = (np.array(out["pred_counts"][i].shape[-2:]) // attrs["scale"])
        sums = block_sums(out["pred_counts"][i], attrs["scale"], arrays["lr"][i].shape[-2:])
        np.testing.assert_allclose(sums[:, :full[0], :full[1]],
                                   lr_counts(i)[:, :full[0], :full[1]], rtol=1e-5, atol=1e-4)
    for i in range(n):  # counts: min-max undone with the LR patch's range / scale^2 (linear)
        np.testing.assert_allclose(
            out["pred_counts_raw"][i], denormalise(pred[i], "minmax", lo=arrays["lr_min"][i] / s2,
                                               hi=arrays["lr_max"][i] / s2), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["pred_std_counts"][i],
                                   std[i] * (arrays["lr_max"][i] - arrays["lr_min"][i])
                                   [:, None, None] / s2, rtol=1e-3, atol=1e-4)
    adata = ad.read_h5ad(bins)
    assert adata.n_obs == arrays["mask"].sum() and list(adata.var_names) == attrs["genes"]
    assert {"pred", "truth", "truth_counts", "pred_std", "pred_std_counts"} <= set(adata.layers)
    first = adata[adata.obs["patch"] == 0]
    mask0 = arrays["mask"][0]
    np.testing.assert_allclose(first.layers["truth"], arrays["hr"][0][:, mask0].T, rtol=1e-6)
    np.testing.assert_allclose(first.layers["pred"], out["pred"][0][:, mask0].T, rtol=1e-6)
    # bin centres: the HR pixel's centre in level-0 px
    side = attrs["hr_um"] / attrs["slide_mpp"]
    i, j = int(first.obs["i"].iloc[0]), int(first.obs["j"].iloc[0])
    np.testing.assert_allclose(first.obsm["spatial"][0],
                               arrays["origin_px"][0] + (np.array([j, i]) + 0.5) * side)
    assert (adata.obs["sample"] == "S1").all()

    with caplog.at_level(logging.WARNING, logger="histomap.tasks.superres"):
        summary = sr_metrics.evaluate_sr([pairs], [maps], tmp_path / "m.parquet",
                                      tmp_path / "m.csv", method="diffst", scale=4, dataset="syn",
                                      samples=["S1"], folds=["F1"])
    per_gene = pd.read_parquet(tmp_path / "m.parquet")
    # scored as delivered (mass-projected) and as sampled
    assert len(per_gene) == 2 * n * g and set(per_gene["mass_projection"]) == {True, False}
    assert {"RMSE", "PCC", "RMSE_counts", "PCC_counts", "Spearman_std_error", "edge_error_ratio",
            "mass_ratio"} == set(summary["metric"])
    assert set(summary["fold"]) == {"F1", "all"} and set(per_gene["fold"]) == {"F1"}
    summary = summary[(summary["fold"] == "all") & ~summary["mass_projection"].astype(bool)]
    per_gene = per_gene[~per_gene["mass_projection"]]
    rmse = summary.set_index("metric").loc["RMSE", "value"]
    # by hand: per gene over the patch's tissue pixels, mean over genes, then over patches
    by_patch = [np.mean([np.sqrt(np.mean((pred[i, j][arrays["mask"][i]]
                                          - arrays["hr"][i, j][arrays["mask"][i]]) ** 2))
                         for j in range(g)]) for i in range(n) if arrays["mask"][i].any()]
    assert rmse == pytest.approx(np.mean(by_patch), rel=1e-5)
    n_nan = int(per_gene["pcc"].isna().sum())
    assert summary.set_index("metric").loc["PCC", "n_nan_pcc"] == n_nan
    assert (f"{2 * n_nan} of {2 * n * g}" in caplog.text) == (n_nan > 0)


def test_baseline_predict_is_lr_up_and_scores_by_hand(synthetic, pairs, tmp_path):
    train_sr("bicubic", [pairs], model_cfg={}, train_cfg=TRAIN, validation=VALIDATION,
                     seed=0, out_model=tmp_path / "m.pt", out_log=tmp_path / "l.csv",
                     checkpoint_dir=tmp_path / "ckpt")
    predict_sr(tmp_path / "m.pt", pairs, tmp_path / "maps.zarr", tmp_path / "b.h5ad",
                       device="cpu", mass_projection=False)
    out, attrs = srmaps.read_sr_maps(tmp_path / "maps.zarr")
    assert "pred_std" not in out and attrs["sampler"] is None and "pred_raw" not in out
    ds = SRPairDataset(pairs)
    np.testing.assert_allclose(out["pred"][2], ds[2]["lr_up"].numpy(), rtol=1e-6, atol=1e-7)
    table = sr_metrics.evaluate_maps(pairs, tmp_path / "maps.zarr")
    arrays, _ = read_sr_pairs(pairs)
    mask = arrays["mask"][2]
    truth, pred = arrays["hr"][2][0][mask], out["pred"][2][0][mask]
    row = table[(table["patch"] == 2) & (table["gene"] == attrs["genes"][0])].iloc[0]
    assert row["rmse"] == pytest.approx(np.sqrt(np.mean((truth - pred) ** 2)), rel=1e-5)
    assert row["pcc"] == pytest.approx(np.corrcoef(truth, pred)[0, 1], rel=1e-5)
    assert row["n_pixels"] == mask.sum()
    # counts: the written count map against the raw HR counts of the same patch (pairs built
    # without normalisation), numpy on both
    raw_path = _pairs(synthetic, tmp_path / "raw.zarr", normalisation="none")
    raw, _ = read_sr_pairs(raw_path)
    np.testing.assert_array_equal(raw["origin_px"], arrays["origin_px"])
    truth_c, pred_c = raw["hr"][2][0][mask], out["pred_counts"][2][0][mask]
    assert row["rmse_counts"] == pytest.approx(np.sqrt(np.mean((truth_c - pred_c) ** 2)),
                                               rel=1e-5)
    assert row["pcc_counts"] == pytest.approx(np.corrcoef(truth_c, pred_c)[0, 1], rel=1e-5)


def _bicubic_model(pairs_zarr, folder):
    train_sr("bicubic", [pairs_zarr], model_cfg={}, train_cfg=TRAIN,
                     validation=VALIDATION, seed=0, out_model=folder / "m.pt",
                     out_log=folder / "l.csv", checkpoint_dir=folder / "ckpt")
    return folder / "m.pt"


@pytest.mark.parametrize("normalisation", ["minmax", "log1p"])
def test_predictions_never_use_the_truth(synthetic, tmp_path, normalisation):
    """Issue 13: predicted maps and predicted counts depend on the inputs only. Changing the HR
    truth and its stored statistics (min/max, libraries) of the pairs changes no prediction
    (the old de-normalisation scaled predictions with the truth's min/max or library)."""
    import shutil

    import zarr

    pairs_zarr = _pairs(synthetic, tmp_path / "p.zarr", normalisation=normalisation)
    model = _bicubic_model(pairs_zarr, tmp_path)
    predict_sr(model, pairs_zarr, tmp_path / "a.zarr", tmp_path / "a.h5ad", device="cpu")
    changed = tmp_path / "changed.zarr"
    shutil.copytree(pairs_zarr, changed)
    root = zarr.open_group(changed, mode="r+")
    root["hr"][...] = np.asarray(root["hr"][...]) * 0.5 + 0.25
    for name in ("hr_min", "hr_max", "hr_library"):
        if name in root:
            root[name][...] = np.asarray(root[name][...]) * 3.0 + 1.0
    predict_sr(model, changed, tmp_path / "b.zarr", tmp_path / "b.h5ad", device="cpu")
    a, _ = srmaps.read_sr_maps(tmp_path / "a.zarr")
    b, _ = srmaps.read_sr_maps(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a["pred"][...], b["pred"][...])
    np.testing.assert_array_equal(a["pred_counts"][...], b["pred_counts"][...])


def test_log1p_units_come_from_the_training_sections(synthetic, tmp_path):
    """A test section sequenced twice as deep has the same library fractions: in the model's
    units (target sum of its training pairs) its truth and its scores are the same. With each
    section's own target sum (the old pairs) they differed."""
    cells = synthetic[0]
    deep = cells.copy()
    deep.X = deep.X * 2
    train = _pairs(synthetic, tmp_path / "train.zarr", normalisation="log1p")
    test = _pairs(synthetic, tmp_path / "test.zarr", normalisation="log1p")
    test_deep = _pairs(synthetic, tmp_path / "deep.zarr", cells=deep, normalisation="log1p")
    arrays, attrs = read_sr_pairs(train)
    _, deep_attrs = read_sr_pairs(test_deep)
    assert deep_attrs["hr_target_sum"] == pytest.approx(2 * attrs["hr_target_sum"])
    model = _bicubic_model(train, tmp_path)
    _, meta = load_sr_model(model)
    want = float(np.median(arrays["hr_library"][arrays["mask"] & (arrays["hr_library"] > 0)]))
    assert meta["pairs"]["target_sum"] == pytest.approx(want)
    tables = []
    for name, pairs_zarr in (("same", test), ("deep", test_deep)):
        maps = tmp_path / f"{name}.maps.zarr"
        predict_sr(model, pairs_zarr, maps, tmp_path / f"{name}.h5ad", device="cpu")
        assert srmaps.read_sr_maps(maps)[1]["target_sum"] == pytest.approx(want)
        tables.append(sr_metrics.evaluate_maps(pairs_zarr, maps))
    np.testing.assert_allclose(tables[0]["rmse"], tables[1]["rmse"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(tables[0]["pcc"], tables[1]["pcc"], rtol=1e-3, atol=1e-5)
    # counts: the measured counts and the LR-derived predicted counts both double
    np.testing.assert_allclose(tables[1]["rmse_counts"], 2 * tables[0]["rmse_counts"],
                               rtol=1e-3, atol=1e-4)


def test_pcc_is_signed_and_constant_maps_are_counted(pairs, tmp_path, caplog):
    rng = np.random.default_rng(0)
    truth = rng.random((2, 6, 6))
    mask = np.ones((6, 6), bool)
    rmse, pcc, n = sr_metrics.patch_gene_metrics(truth, -truth, mask)
    np.testing.assert_allclose(pcc, -1.0)
    assert n == 36  # the error is -2 truth, so RMSE = 2 sqrt(mean(truth^2)) per gene
    np.testing.assert_allclose(rmse, 2 * np.sqrt((truth ** 2).mean(axis=(1, 2))), rtol=1e-12)
    _, pcc, _ = sr_metrics.patch_gene_metrics(truth, np.zeros_like(truth), mask)
    assert (pcc == 0).all(), "a flat prediction scores 0"
    _, pcc, _ = sr_metrics.patch_gene_metrics(np.ones_like(truth), truth, mask)
    assert np.isnan(pcc).all(), "constant truth: no PCC, left out"

    summaries = {}
    for method in ("bicubic", "negated", "constant"):
        folder = tmp_path / method
        train_sr(method, [pairs], model_cfg={}, train_cfg=TRAIN, validation=VALIDATION,
                         seed=0, out_model=folder / "m.pt", out_log=folder / "l.csv",
                         checkpoint_dir=folder / "ckpt")
        predict_sr(folder / "m.pt", pairs, folder / "maps.zarr", folder / "b.h5ad",
                           device="cpu", mass_projection=False)
        with caplog.at_level(logging.WARNING, logger="histomap.tasks.superres"):
            summaries[method] = sr_metrics.evaluate_sr(
                [pairs], [folder / "maps.zarr"], folder / "m.parquet", folder / "m.csv",
                method=method, scale=4, dataset="syn", samples=["S1"], folds=["F1"]
            ).query("fold == 'all'").set_index("metric")
    assert summaries["bicubic"].loc["PCC", "value"] > 0.2
    assert summaries["negated"].loc["PCC", "value"] == pytest.approx(
        -summaries["bicubic"].loc["PCC", "value"], abs=1e-6)
    n = len(read_sr_pairs(pairs)[0]["hr"])
    constant, bicubic = summaries["constant"].loc["PCC"], summaries["bicubic"].loc["PCC"]
    assert constant["value"] == 0, "a constant map scores PCC 0, it is not dropped"
    # genes constant in the truth are left out for every method alike, and counted
    assert constant["n_nan_pcc"] == bicubic["n_nan_pcc"]
    assert constant["n_pcc_scored"] + constant["n_nan_pcc"] == n * N_GENES
    assert constant["n_nan_patches"] == bicubic["n_nan_patches"] < n

    # two held-out samples (two folds): every patch of each counts once
    both = sr_metrics.evaluate_sr([pairs, pairs], [tmp_path / "bicubic" / "maps.zarr"] * 2,
                               tmp_path / "two.parquet", tmp_path / "two.csv", method="bicubic",
                               scale=4, dataset="syn", samples=["S1", "S2"], folds=["F1", "F2"])
    pooled = both[both["fold"] == "all"].set_index("metric")
    assert pooled.loc["PCC", "n_patches"] == 2 * n
    assert pooled.loc["PCC", "value"] == pytest.approx(summaries["bicubic"].loc["PCC", "value"])
    assert set(both["fold"]) == {"F1", "F2", "all"}

    table = sr_report.sr_tables([tmp_path / m / "m.parquet" for m in summaries],
                              tmp_path / "superres.csv", tmp_path / "superres.md",
                              methods=["bicubic", "negated", "constant"],
                              ablations=["negated"], reference="bicubic")
    assert set(table["units"]) == {sr_report.SR_UNITS["minmax"], sr_report.SR_COUNTS_UNITS}
    md = (tmp_path / "superres.md").read_text()
    assert "| method | syn 4x RMSE | syn 4x PCC |" in md and "## Ablations" in md
    assert "| constant |" in md
    assert f"constant syn 4x: {n * N_GENES - int(bicubic['n_nan_pcc'])} / " in md
    csv = pd.read_csv(tmp_path / "superres.csv")
    row = csv[(csv.method == "negated") & (csv.metric == "PCC")
              & (csv.units == sr_report.SR_UNITS["minmax"])]
    assert row["value"].iloc[0] < 0 and row["n_patches"].iloc[0] == n


def test_sr_table_names_its_unit_and_counts_dropped_and_nan_patches(synthetic, tmp_path):
    """The SR CSV carries the unit (the paper's per-patch min-max is named as its protocol),
    patches dropped when the pairs were built, patches without a defined PCC and whether a
    method reads the LR map; the markdown says the min-max RMSE depends on the truth's range."""
    pairs_zarr = _pairs(synthetic, tmp_path / "p.zarr", min_tissue=0.9)
    _, attrs = read_sr_pairs(pairs_zarr)
    assert attrs["n_patches_dropped"] > 0
    model = _bicubic_model(pairs_zarr, tmp_path)
    predict_sr(model, pairs_zarr, tmp_path / "maps.zarr", tmp_path / "b.h5ad",
                       device="cpu")
    sr_metrics.evaluate_sr([pairs_zarr, pairs_zarr], [tmp_path / "maps.zarr"] * 2,
                           tmp_path / "m.parquet", tmp_path / "m.csv", method="bicubic", scale=4,
                           dataset="syn", samples=["S1", "S2"], folds=["F1", "F2"])
    sr_report.sr_tables([tmp_path / "m.parquet"], tmp_path / "sr.csv", tmp_path / "sr.md",
                        methods=["bicubic"])
    csv = pd.read_csv(tmp_path / "sr.csv")
    for column in ("n_dropped_patches", "n_nan_patches", "n_nan_pcc", "uses_lr_map", "units"):
        assert column in csv.columns
    assert (csv["n_dropped_patches"] == 2 * attrs["n_patches_dropped"]).all()
    assert csv["uses_lr_map"].all()
    assert set(csv["units"]) == {"per-patch min-max (paper protocol)",
                                 sr_report.SR_COUNTS_UNITS}
    md = (tmp_path / "sr.md").read_text()
    assert "paper protocol" in md and "depends on the truth's range" in md
    assert f"syn 4x: {2 * attrs['n_patches_dropped']}" in md


def test_failed_prediction_leaves_no_files(trained_diffst, pairs, synthetic, tmp_path,
                                          monkeypatch):
    real = predict_chains
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated failure in the second batch")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(sr_prediction, "predict_chains", failing)
    maps, bins = tmp_path / "out" / "maps.zarr", tmp_path / "out" / "bins.h5ad"
    with pytest.raises(RuntimeError, match="second batch"):
        predict_sr(trained_diffst.model, pairs, maps, bins, steps=2, n_samples=1,
                           batch_size=2, device="cpu")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(sr_prediction, "predict_chains", real)
    cells, _, genes = synthetic
    other = next(str(g) for g in cells.var_names if g not in genes)
    wrong = _pairs((cells, synthetic[1], [*genes[:-1], other]), tmp_path / "wrong.zarr")
    with pytest.raises(Exception, match="genes differ"):
        predict_sr(trained_diffst.model, wrong, maps, bins, device="cpu")
    assert list((tmp_path / "out").iterdir()) == []


def test_time_sampling_table(trained_diffst, pairs):
    table = time_sampling(trained_diffst.model, pairs, steps=(100, 10, 2), n_samples=1,
                                  max_patches=2, device="cpu")
    assert list(table["steps"]) == [100, 10, 2]
    assert list(table["sampler"]) == ["ddpm", "respaced", "respaced"]
    assert (table["seconds_per_patch"] > 0).all() and (table["n_patches"] == 2).all()
    assert table["seconds_per_patch"].iloc[0] > table["seconds_per_patch"].iloc[2]
    assert table[["RMSE", "PCC"]].notna().all().all()


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("flip_y, transpose, hexagonal", [
    (False, False, False), (True, False, False), (True, True, False), (False, False, True),
    (True, True, True)])
def test_spot_grid_bin_centres_are_the_spot_centres(tmp_path, flip_y, transpose, hexagonal):
    """HR bins sit on their spots, also on Visium's hexagonal lattice (odd rows staggered by
    half a pitch; array_col doubled), which the old bin centres ignored."""
    pitch = 20
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(1, 7), np.arange(6), indexing="ij"))
    y_px = (6 - rows if flip_y else rows) * pitch + pitch / 2 + 10
    x_px = cols * pitch + pitch / 2 + 10 + (rows % 2) * (pitch / 2 if hexagonal else 0)
    array_col = 2 * cols + rows % 2 if hexagonal else cols
    spots = ad.AnnData(X=sp.csr_matrix(np.random.default_rng(0).poisson(3.0, (36, 2))),
                       obs=pd.DataFrame({"array_row": rows, "array_col": array_col},
                                        index=[f"s{i}" for i in range(36)]),
                       var=pd.DataFrame(index=["A", "B"]))
    xy = np.column_stack([y_px, x_px] if transpose else [x_px, y_px])
    spots.obsm["spatial"] = xy
    slide = write_pyramid(np.full((140, 140, 3), 200, np.uint8), tmp_path / "s.tif", 1.0)
    build_spot_grid_pairs(spots, slide, None, tmp_path / "g.zarr", factor=2, patch_spots=4,
                          stride_spots=2, min_measured=0.0, normalisation="none", image_mpp=1.0)
    arrays, attrs = read_sr_pairs(tmp_path / "g.zarr")
    centres = hr_pixel_centres(arrays["origin_px"], arrays["grid_index"], attrs)
    position = {(r - 1, c): p for r, c, p in zip(rows, cols, xy)}  # lattice from row 1
    for k, (r0, c0) in enumerate(arrays["grid_index"]):
        got = centres(k)
        for i in range(4):
            for j in range(4):
                np.testing.assert_allclose(got[i, j], position[(r0 + i, c0 + j)], atol=1e-6)


def test_light_steps_do_not_import_torch():
    """Pairs, metrics and tables jobs import the task module without loading torch."""
    import subprocess
    import sys

    code = ("import sys; import histomap.tasks.superres, "
            "histomap.evaluation.metrics, histomap.evaluation.report, histomap.data.srpairs; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- real baselines
def test_real_bicubic_baseline_if_available(monkeypatch, pairs):
    srnets = pytest.importorskip("histomap.models.srnets")
    monkeypatch.setattr(sr_methods, "_baselines", lambda: srnets)
    model = build_sr_model("bicubic", N_GENES, {})
    assert not is_trainable("bicubic", model)
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs), batch_size=2)))
    out = next(predict_chains(model, {"method": "bicubic"}, batch, device="cpu"))
    np.testing.assert_allclose(out, batch["lr_up"].numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Xenium options
def test_xenium_options_pass_through_read_sample(xenium_crop_dir):
    from histomap.data.io import read_sample
    from histomap.errors import InputError

    strict = read_sample("xenium", "crop", xenium_crop_dir, mpp=0.2125, min_qv=35.0)
    assert strict.highres.uns["xenium"]["min_qv"] == 35.0
    assert strict.highres.uns["xenium"]["dropped"].get("qv < 35", 0) > 0
    with pytest.raises(InputError, match="min_qv"):
        read_sample("synthetic", "s", xenium_crop_dir, min_qv=30.0)


# --------------------------------------------------------------------------- diffusion target
def test_residual_target_round_trip_and_range():
    x0, res = DiffusionTarget("x0"), DiffusionTarget("residual")
    hr, lr_up = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 4, 4) * 2 - 1
    enc = res.encode(hr, lr_up)
    assert enc.abs().max() <= 1.0  # half the difference of two [-1, 1] maps
    torch.testing.assert_close(res.decode(enc, lr_up), hr)
    assert x0.encode(hr, lr_up) is hr and x0.decode(hr, lr_up) is hr
    bounded, unbounded = ValueRange(), ValueRange(0.0, 5.0, bounded=False)
    # the residual of two maps inside the training range is in [-1, 1], bounded units or not
    assert res.clip(bounded) == (-1.0, 1.0) and res.clip(unbounded) == (-1.0, 1.0)
    assert x0.clip(unbounded) == (-1.0, None)
    with pytest.raises(ValueError, match="residual"):
        DiffusionTarget("eps")


class ZeroX0(nn.Module):
    """A denoiser whose implied x_0 is 0 at every step (eps = x_t / sqrt(1 - abar_t))."""

    def __init__(self, diffusion):
        super().__init__()
        self.scale = diffusion.sqrt_one_minus_alphas_cumprod.float()

    def forward(self, x_t, t, lr_map=None, image=None):
        return x_t / self.scale[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("target", ["x0", "residual"])
def test_residual_target_adds_the_upsampled_lr_map(pairs, target):
    """With a zero x_0 the chain ends at 0: the HR map is the range's midpoint for x0, and the
    upsampled LR map itself (inside the maps' [0, 1] range: bicubic overshoots) for the
    residual target."""
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1]),
                                                  batch_size=2)))
    diffusion = GaussianDiffusion(T=100, clip_x0=(-1.0, 1.0))
    meta = {"method": "diffst", "value_range": [0.0, 1.0, True],
            "diffusion": {"T": 100, "target": target}}
    (out,) = predict_chains(ZeroX0(diffusion), meta, batch, device=torch.device("cpu"),
                                    sampler="ddpm", steps=None, diffusion=diffusion)
    expected = np.clip(batch["lr_up"].double().numpy(), 0, 1) if target == "residual" else 0.5
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_x0_prediction_is_kept_with_the_model_and_used_to_sample(pairs, tmp_path):
    """`diffusion.prediction` is saved with the model and decides how its output is read: a
    network answering 0 means x_0 = 0 (the range's midpoint) under x0-prediction and "no noise
    left" under eps-prediction, whose chain then keeps its starting noise."""
    torch.set_num_threads(1)
    train_sr("diffst", [pairs], model_cfg=DIFFST_CFG, train_cfg={**TRAIN, "epochs": 1},
                     validation=VALIDATION, seed=0, out_model=tmp_path / "model.pt",
                     out_log=tmp_path / "log.csv", checkpoint_dir=tmp_path / "ckpt",
                     diffusion={**DIFFUSION, "prediction": "x0"})
    _, meta = load_sr_model(tmp_path / "model.pt")
    assert meta["diffusion"]["prediction"] == "x0"
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1]),
                                                  batch_size=2)))
    outs = {}
    for prediction in ("x0", "eps"):
        meta = {"method": "diffst", "value_range": [0.0, 1.0, True],
                "diffusion": {"T": 100, "prediction": prediction}}
        (outs[prediction],) = predict_chains(
            lambda x_t, t, **cond: torch.zeros_like(x_t), meta, batch,
            device=torch.device("cpu"), sampler="respaced", steps=10,
            generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(outs["x0"], 0.5, atol=1e-6)
    assert outs["eps"].std() > 0.1


def test_eps_prediction_of_a_residual_stays_in_range_in_unbounded_units(pairs):
    """log1p units have no upper bound, but a residual does: the sampler clips every x_0
    estimate of the residual to [-1, 1]. A network answering eps = 0 implies x_0 = x_t /
    sqrt(alpha_bar_t), about 160 x the starting noise at t = T; unclipped, the chain ends there."""
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1]),
                                                  batch_size=2)))
    lo, hi = 0.0, 5.0
    meta = {"method": "diffst", "value_range": [lo, hi, False],
            "diffusion": {"T": 1000, "prediction": "eps", "target": "residual"}}
    (out,) = predict_chains(lambda x_t, t, **cond: torch.zeros_like(x_t), meta, batch,
                                    device=torch.device("cpu"), sampler="respaced", steps=20,
                                    generator=torch.Generator().manual_seed(0))
    vrange = ValueRange(lo, hi, False)
    lr_up = vrange.to_model(batch["lr_up"].double()).numpy()
    # HR = 2 x residual + lr_up with the residual in [-1, 1], then back to the pairs' units
    assert np.isfinite(out).all()
    assert out.max() <= vrange.from_model(lr_up + 2.0).max() + 1e-6
    assert out.min() >= lo - 1e-6


@pytest.mark.parametrize("sampler,eta", [("respaced", 0.0), ("ddim", 0.5)])
def test_batched_chains_equal_the_sequential_chains(pairs, sampler, eta):
    """The K chains of a batch run as one batch of K x B give the sequential chains' maps (the
    same noise, each chain from its own generator copy) and leave the generator where the
    sequential run leaves it. Fails if chain k drew from the wrong place of the stream (e.g. all
    chains from the same start: identical chains) or the condition were not repeated per chain."""
    from tolerances import reordering_atol

    torch.manual_seed(0)
    model = DiffST(N_GENES, **DIFFST_CFG).eval()
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(pairs, indices=[0, 1, 2]),
                                                  batch_size=3)))
    diffusion = GaussianDiffusion(T=100, clip_x0=(-1.0, 1.0))
    meta = {"method": "diffst", "value_range": [0.0, 1.0, True], "diffusion": {"T": 100}}
    outs, gens = {}, {}
    for batched in (False, True):
        gens[batched] = torch.Generator().manual_seed(3)
        outs[batched] = list(predict_chains(
            model, meta, batch, device=torch.device("cpu"), sampler=sampler, steps=6, eta=eta,
            n_samples=3, generator=gens[batched], diffusion=diffusion, batch_chains=batched))
    assert len(outs[True]) == len(outs[False]) == 3
    # batched and sequential kernels may sum in other orders (and other CPUs pick other
    # kernels): a bound from float32 and the network's longest dot product, per sampler step
    atol = reordering_atol(model, evaluations=6)
    for seq, bat in zip(outs[False], outs[True]):
        assert seq.shape == bat.shape == tuple(batch["hr"].shape)
        np.testing.assert_allclose(bat, seq, rtol=0, atol=atol)
    assert np.abs(outs[True][0] - outs[True][1]).max() > 1e-3   # chains differ
    assert torch.equal(gens[True].get_state(), gens[False].get_state())


def test_sampling_modes_from_config_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sampling_modes(cpu, "auto", False) == (SR_BATCH_CHAINS_CPU, None)
    assert sampling_modes(cuda, "auto", True)[0] is True
    assert sampling_modes(cpu, "false", "true") == (False, torch.bfloat16)
    assert sampling_modes(cpu, True, "auto")[1] == (
        torch.bfloat16 if SR_CPU_BF16_DEFAULT else None)
    with pytest.raises(ValueError, match="batch_chains"):
        sampling_modes(cpu, "sometimes", False)
