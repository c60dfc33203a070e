"""HistoGene: model shapes, padding, grid positions, sequence datasets, train/resume/predict."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tolerances import reordering_atol

from histomap import models
from histomap.data.io.synthetic import read as read_synthetic
from histomap.data.preprocess import normalise_spots
from histomap.data.spot_patches import dihedral
from histomap.data.synthetic import SyntheticConfig, simulate_sample, spot_grid
from histomap.models.histogene import HistoGene
from histomap.tasks.histogene import (
    SlideSequence,
    SpotSequenceDataset,
    covering_windows,
    histogene_batch_loss,
    predict_histogene,
    predict_sequence,
    quantise_positions,
    resize_patches,
    spot_positions,
    task_options,
    train_histogene,
)
from histomap.train import load_model

TINY = {"patch_px": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0,
        "n_pos": 16}


def test_registered():
    assert models.MODELS["histogene"] is HistoGene


def _inputs(b=2, n=7, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 3, p, p, generator=g), torch.randint(0, 16, (b, n, 2), generator=g)


# --------------------------------------------------------------------------- model
def test_forward_shapes_gradients_and_config():
    torch.manual_seed(0)
    model = HistoGene(5, **TINY)
    patches, positions = _inputs()
    out = model(patches, positions)
    assert out.shape == (2, 7, 5) and out.dtype == torch.float32
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (model.patch_embedding, model.x_embedding, model.y_embedding, model.head):
        assert part.weight.grad.abs().sum() > 0
    assert HistoGene(5, **model.config).config == model.config == {**TINY, "head_activation": None}
    assert models.build_model("histogene", 5, n_genes=5, **model.config).n_genes == 5
    assert "_mean" not in model.state_dict()  # normalisation constants are not weights
    with pytest.raises(ValueError, match="multiple of heads"):
        HistoGene(5, dim=10, heads=3)
    with pytest.raises(ValueError, match="n_genes"):
        HistoGene(0)
    with pytest.raises(ValueError, match="head_activation"):
        HistoGene(5, head_activation="tanh")
    with pytest.raises(ValueError, match="patches must be"):
        model(torch.rand(2, 7, 3, 9, 9), positions)


def test_padding_does_not_affect_real_spots_but_context_does():
    torch.manual_seed(1)
    model = HistoGene(4, **TINY).eval()
    patches, positions = _inputs(1, 6, seed=2)
    base = model(patches, positions)
    pad_p, pad_pos = _inputs(1, 4, seed=3)
    padded_p, padded_pos = torch.cat([patches, pad_p], 1), torch.cat([positions, pad_pos], 1)
    mask = torch.tensor([[False] * 6 + [True] * 4])
    with torch.no_grad():
        masked = model(padded_p, padded_pos, mask)
        unmasked = model(padded_p, padded_pos)
        other = model(torch.cat([patches, 1 - pad_p], 1),
                      torch.cat([positions, pad_pos.flip(1)], 1), mask)
    # 10 padded spots (4 masked out) against 6: attention sums over another length, which the
    # CPU kernels may order differently; bound from the network's longest reduction
    # (tests/tolerances.py), far below what an unmasked padding spot changes (checked next)
    atol = reordering_atol(model, scale=max(1.0, float(base.detach().abs().max())))
    torch.testing.assert_close(masked[:, :6], base, atol=atol, rtol=0)
    torch.testing.assert_close(other[:, :6], base, atol=atol, rtol=0)  # padding content
    assert not torch.allclose(unmasked[:, :6], base, atol=10 * atol)  # unmasked spots matter
    # attention: changing one real spot changes the prediction of another
    changed = patches.clone()
    changed[0, 5] = 1 - changed[0, 5]
    with torch.no_grad():
        assert not torch.allclose(model(changed, positions)[0, 0], base[0, 0], atol=1e-5)


def test_output_bias_and_head_activation():
    mean = torch.tensor([0.5, 2.0, 0.0])
    for activation in (None, "softplus", "relu"):
        model = HistoGene(3, **{**TINY, "head_activation": activation}).eval()
        model.init_output_bias(mean)
        with torch.no_grad():
            model.head.weight.zero_()
            out = model(*_inputs(1, 4))
        expected = mean.clamp(min=1e-3) if activation == "softplus" else mean
        torch.testing.assert_close(out[0], expected.expand(4, 3), atol=1e-5, rtol=1e-4)
        if activation is not None:
            model.head.bias.data.fill_(-5.0)
            assert (model(*_inputs(1, 4)) >= 0).all()


def test_overfits_one_batch():
    """Two sequences of 10 spots, 4 genes: the loss falls by > 90% within 300 steps."""
    torch.manual_seed(0)
    patches, positions = _inputs(2, 10, seed=4)
    y = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(5))
    model = HistoGene(4, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss = None
    for _ in range(300):
        opt.zero_grad()
        loss = F.mse_loss(model(patches, positions), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


# --------------------------------------------------------------------------- grid positions
def test_quantise_positions_on_hex_and_square_grids():
    rng = np.random.default_rng(0)
    for grid in ("hex", "square"):
        cfg = SyntheticConfig(size_um=(1000.0, 900.0), mpp=0.5, spot_spacing_um=100.0,
                              spot_grid=grid)
        centres, rows, cols = spot_grid(cfg)
        centres = centres + rng.uniform(-3, 3, centres.shape)  # 200 px pitch, +-3 px jitter
        keep = rng.random(len(centres)) > 0.2  # tissue: not every grid spot is present
        pos = quantise_positions(centres[keep] + 1234.0)
        rows, cols = rows[keep] - rows[keep].min(), cols[keep]
        if grid == "hex":  # staggered rows: columns doubled (Visium array_col convention)
            cols = 2 * cols + rows % 2
        cols = cols - cols.min()
        np.testing.assert_array_equal(pos, np.column_stack([cols, rows]))
        assert len(np.unique(pos, axis=0)) == keep.sum()
    assert quantise_positions(np.array([[5.0, 7.0]])).tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="finite"):
        quantise_positions(np.array([[np.nan, 1.0], [2.0, 3.0]]))


def _spots(obs: pd.DataFrame, xy: np.ndarray) -> ad.AnnData:
    adata = ad.AnnData(X=np.zeros((len(obs), 1), np.float32), obs=obs)
    adata.obsm["spatial"] = xy.astype(float)
    return adata


def test_spot_positions_from_lattice_quantised_and_clipped(caplog):
    # legacy ST: array coordinates, shifted to start at 0
    legacy = _spots(pd.DataFrame({"array_x": [5, 6, 7, 12], "array_y": [10, 10, 11, 30]},
                                 index=["5x10", "6x10", "7x11", "12x30"]),
                    np.array([[0, 0], [290, 0], [580, 290], [2030, 5800]]))
    np.testing.assert_array_equal(spot_positions(legacy, n_pos=64),
                                  [[0, 0], [1, 0], [2, 1], [7, 20]])
    with caplog.at_level(logging.WARNING, logger="histomap.tasks.histogene"):
        clipped = spot_positions(legacy, n_pos=8)
    assert "1 of 4 spots" in caplog.text and "clipped" in caplog.text
    np.testing.assert_array_equal(clipped[-1], [7, 7])
    # Visium: doubled hex columns are halved
    visium = _spots(pd.DataFrame({"array_row": [0, 0, 1, 1], "array_col": [0, 2, 1, 3]},
                                 index=list("abcd")), np.zeros((4, 2)))
    np.testing.assert_array_equal(spot_positions(visium, n_pos=64), [[0, 0], [1, 0], [0, 1],
                                                                     [1, 1]])
    # no lattice: centres quantised
    free = _spots(pd.DataFrame(index=list("abcd")),
                  np.array([[100, 50], [300, 50], [100, 250], [500, 252]]))
    np.testing.assert_array_equal(spot_positions(free, n_pos=64), [[0, 0], [1, 0], [0, 1],
                                                                   [2, 1]])


# --------------------------------------------------------------------------- sequences
def _sequence(n=12, genes=3, p=4, seed=0, name="s"):
    g = torch.Generator().manual_seed(seed)
    return SlideSequence(name, torch.randint(0, 256, (n, 3, p, p), generator=g,
                                             dtype=torch.uint8),
                         torch.randint(0, 16, (n, 2), generator=g),
                         torch.randn(n, genes, generator=g))


def test_sequence_datasets_subset_pad_and_score():
    a, b = _sequence(12, seed=0, name="a"), _sequence(7, seed=1, name="b")
    train_a, train_b = np.arange(12) % 4 != 0, np.arange(7) >= 2
    ds = SpotSequenceDataset([a, b], [train_a, train_b], [train_a, train_b], max_spots=5,
                             augment=True)
    assert len(ds) == 2 + 1 and ds.length == 5  # ceil(9 / 5) + ceil(5 / 5)
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        seq, mask = (a, train_a) if i < 2 else (b, train_b)
        v = item["valid"]
        assert v.sum() == 5 and torch.equal(item["scored"], v)
        # each real spot is a context spot: find it by its targets, check its patch and position
        for t, patch, pos in zip(item["targets"][v], item["patches"][v], item["positions"][v]):
            j = int(torch.nonzero((seq.targets == t).all(dim=1))[0])
            assert mask[j] and torch.equal(pos, seq.positions[j])
            assert any(torch.equal(patch, dihedral(seq.patches[j], k)) for k in range(8))
    items = ds.items
    ds_more = SpotSequenceDataset([a, b], [train_a, train_b], [train_a, train_b], max_spots=5,
                                  items_per_slide=4)
    assert len(ds_more) == 8 and len(items) == 3
    # validation: whole slide as context, only validation spots scored, padded to the longest
    val_b = ~train_b
    val = SpotSequenceDataset([a, b], [np.ones(12, bool), np.ones(7, bool)],
                              [np.zeros(12, bool), val_b])
    assert len(val) == 1 and val.length == 7  # slide a has no validation spot
    item = val[0]
    assert item["valid"].all() and torch.equal(item["scored"], torch.from_numpy(val_b))
    torch.testing.assert_close(item["targets"], b.targets)
    torch.testing.assert_close(item["patches"], b.patches)
    with pytest.raises(ValueError, match="scored spots inside the context"):
        SpotSequenceDataset([b], [train_b], [np.ones(7, bool)])


def _grid_sequence(n_side=6, genes=2, p=8, seed=0):
    """A square lattice of n_side^2 spots 100 px apart, with centres."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = np.divmod(np.arange(n_side * n_side), n_side)
    return SlideSequence("grid", torch.randint(0, 256, (n_side * n_side, 3, p, p), generator=g,
                                               dtype=torch.uint8),
                         torch.from_numpy(np.column_stack([cols, rows]).astype(np.int64)),
                         torch.randn(n_side * n_side, genes, generator=g),
                         np.column_stack([cols * 100.0, rows * 100.0]))


def _is_contiguous(xy, members, k):
    """``members`` are the k spots nearest to one of them (ties allowed)."""
    d = np.hypot(*(xy[:, None, :] - xy[None, members, :]).transpose(2, 0, 1))
    return any((d[members, j] <= np.sort(d[:, j])[k - 1]).all() for j in range(len(members)))


def test_covering_windows_are_contiguous_and_own_every_spot_once():
    seq = _grid_sequence(7)
    xy = seq.xy
    windows = covering_windows(xy, 9)
    owners = np.zeros(len(xy), int)
    for idx, owned in windows:
        assert len(idx) == 9 and np.all(np.diff(idx) > 0)
        assert _is_contiguous(xy, idx, 9)
        owners[idx[owned]] += 1
    assert (owners == 1).all() and len(windows) > 1
    targets = np.arange(len(xy)) % 3 == 0
    owners[:] = 0
    for idx, owned in covering_windows(xy, 9, targets):
        owners[idx[owned]] += 1
    assert (owners == targets).all()
    assert covering_windows(xy[:5], 9)[0][0].tolist() == [0, 1, 2, 3, 4]


def test_training_validation_and_prediction_see_the_same_windows(monkeypatch):
    """HistoGene-style used to train on random scattered subsets of max_spots spots and to
    predict a whole slide as one sequence. Now every sequence is a contiguous window of at most
    max_spots spots, in training, validation and prediction."""
    torch.manual_seed(0)
    seq = _grid_sequence(7)
    train = SpotSequenceDataset([seq], [np.ones(49, bool)], [np.ones(49, bool)], max_spots=9,
                                items_per_slide=5)
    for i in range(len(train)):
        item = train[i]
        members = [int(torch.nonzero((seq.targets == t).all(dim=1))[0])
                   for t in item["targets"][item["valid"]]]
        assert len(members) == 9 and _is_contiguous(seq.xy, np.array(members), 9)
    val_mask = np.arange(49) >= 40
    val = SpotSequenceDataset([seq], [np.ones(49, bool)], [val_mask], max_spots=9, cover=True)
    scored = sum(int(val[i]["scored"].sum()) for i in range(len(val)))
    assert scored == val_mask.sum() and max(int(val[i]["valid"].sum()) for i in
                                             range(len(val))) <= 9

    model = HistoGene(2, **TINY).eval()
    lengths = []
    forward = HistoGene.forward

    def recording(self, patches, positions, *args, **kwargs):
        lengths.append(patches.shape[1])
        return forward(self, patches, positions, *args, **kwargs)

    monkeypatch.setattr(HistoGene, "forward", recording)
    pred = predict_sequence(model, seq, max_spots=9, device="cpu", amp=False)
    assert pred.shape == (49, 2) and lengths and max(lengths) == 9
    # each spot: the mean of the windows that hold it
    windows = covering_windows(seq.xy, 9)
    with torch.no_grad():
        outs = [forward(model, seq.patches[torch.from_numpy(i)][None].float() / 255,
                        seq.positions[torch.from_numpy(i)][None])[0].numpy() for i, _ in windows]
    spot = 24
    expected = np.mean([o[list(i).index(spot)] for (i, _), o in zip(windows, outs) if spot in i],
                       axis=0)
    np.testing.assert_allclose(pred[spot], expected, rtol=1e-5, atol=1e-6)
    lengths.clear()
    whole = predict_sequence(model, seq, device="cpu", amp=False)
    assert lengths == [49] and not np.allclose(whole, pred)


def test_batch_loss_scores_only_scored_spots():
    torch.manual_seed(0)
    seq = _sequence(9, genes=3, p=8)
    scored = np.arange(9) % 3 == 0
    ds = SpotSequenceDataset([seq, seq], [np.ones(9, bool), np.arange(9) < 6],
                             [scored, scored & (np.arange(9) < 6)])
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["patches"].shape == (2, 9, 3, 8, 8) and not batch["valid"][1, 6:].any()
    model = HistoGene(3, **TINY).eval()
    loss = histogene_batch_loss(model, batch, torch.device("cpu"), None)
    pred = model(batch["patches"].float() / 255, batch["positions"], ~batch["valid"])
    s = batch["scored"]
    assert s.sum() == 5
    torch.testing.assert_close(loss, F.mse_loss(pred[s], batch["targets"][s]))
    batch["targets"][~s] += 100.0  # unscored targets never enter the loss
    torch.testing.assert_close(histogene_batch_loss(model, batch, torch.device("cpu"), None), loss)


def test_resize_patches_and_task_options():
    patches = np.zeros((2, 20, 20, 3), np.uint8)
    patches[:, :10] = 200
    out = resize_patches(patches, 4)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.uint8
    assert (out[:, :, 0] == 200).all() and (out[:, :, -1] == 0).all()  # top half bright
    assert abs(out.float().mean().item() - 100) < 2
    assert torch.equal(resize_patches(patches, 20), torch.from_numpy(patches).permute(0, 3, 1, 2))
    task, cfg = task_options({"input_mpp": 2.0, "crop_um": 55, "dim": 32, "checkpoint": None})
    assert task == {"input_mpp": 2.0, "crop_um": 55, "max_spots": 256, "items_per_slide": None}
    assert cfg == {"dim": 32}
    with pytest.raises(ValueError, match="no pretrained backbone"):
        task_options({"checkpoint": "x.pth"})


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("histogene")
    paths = {}
    for name, seed in (("s1", 3), ("s2", 4)):
        simulate_sample(root / name, seed=seed, size_um=(600.0, 600.0))
        st = normalise_spots(read_synthetic(name, root / name).spots, min_counts=10, min_genes=5)
        st.write_h5ad(root / f"{name}.h5ad")
        paths[name] = (root / f"{name}.h5ad", root / name / "he.tif")
    st = ad.read_h5ad(paths["s1"][0])
    genes = list(st.var_names[np.argsort(-np.asarray(st.X.mean(axis=0)).ravel())[:5]])
    return {"root": root, "paths": paths, "genes": genes}


TRAIN = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "patience": None, "amp": False,
         "device": "cpu"}
VALIDATION = {"fraction": 0.25, "block_um": 150}
MODEL_CFG = {**TINY, "dropout": 0.1, "input_mpp": 4.0, "crop_um": 55.0, "max_spots": 8,
             "items_per_slide": 4}


class Interrupt(Exception):
    pass


def _train(samples, name, **kwargs):
    out = samples["root"] / name
    st, slide = samples["paths"]["s1"]
    return out, train_histogene([st], [slide], samples["genes"], model_cfg=MODEL_CFG,
                                train_cfg=TRAIN, validation=VALIDATION, seed=0,
                                out_model=out / "model.pt", out_log=out / "train_log.csv",
                                checkpoint_dir=out / "checkpoints", **kwargs)


def test_train_resume_and_predict(samples, monkeypatch):
    out, summary = _train(samples, "full")
    assert summary["epochs_done"] == 2 and (out / "model.pt").is_file()
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and np.isfinite(log["val_loss"]).all()
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, HistoGene) and meta["genes"] == samples["genes"]
    assert meta["extra"]["max_spots"] == 8 and meta["extra"]["input_mpp"] == 4.0
    assert model.config == {**TINY, "dropout": 0.1, "head_activation": None}

    # killed after epoch 1, rerun: resumes and ends with the uninterrupted weights
    def stop(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(samples, "resumed", on_epoch_end=stop)
    assert not (samples["root"] / "resumed" / "model.pt").exists()
    resumed_dir, resumed = _train(samples, "resumed")
    assert resumed["resumed_from"] == 1 and resumed["epochs_done"] == 2
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed_dir / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)

    # held-out slide: covering windows of at most max_spots (8) spots, as in training
    st_path, slide = samples["paths"]["s2"]
    lengths, forward = [], HistoGene.forward

    def recording(self, patches, *args, **kwargs):
        lengths.append(patches.shape[1])
        return forward(self, patches, *args, **kwargs)

    monkeypatch.setattr(HistoGene, "forward", recording)
    pred = predict_histogene(out / "model.pt", st_path, slide, out / "pred" / "s2.h5ad",
                             device="cpu")
    assert ad.read_h5ad(st_path).n_obs > 8 and max(lengths) == 8
    written = ad.read_h5ad(out / "pred" / "s2.h5ad")
    st = ad.read_h5ad(st_path)
    assert written.shape == (st.n_obs, 5) and list(written.var_names) == samples["genes"]
    assert list(written.obs_names) == list(st.obs_names)
    np.testing.assert_allclose(written.obsm["spatial"], st.obsm["spatial"])
    np.testing.assert_allclose(written.X, pred.X)
    assert np.isfinite(written.X).all() and written.X.std(axis=0).max() > 0
    info = written.uns["histomap"]
    assert info["model"]["model"] == "histogene" and info["sample"] == "s2"
    assert info["spot_diameter_um"] == st.uns["histomap"]["spot_diameter_um"]
    assert np.allclose(written.obs["diameter_um"], info["spot_diameter_um"])
